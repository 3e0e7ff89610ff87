"""What a newcomer meets in the first hour (issue 22): one line and an exit code, never a
traceback; `check-config` checks what `run` and `relay` will open; errors blame the key.

Every test runs the real command (`python -m tunneld ...`) against real files and
processes on loopback.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from tests.integration.harness import (
    HOME_HOST,
    PY,
    World,
    tunneld,
    wait_for,
)
from tunneld.tokens import issue_token, load_private_key

pytestmark = pytest.mark.integration


def one_line_error(result: subprocess.CompletedProcess[str], *parts: str) -> str:
    """The command failed with exit 2 and exactly one line on stderr holding `parts`."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    err = result.stderr
    assert "Traceback" not in err and "ExceptionGroup" not in err, err
    # The harness's configs log at debug level; a user's default (info) shows none of those.
    lines = [line for line in err.strip().splitlines() if not line.startswith("DEBUG ")]
    assert len(lines) == 1, err
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def home_toml(world: World) -> dict[str, dict[str, object]]:
    import tomllib

    return tomllib.loads(world.home_config.read_text())


def write_home(world: World, **tables: dict[str, object]) -> None:
    """The harness's home config with some keys changed ("" or None removes a key)."""
    world.write_home_config()
    cfg = home_toml(world)
    for table, values in tables.items():
        section = cfg.setdefault(table, {})
        assert isinstance(section, dict)
        for key, value in values.items():
            if value is None:
                section.pop(key, None)
            else:
                section[key] = value
    world.home_config.write_text(tomli_w.dumps(cfg))


@pytest.fixture
def files(world: World) -> World:
    """A relay config and its key files written, nothing started."""
    world.write_relay_config()
    return world


# --- 1. tracebacks ------------------------------------------------------------------------


def test_run_with_a_missing_relay_ca_file_is_one_line(files: World) -> None:
    missing = files.root / "no-such-ca.pem"
    write_home(files, relay={"ca_file": str(missing)})
    result = tunneld("run", "-c", str(files.home_config))
    one_line_error(result, f"{files.home_config}: [relay] ca_file", str(missing))


def test_relay_on_a_taken_port_is_one_line(files: World) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        files.write_relay_config(port)
        result = tunneld("relay", "-c", str(files.relay_config))
    line = one_line_error(
        result, f"{files.relay_config}: [relay] listen", f"127.0.0.1:{port}", "in use"
    )
    assert line.count("\n") == 0


@pytest.fixture
def daemon(files: World) -> Iterator[World]:
    """A daemon that runs (its relay is not started: it keeps trying, status answers)."""
    files.start_app()
    files.start_home(wait_connected=False)
    wait_for(lambda: files.status(files.home_config, files.home), what="daemon status")
    yield files


def test_a_second_daemon_on_the_same_config_is_one_line(daemon: World) -> None:
    result = tunneld("run", "-c", str(daemon.home_config))
    one_line_error(
        result, "already running", f"tunneld status -c {daemon.home_config}", "control socket"
    )
    assert daemon.home.alive()  # the first one is untouched
    assert daemon.status(daemon.home_config, daemon.home) is not None


@pytest.mark.parametrize("form", [["--json"], []], ids=["json", "text"])
def test_status_into_a_closed_pipe_ends_quietly(daemon: World, form: list[str]) -> None:
    # `tunneld status | head -1` once head has gone: every write gets EPIPE.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [PY, "-m", "tunneld", "status", "-c", str(daemon.home_config), *form],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
        )
    finally:
        os.close(write_end)
    assert result.stderr == "", result.stderr
    assert result.returncode == 141  # as a command ended by SIGPIPE, like `yes | head -1`


def test_status_piped_to_head_prints_its_first_line(daemon: World) -> None:
    shell = f"{PY} -m tunneld status -c {daemon.home_config} --json | head -1"
    result = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, timeout=30)
    assert result.stdout == "{\n" and result.stderr == "", result


