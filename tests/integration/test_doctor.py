"""`tunneld doctor` against real processes: each check fails for its planted cause, with
its fix, and passes once the cause is gone (issue 20).

The planted causes are the first hour's common mistakes: Home Assistant without
trusted proxies (tests/hafake.py answers 400 as it does), DNS pointing elsewhere (the
doctor's `--resolve`, as the test's resolver), a token lacking the hostname, a wrong
clock (the doctor run under faketime), the relay's port blocked, the relay's
certificate for another name or untrusted, the app down, the relay stopped.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from tests.integration.harness import HOME_HOST, PY, RELAY_HOST, World, wait_for
from tunneld.pki import (
    generate_private_key,
    issue_certificate,
    make_ca,
    write_certificate,
    write_private_key,
)

pytestmark = pytest.mark.integration


@dataclass
class Result:
    code: int
    out: str
    checks: dict[str, list[tuple[str, str, str]]]  # name -> [(level, message, fix)]

    def level(self, name: str) -> str:
        levels = {lvl for lvl, _, _ in self.checks[name]}
        for lvl in ("FAIL", "warn", "skip", "ok"):
            if lvl in levels:
                return lvl
        raise AssertionError(name)

    def line(self, name: str) -> tuple[str, str, str]:
        return self.checks[name][0]


def doctor(
    config: Path,
    *resolve: str,
    env: dict[str, str] | None = None,
    prefix: tuple[str, ...] = (),
    secret: str = "",
) -> Result:
    args = [*prefix, PY, "-m", "tunneld", "doctor", "-c", str(config)]
    for entry in resolve:
        args += ["--resolve", entry]
    run = subprocess.run(
        args, capture_output=True, text=True, timeout=90, env={**os.environ, **(env or {})}
    )
    assert "Traceback" not in run.stderr, run.stderr
    if secret:
        assert secret not in run.stdout and secret not in run.stderr
    checks: dict[str, list[tuple[str, str, str]]] = {}
    last: list[str] | None = None
    for raw in run.stdout.splitlines()[1:-1]:
        if raw.startswith("      fix: "):
            assert last is not None, run.stdout
            last[2] = raw[len("      fix: ") :]
            continue
        level, rest = raw.split(None, 1)
        name, message = rest.split(": ", 1)
        last = [level, message, ""]
        checks.setdefault(name, []).append(last)  # type: ignore[arg-type]
    out = {k: [(a, b, c) for a, b, c in v] for k, v in checks.items()}
    for entries in out.values():
        for level, _, fix in entries:
            assert level in ("ok", "warn", "FAIL", "skip"), run.stdout
            if level == "FAIL":
                assert fix, f"a failure without its fix:\n{run.stdout}"
    return Result(run.returncode, run.stdout, out)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def variant(world: World, name: str, **tables: dict[str, Any]) -> Path:
    """A copy of the home config with some keys changed (same daemon, same socket)."""
    cfg = tomllib.loads(world.home_config.read_text())
    for table, values in tables.items():
        cfg.setdefault(table, {}).update(values)
    path = world.root / name
    path.write_text(tomli_w.dumps(cfg))
    return path


@pytest.fixture
def ha_world(world: World) -> World:
    """Relay, a Home-Assistant-like app (trusting no proxy yet), and a daemon serving a
    CA-issued certificate, all running."""
    ca_key, ca_pem = make_ca("doctor test CA")
    key = generate_private_key()
    write_private_key(key, world.root / "home.key")
    write_certificate(issue_certificate(ca_key, ca_pem, key, [HOME_HOST]), world.root / "home.crt")
    port_file = world.root / "ha.port"
    world.ha_trusted = world.root / "ha.trusted"  # type: ignore[attr-defined]
    world.spawn(
        "hafake",
        [
            PY,
            "-m",
            "tests.hafake",
            "--port-file",
            str(port_file),
            "--trusted-file",
            str(world.ha_trusted),  # type: ignore[attr-defined]
        ],
    )
    wait_for(port_file.exists, what="hafake port file")
    world.app_port = int(port_file.read_text())
    world.start_relay()
    world.start_home(
        tls={
            "certificate": str(world.root / "home.crt"),
            "private_key": str(world.root / "home.key"),
        }
    )
    return world


def test_home_doctor_each_cause_fails_then_passes(ha_world: World) -> None:
    w = ha_world
    token = tomllib.loads(w.home_config.read_text())["relay"]["token"]
    here = f"{HOME_HOST}:127.0.0.1"

    # Home Assistant without trusted_proxies: 400 to X-Forwarded-For. Only that fails.
    r = doctor(w.home_config, here, secret=token)
    assert r.code == 2, r.out
    assert r.level("forwarded") == "FAIL", r.out
    assert "400" in r.line("forwarded")[1]
    assert "use_x_forwarded_for: true" in r.line("forwarded")[2]
    assert "trusted_proxies" in r.line("forwarded")[2]
    for name in ("config", "relay", "clock", "token", "session", "dns", "tunnel", "upstream"):
        assert r.level(name) == "ok", (name, r.out)
    assert r.level("certificate") == "ok", r.out

    # Fixed the way the user would: Home Assistant now trusts the daemon's address.
    w.ha_trusted.write_text("127.0.0.1\n::1\n")  # type: ignore[attr-defined]
    r = doctor(w.home_config, here, secret=token)
    assert r.code == 0, r.out
    assert r.level("forwarded") == "ok"
    assert "reached this daemon" in r.line("tunnel")[1]

    # DNS: pointing at another public address fails; at a LAN address warns (split DNS);
    # not resolving at all fails; the fix names the relay.
    r = doctor(w.home_config, f"{HOME_HOST}:198.51.100.7", secret=token)
    assert r.code == 2 and r.level("dns") == "FAIL", r.out
    assert "198.51.100.7" in r.line("dns")[1] and "not to the relay" in r.line("dns")[1]
    assert "127.0.0.1" in r.line("dns")[2] and RELAY_HOST in r.line("dns")[2]
    r = doctor(w.home_config, f"{HOME_HOST}:192.168.1.10", secret=token)
    assert r.code == 1 and r.level("dns") == "warn", r.out
    r = doctor(w.home_config, secret=token)  # home.test is in no DNS
    assert r.level("dns") == "FAIL" and "does not resolve" in r.line("dns")[1], r.out

    # A token lacking the hostname: the token check says so, and the relay refuses it.
    other = w.issue_token("other.test")
    bad = variant(w, "other-token.toml", relay={"token": other})
    r = doctor(bad, here, secret=other)
    assert r.code == 2, r.out
    assert r.level("token") == "FAIL" and "does not name home.test" in r.line("token")[1]
    assert "--hostname home.test" in r.line("token")[2]
    assert r.level("session") == "FAIL" and "hostname_not_allowed" in r.line("session")[1]
    good = variant(w, "good-token.toml", relay={"token": w.issue_token(HOME_HOST)})
    r = doctor(good, here)
    assert r.code == 0 and r.level("token") == "ok" and r.level("session") == "ok", r.out

    # A wrong clock (this process 400 days ahead): blamed on the clock, not on the token
    # or the relay's certificate, and the token is not sent over a connection that
    # did not verify.
    faketime = shutil.which("faketime")
    assert faketime, "scripts/test.sh installs faketime"
    r = doctor(w.home_config, here, prefix=(faketime, "-f", "+400d"), secret=token)
    assert r.code == 2, r.out
    assert r.level("clock") == "FAIL" and "400 days ahead" in r.line("clock")[1], r.out
    assert "timedatectl set-ntp true" in r.line("clock")[2]
    assert r.level("relay") == "warn" and "clock" in r.line("relay")[1]
    assert r.level("token") == "warn" and "only by this machine's clock" in r.line("token")[1]
    assert r.level("session") == "skip"

    # The relay's port blocked (nothing answers where the daemon dials).
    blocked = variant(w, "blocked.toml", relay={"connect_to": f"127.0.0.1:{closed_port()}"})
    r = doctor(blocked, here, secret=token)
    assert r.code == 2 and r.level("relay") == "FAIL", r.out
    assert "connection refused" in r.line("relay")[1]
    assert "firewall" in r.line("relay")[2] and "ufw allow" in r.line("relay")[2]
    assert r.level("session") == "skip" and r.level("clock") == "skip"

    # A relay certificate this home does not trust (no [relay] ca_file for its CA).
    untrusted = variant(w, "untrusted.toml", relay={"ca_file": str(w.root / "home.crt")})
    r = doctor(untrusted, here, secret=token)
    assert r.level("relay") == "FAIL" and "does not verify" in r.line("relay")[1], r.out
    assert "public CA" in r.line("relay")[2] and r.level("session") == "skip"

    # The app down; then the daemon stopped.
    next(p for p in w.procs if p.name == "hafake").stop()
    r = doctor(w.home_config, here, secret=token)
    assert r.level("upstream") == "FAIL" and "connection refused" in r.line("upstream")[1]
    assert "start the app" in r.line("upstream")[2]
    assert "forwarded" not in r.checks
    w.home.stop()
    r = doctor(w.home_config, here, secret=token)
    assert r.level("tunnel") == "warn" and "not running" in r.line("tunnel")[1], r.out
    assert r.level("session") == "ok"  # the relay still accepts the token
    assert "Traceback" not in w.relay.log()
    # The session check opened no session: nothing failed a handshake, nothing replaced.
    assert "failed its handshake" not in w.relay.log()
    assert "replaced" not in w.relay.log()


def test_relay_doctor_each_cause_fails_then_passes(world: World) -> None:
    world.start_relay()
    trust = {"SSL_CERT_FILE": str(world.ca_file)}  # the test CA as "the system's CAs"
    here = f"{RELAY_HOST}:127.0.0.1"

    r = doctor(world.relay_config, here, env=trust)
    assert r.code == 0, r.out
    for name in ("config", "keys", "certificate", "listeners", "public"):
        assert r.level(name) == "ok", (name, r.out)

    # Port blocked on the public address (nothing listens on 127.0.0.7).
    r = doctor(world.relay_config, f"{RELAY_HOST}:127.0.0.7", env=trust)
    assert r.code == 2 and r.level("public") == "FAIL", r.out
    assert "not reachable" in r.line("public")[1] and "ufw allow" in r.line("public")[2]

    # The name not in DNS at all.
    r = doctor(world.relay_config, env=trust)
    assert r.level("public") == "FAIL" and "does not resolve" in r.line("public")[1]
    assert "A (and AAAA) record" in r.line("public")[2]

    # A certificate homes will not trust (no public CA behind it).
    r = doctor(world.relay_config, here, env={"SSL_CERT_FILE": os.devnull})
    assert r.level("public") == "FAIL" and "does not verify" in r.line("public")[1], r.out
    assert "public CA" in r.line("public")[2]

    # A certificate for another name; a public key file missing.
    ca_key, ca_pem = make_ca("other CA")
    key = generate_private_key()
    write_private_key(key, world.root / "wrong.key")
    write_certificate(
        issue_certificate(ca_key, ca_pem, key, ["wrong.test"]), world.root / "wrong.crt"
    )
    cfg = tomllib.loads(world.relay_config.read_text())
    cfg["relay"].update(
        certificate="wrong.crt", private_key="wrong.key", token_public_key="gone.pub"
    )
    bad = world.root / "bad-relay.toml"
    bad.write_text(tomli_w.dumps(cfg))
    r = doctor(bad, here, env=trust)
    assert r.level("certificate") == "FAIL" and "not for relay.test" in r.line("certificate")[1]
    assert r.level("keys") == "FAIL" and "gone.pub" in r.line("keys")[1]
    assert "tunneld keygen" in r.line("keys")[2]

    # The relay stopped.
    world.relay.stop()
    r = doctor(world.relay_config, here, env=trust)
    assert r.code == 2 and r.level("listeners") == "FAIL", r.out
    assert "not running" in r.line("listeners")[1]
    assert "systemctl enable --now tunneld-relay" in r.line("listeners")[2]


def test_doctor_bad_input_is_one_line(tmp_path: Path) -> None:
    run = subprocess.run(
        [PY, "-m", "tunneld", "doctor", "-c", str(tmp_path / "none.toml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2 and "FAIL  config:" in run.stdout, run.stdout
    assert "Traceback" not in run.stderr
    run = subprocess.run(
        [PY, "-m", "tunneld", "doctor", "-c", str(tmp_path / "x.toml"), "--resolve", "nonsense"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2 and "--resolve" in run.stderr and "Traceback" not in run.stderr
