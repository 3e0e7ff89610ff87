"""Pairing in one line (issue 20): `token issue --join` on the relay, `tunneld join -`
at home, against a real relay and daemon."""

from __future__ import annotations

import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.integration.harness import HOME_HOST, PY, RELAY_HOST, World, tunneld, wait_for

pytestmark = pytest.mark.integration


def join(
    config: Path, line: str, *extra: str, stdin: bool = True
) -> subprocess.CompletedProcess[str]:
    args = [PY, "-m", "tunneld", "join", "-" if stdin else line, "-c", str(config), *extra]
    return subprocess.run(
        args, input=line + "\n" if stdin else "", capture_output=True, text=True, timeout=90
    )


def issue_join(world: World, *hostnames: str) -> str:
    args = ["token", "issue", "-c", str(world.relay_config), "--join"]
    for name in hostnames:
        args += ["--hostname", name]
    result = tunneld(*args, check=True)
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    assert "tunneld join -" in result.stderr
    return lines[0]


def test_join_writes_a_new_config_then_updates_a_running_one(world: World) -> None:
    world.start_app()
    world.start_relay()
    line = issue_join(world, HOME_HOST)
    assert line.startswith("tunneld join tunneld1.")
    assert line.endswith(f"@{RELAY_HOST}:{world.relay_port}")
    token = line.split()[2].rsplit("@", 1)[0]
    resolve = ["--resolve", f"{HOME_HOST}:127.0.0.1", "--resolve", f"{RELAY_HOST}:127.0.0.1"]

    # A new file: written by init, token in token_file, both 0640; doctor runs.
    fresh = world.root / "etc" / "tunneld.toml"
    upstream = f"http://127.0.0.1:{world.app_port}"
    result = join(fresh, line, "--ca-file", str(world.ca_file), "--upstream", upstream, *resolve)
    assert result.returncode == 0, (result.stdout, result.stderr)
    out = result.stdout + result.stderr
    assert token not in out and token not in fresh.read_text()
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o640
    token_file = fresh.parent / "token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o640
    assert token_file.read_text().strip() == token
    cfg = tomllib.loads(fresh.read_text())
    assert cfg["relay"]["url"] == f"wss://{RELAY_HOST}:{world.relay_port}/v1/tunnel"
    assert cfg["relay"]["token_file"] == str(token_file)
    assert cfg["relay"].get("token", "") == ""
    assert cfg["tls"]["hostnames"] == [HOME_HOST]
    assert f"check-config: {fresh} is valid" in result.stdout
    assert "ok    session: the relay accepts this token" in result.stdout, result.stdout
    assert "next: `systemctl enable --now tunneld`" in result.stdout

    # An existing config (another token, its own keys and comments) is updated in place;
    # the daemon then connects with the new token.
    world.write_home_config(token=world.issue_token("other.test"))
    text = world.home_config.read_text()
    world.home_config.write_text("# my own note, kept\n" + text)
    result = join(world.home_config, line, *resolve)
    assert result.returncode == 0, (result.stdout, result.stderr)
    text = world.home_config.read_text()
    assert text.startswith("# my own note, kept\n")
    cfg = tomllib.loads(text)
    assert cfg["relay"]["connect_to"] == "127.0.0.1"  # kept
    assert cfg["relay"].get("token", "") == ""
    assert Path(cfg["relay"]["token_file"]).read_text().strip() == token
    home = world.spawn("home", [PY, "-m", "tunneld", "run", "-c", str(world.home_config)])
    wait_for(
        lambda: (world.status(world.home_config, home) or {}).get("state") == "connected",
        what="home connected with the joined token",
    )
    world.home = home
    result = join(world.home_config, line, *resolve)
    assert result.returncode == 0, result.stderr
    assert "ok    tunnel: https://home.test/ through the relay reached this daemon" in result.stdout
    assert "next: `systemctl reload tunneld`" in result.stdout
    assert token not in home.log() and token not in world.relay.log()


def test_join_on_the_command_line_warns_and_bad_lines_are_one_line(world: World) -> None:
    world.start_relay()
    line = issue_join(world, HOME_HOST)
    config = world.root / "argv" / "tunneld.toml"
    result = join(config, line, stdin=False)
    assert result.returncode == 0, result.stderr
    assert "shell history" in result.stderr and "tunneld join -" in result.stderr

    for bad in ("tunneld join nonsense@relay.test", "no-at-sign", "tunneld1.x.y@"):
        result = join(world.root / "bad.toml", bad)
        assert result.returncode == 2, (bad, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (world.root / "bad.toml").exists()

    # A relay config is never overwritten by a join.
    result = join(world.relay_config, line)
    assert result.returncode == 2 and "relay config" in result.stderr


def test_token_issue_refuses_names_outside_allowed_domains(world: World) -> None:
    """An operator serving `*.tunnel.test` cannot mint a name it does not serve."""

    def issue(*names: str) -> subprocess.CompletedProcess[str]:
        args = ["token", "issue", "-c", str(world.relay_config)]
        for name in names:
            args += ["--hostname", name]
        return tunneld(*args)

    world.write_relay_config(allowed_domains=["*.tunnel.test", "home.test"])
    assert issue("alice.tunnel.test").returncode == 0
    assert issue("Bob.Tunnel.Test.").returncode == 0  # compared as SNI is
    assert issue("home.test", "www.home.test").returncode == 0  # a plain entry: it and below
    for names in (("evil.test",), ("alice.tunnel.test", "evil.test"), ("tunnel.test",)):
        result = issue(*names)
        assert result.returncode == 2, (names, result.stdout)
        assert result.stdout == ""  # no token printed
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "[relay] allowed_domains" in lines[0], result.stderr
        assert names[-1] in lines[0]
    world.write_relay_config(allowed_domains=[])
    assert issue("evil.test").returncode == 0  # empty: any name

    world.write_relay_config(allowed_domains=["not a name!"])
    result = tunneld("check-config", "-c", str(world.relay_config))
    assert result.returncode == 2 and "[relay] allowed_domains" in result.stderr