# --- 2. check-config checks what run needs -------------------------------------------------


def pem_garbage(path: Path) -> Path:
    path.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    return path


@pytest.mark.parametrize(
    ("table", "key", "extra"),
    [
        ("relay", "ca_file", {}),
        ("tls", "certificate", {}),
        ("tls", "private_key", {}),
        ("acme", "ca_file", {"acme": {"enabled": True, "agree_tos": True}}),
        ("upstream", "ca_file", {"upstream": {"url": "https://127.0.0.1:8123"}}),
    ],
)
@pytest.mark.parametrize("fault", ["missing", "garbage"])
def test_check_config_opens_every_file_of_a_home_config(
    files: World, table: str, key: str, extra: dict[str, dict[str, object]], fault: str
) -> None:
    bad = files.root / f"bad-{key}.pem"
    if fault == "garbage":
        pem_garbage(bad)
    tables: dict[str, dict[str, object]] = {t: dict(v) for t, v in extra.items()}
    if table == "tls":  # a pair: the other half is a good file
        tables["tls"] = {
            "certificate": str(files.root / "relay.crt"),
            "private_key": str(files.root / "relay.key"),
        }
    tables.setdefault(table, {})[key] = str(bad)
    write_home(files, **tables)
    result = tunneld("check-config", "-c", str(files.home_config))
    one_line_error(result, f"{files.home_config}: [{table}] {key}", str(bad))
    assert "valid" not in result.stdout
    # run says the same, in one line, before starting anything.
    run = tunneld("run", "-c", str(files.home_config))
    one_line_error(run, f"{files.home_config}: [{table}] {key}")


def test_check_config_blames_a_certificate_and_key_that_are_not_a_pair(files: World) -> None:
    other = files.root / "other.key"
    from tunneld.pki import generate_private_key, write_private_key

    write_private_key(generate_private_key(), other)
    write_home(files, tls={"certificate": str(files.root / "relay.crt"), "private_key": str(other)})
    result = tunneld("check-config", "-c", str(files.home_config))
    one_line_error(result, "[tls] certificate / private_key", "do not make a pair")


@pytest.mark.parametrize(
    "key", ["certificate", "private_key", "token_public_key", "token_private_key"]
)
@pytest.mark.parametrize("fault", ["missing", "garbage"])
def test_check_config_opens_every_file_of_a_relay_config(
    files: World, key: str, fault: str
) -> None:
    bad = files.root / f"bad-{key}.pem"
    if fault == "garbage":
        pem_garbage(bad)
    files.write_relay_config(**{key: str(bad)})
    result = tunneld("check-config", "-c", str(files.relay_config))
    one_line_error(result, f"{files.relay_config}: [relay] {key}", str(bad))
    assert "valid" not in result.stdout


def test_the_relay_itself_does_not_need_the_signing_key(files: World) -> None:
    # Only `token issue` reads token_private_key; a relay running as its own user that
    # may not read it (root's 0600 file) still starts.
    files.write_relay_config(token_private_key=str(files.root / "elsewhere.key"))
    files.relay = files.spawn(
        "relay", [PY, "-m", "tunneld", "relay", "-c", str(files.relay_config)]
    )
    wait_for(lambda: files.status(files.relay_config, files.relay), what="relay status")


def test_check_config_passes_a_relay_config_whose_files_are_good(files: World) -> None:
    result = tunneld("check-config", "-c", str(files.relay_config))
    assert result.returncode == 0, result.stderr
    assert "valid relay config" in result.stdout and result.stderr == ""


@pytest.mark.parametrize("token", ["garbage", "REPLACE-WITH-TOKEN", "tunneld1.not-a-token"])
@pytest.mark.parametrize("where", ["token", "token_file"])
def test_a_token_that_is_not_a_tunneld_token_is_an_error(
    files: World, token: str, where: str
) -> None:
    if where == "token":
        write_home(files, relay={"token": token})
    else:
        (files.root / "token.txt").write_text(token + "\n")
        write_home(files, relay={"token": None, "token_file": str(files.root / "token.txt")})
    result = tunneld("check-config", "-c", str(files.home_config))
    line = one_line_error(result, f"{files.home_config}: [relay] {where}", "tunneld token issue")
    if token == "REPLACE-WITH-TOKEN":
        assert "placeholder" in line
    else:
        assert "not a tunneld token" in line and token not in line
    # Not a retry loop at run time either: run refuses at once.
    run = tunneld("run", "-c", str(files.home_config), timeout=20)
    one_line_error(run, f"[relay] {where}")


def test_an_expired_token_or_other_hostnames_are_warnings(files: World) -> None:
    key = load_private_key(files.root / "token.key")
    day = 86400.0
    expired = issue_token(
        key, hostnames=[HOME_HOST], subject="a", ttl=day, now=time.time() - 3 * day
    )
    write_home(files, relay={"token": expired})
    result = tunneld("check-config", "-c", str(files.home_config))
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr and "[relay] token" in result.stderr
    assert "expired at" in result.stderr and expired not in result.stderr + result.stdout
    assert "valid home daemon config" in result.stdout

    other = issue_token(key, hostnames=["other.test"], subject="a", ttl=day)
    write_home(files, relay={"token": other})
    result = tunneld("check-config", "-c", str(files.home_config))
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr and "[tls] hostnames" in result.stderr
    assert f"does not allow {HOME_HOST}" in result.stderr and "other.test" in result.stderr


# --- 3. errors blame the right key --------------------------------------------------------


@pytest.mark.parametrize("key", ["certificate", "private_key"])
def test_relay_with_a_missing_certificate_file_names_that_key(files: World, key: str) -> None:
    missing = files.root / f"missing-{key}.pem"
    files.write_relay_config(**{key: str(missing)})
    result = tunneld("relay", "-c", str(files.relay_config))
    line = one_line_error(result, f"{files.relay_config}: [relay] {key}", str(missing))
    assert "listen" not in line


def test_connect_to_accepts_host_and_port(files: World) -> None:
    files.start_app()
    files.start_relay()
    # The URL names a port nothing listens on; connect_to names the relay's real one.
    write_home(
        files,
        relay={
            "url": "wss://relay.test:18443/v1/tunnel",
            "connect_to": f"127.0.0.1:{files.relay_port}",
        },
    )
    check = tunneld("check-config", "-c", str(files.home_config))
    assert check.returncode == 0, check.stderr
    files.home = files.spawn("home", [PY, "-m", "tunneld", "run", "-c", str(files.home_config)])
    wait_for(
        lambda: (files.status(files.home_config, files.home) or {}).get("state") == "connected",
        what="connected through connect_to host:port",
    )


def test_connect_to_names_the_address_it_dialed(files: World) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: refused
        write_home(
            files,
            relay={"url": "wss://relay.test:18443/v1/tunnel", "connect_to": f"127.0.0.1:{port}"},
        )
        files.home = files.spawn("home", [PY, "-m", "tunneld", "run", "-c", str(files.home_config)])
        st = wait_for(
            lambda: (s := files.status(files.home_config, files.home)) and s["last_error"] and s,
            what="a connection error",
        )
    assert f"127.0.0.1:{port}" in st["last_error"], st["last_error"]


@pytest.mark.parametrize("value", ["127.0.0.1:x", "relay.test:99999", "a b", "[::1]"])
def test_a_bad_connect_to_is_refused_with_the_expected_form(files: World, value: str) -> None:
    write_home(files, relay={"connect_to": value})
    result = tunneld("check-config", "-c", str(files.home_config))
    one_line_error(result, f"{files.home_config}: [relay] connect_to", '"192.0.2.7:8443"')


# --- 4. status for a user who may not open the socket -------------------------------------


NOBODY = 65534


def _status_as(config: Path, uid: int, gid: int) -> tuple[int, str, str]:
    """`tunneld status -c config` (the real CLI) in a child process running as uid/gid."""
    # Imported here: the other user may not read the interpreter's own library folder.
    import grp  # noqa: F401
    import pwd  # noqa: F401

    import tunneld.cli
    import tunneld.config
    import tunneld.control  # noqa: F401

    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            import sys

            sys.stdout = os.fdopen(1, "w")
            sys.stderr = os.fdopen(2, "w")
            from tunneld.cli import main

            code = main(["status", "-c", str(config)])
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException as exc:  # noqa: BLE001 - report anything to the parent
            os.write(2, repr(exc).encode())
        finally:
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    out, err = b"", b""
    while data := os.read(out_r, 65536):
        out += data
    while data := os.read(err_r, 65536):
        err += data
    os.close(out_r)
    os.close(err_r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(), err.decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_status_without_access_to_the_socket_exits_4_and_the_group_advice_works(
    files: World,
) -> None:
    run = Path(tempfile.mkdtemp(prefix="tunneld-perm-"))
    try:
        run.chmod(0o755)  # like /run/tunneld for its group: traversable
        files.start_app()
        write_home(files, daemon={"control_socket": str(run / "home.sock")})
        config = run / "tunneld.toml"  # readable by the other user, as 0640 root:tunneld is
        config.write_text(files.home_config.read_text())
        config.chmod(0o644)
        files.home = files.spawn("home", [PY, "-m", "tunneld", "run", "-c", str(config)])
        wait_for(lambda: files.status(config, files.home), what="daemon status")
        sock = run / "home.sock"
        st = sock.stat()
        assert stat.S_IMODE(st.st_mode) == 0o660  # owner and group, as the advice says

        code, out, err = _status_as(config, NOBODY, NOBODY)
        assert code == 4, (code, out, err)
        assert "permission denied" in err and "not running" not in out + err
        assert f"group {__import__('grp').getgrgid(st.st_gid).gr_name}" in err

        # The advice holds: a member of the socket's group gets the status.
        code, out, err = _status_as(config, NOBODY, st.st_gid)
        assert code in (0, 1), (code, out, err)
        assert "tunneld " in out and err == ""
    finally:
        files.stop_all()
        import shutil

        shutil.rmtree(run, ignore_errors=True)


def test_status_json_of_a_stopped_daemon_still_says_not_running(files: World) -> None:
    write_home(files)
    result = tunneld("status", "-c", str(files.home_config), "--json")
    assert result.returncode == 3
    assert json.loads(result.stdout)["state"] == "not running"


# --- 5. ACME consent ---------------------------------------------------------------------


def test_acme_stays_off_until_the_terms_are_agreed_to_and_status_says_why(files: World) -> None:
    terms = "https://letsencrypt.org/repository/"
    # Enabled, pointed at a directory nobody serves: with consent missing it is never asked.
    write_home(files, acme={"enabled": True, "directory": "https://127.0.0.1:9/directory"})
    check = tunneld("check-config", "-c", str(files.home_config))
    assert check.returncode == 0, check.stderr
    assert "[acme] agree_tos" in check.stderr and terms in check.stderr
    files.start_app()
    files.home = files.spawn("home", [PY, "-m", "tunneld", "run", "-c", str(files.home_config)])
    st = wait_for(lambda: files.status(files.home_config, files.home), what="daemon status")
    assert st["certificate"]["managed"] == "bootstrap"
    assert st["certificate"]["renewal"]["state"] == "disabled"
    assert any("agree_tos" in w and terms in w for w in st["warnings"]), st["warnings"]
    text = tunneld("status", "-c", str(files.home_config))
    assert "WARNING: ACME is off: [acme] agree_tos is false" in text.stdout
    assert "ordering" not in files.home.log()  # no order was attempted
