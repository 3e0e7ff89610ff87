"""Auth and isolation against real processes: a relay, daemon A (home.test) and daemon B
(b.test) side by side.

test_tunnel.py shows how a daemon reports each refusal; here the relay's own answers are
checked directly at the handshake for forged, expired, re-signed, truncated, garbage and
empty tokens; a session can never receive a hostname its token does not name; the control
sockets refuse other users; and no secret reaches logs, status or metrics.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import ssl
import stat
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import trio

from tests.integration.harness import (
    HOME_HOST,
    PY,
    RELAY_HOST,
    Proc,
    World,
    iter_recv,
    open_raw_session,
    split_response,
    tunnel_headers,
    tunnel_upgrade,
    tunneld,
    wait_for,
)
from tunneld.control import get_json
from tunneld.tokens import issue_token, load_private_key
from tunneld.wire.events import Hello

pytestmark = pytest.mark.integration

B_HOST = "b.test"
NOBODY = 65534


@dataclass
class Daemon:
    name: str
    proc: Proc
    config: Path
    socket: Path
    token: str

    def status(self) -> dict[str, Any]:
        return control_json(self.socket, "/v1/status")


@dataclass
class Site:
    world: World
    run: Path  # control sockets, in a directory other users can traverse
    a: Daemon  # token and config: home.test only
    b: Daemon  # token and config: b.test only
    secrets: list[str]  # every token the tests send, to look for later

    @property
    def relay_socket(self) -> Path:
        return self.run / "relay.sock"


def control_json(sock: Path, path: str) -> dict[str, Any]:
    value = trio.run(partial(get_json, sock, path, timeout=10))
    assert isinstance(value, dict)
    return value


def control_text(sock: Path, path: str) -> str:
    """A raw GET on a control socket (as root): the body, whatever its type."""
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(str(sock))
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        status, _, body = split_response(b"".join(iter_recv(conn)))
    assert status == 200, (path, body[:200])
    return body.decode()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    run = Path(tempfile.mkdtemp(prefix="tunneld-auth-"))
    run.chmod(0o755)  # like /run/tunneld: the socket file's mode is the gate
    world = World(tmp_path_factory.mktemp("auth") / "w")
    try:
        world.start_app()
        world.start_relay(control_socket=str(run / "relay.sock"), metrics_listen="127.0.0.1:0")
        token_b = world.issue_token(B_HOST)
        world.write_home_config(
            token_b,
            tls={"hostnames": [B_HOST]},
            daemon={
                "state_directory": str(world.root / "state-b"),
                "control_socket": str(run / "b.sock"),
                "metrics_listen": "127.0.0.1:0",
            },
        )
        b_config = world.root / "b.toml"
        world.home_config.rename(b_config)
        b_proc = world.spawn("home-b", [PY, "-m", "tunneld", "run", "-c", str(b_config)])
        token_a = world.issue_token(HOME_HOST)
        world.start_home(
            token_a,
            daemon={"control_socket": str(run / "a.sock"), "metrics_listen": "127.0.0.1:0"},
        )
        a = Daemon("a", world.home, world.home_config, run / "a.sock", token_a)
        b = Daemon("b", b_proc, b_config, run / "b.sock", token_b)
        wait_for(lambda: b.status()["state"] == "connected", what="daemon B connected")
        yield Site(world, run, a, b, [token_a, token_b])
    finally:
        world.stop_all()
        shutil.rmtree(run, ignore_errors=True)


# --- tokens at the handshake ----------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _flip_signature(token: str) -> str:
    prefix, claims, sig = token.split(".")
    raw = bytearray(_unb64(sig))
    raw[len(raw) // 2] ^= 0x01
    return f"{prefix}.{claims}.{_b64(bytes(raw))}"


def _add_hostname(token: str) -> str:
    prefix, claims, sig = token.split(".")
    obj = json.loads(_unb64(claims))
    obj["hostnames"].append(B_HOST)
    return f"{prefix}.{_b64(json.dumps(obj).encode())}.{sig}"


def _resign(token: str, world: World) -> str:
    # The same claims, signed by a key the relay does not trust.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    prefix, claims, _ = token.split(".")
    sig = Ed25519PrivateKey.generate().sign(f"{prefix}.{claims}".encode())
    return f"{prefix}.{claims}.{_b64(sig)}"


def _expired(token: str, world: World) -> str:
    key = load_private_key(world.root / "token.key")
    day = 86400.0
    return issue_token(key, hostnames=[HOME_HOST], subject="a", ttl=day, now=time.time() - 2 * day)


def _cut(at: Callable[[str], int]) -> Callable[[str, World], str]:
    return lambda token, world: token[: at(token)]


TOKEN_CASES: dict[str, tuple[Callable[[str, World], str], str]] = {
    "flipped-signature": (lambda t, w: _flip_signature(t), "bad_signature"),
    "claims-widened": (lambda t, w: _add_hostname(t), "bad_signature"),
    "resigned-other-key": (_resign, "bad_signature"),
    "expired": (_expired, "expired"),
    "cut-in-prefix": (_cut(lambda t: 5), "bad_token"),
    "cut-after-prefix": (_cut(lambda t: len("tunneld1.")), "bad_token"),
    "cut-in-claims": (_cut(lambda t: t.index(".", 9) // 2 + 5), "bad_token"),
    "cut-before-signature": (_cut(lambda t: t.rindex(".")), "bad_token"),
    "cut-after-last-dot": (_cut(lambda t: t.rindex(".") + 1), "bad_token"),
    "cut-in-signature": (_cut(lambda t: t.rindex(".") + 40), "bad_token"),
    "cut-last-char": (_cut(lambda t: len(t) - 1), "bad_token"),
    "cut-last-2-chars": (_cut(lambda t: len(t) - 2), "bad_token"),
    "garbage": (lambda t, w: "x" * 60, "bad_token"),
    "other-prefix": (lambda t, w: "tunneld2" + t[len("tunneld1") :], "bad_token"),
    "oversized": (
        lambda t, w: t.split(".")[0] + "." + "A" * 9000 + "." + t.split(".")[2],
        "bad_token",
    ),
    "empty": (lambda t, w: "", "bad_token"),
}


@pytest.mark.parametrize("case", list(TOKEN_CASES))
def test_bad_tokens_are_refused_with_a_clear_reason(site: Site, case: str) -> None:
    make, reason = TOKEN_CASES[case]
    token = make(site.a.token, site.world)
    site.secrets.append(token)
    mark = len(site.world.relay.log())
    up = tunnel_upgrade(site.world, tunnel_headers(token, (HOME_HOST,)), source="127.0.0.80")
    up.sock.close()
    assert up.status == 401, (up.status, up.body)
    answer = json.loads(up.body)
    assert answer["reason"] == reason
    assert answer["detail"] and (len(token) < 20 or token not in answer["detail"])
    wait_for(
        lambda: f"refused tunnel from 127.0.0.80: {reason}" in site.world.relay.log()[mark:],
        timeout=5,
    )


@pytest.mark.parametrize(
    "authorization", ["", "Bearer", "Basic dXNlcjpwYXNz", "bearer\tx", "Token abc"]
)
def test_missing_or_foreign_authorization_is_refused(site: Site, authorization: str) -> None:
    headers = tunnel_headers(site.a.token, (HOME_HOST,))[1:]  # everything but Authorization
    if authorization:
        headers.append(("Authorization", authorization))
    up = tunnel_upgrade(site.world, headers, source="127.0.0.81")
    up.sock.close()
    assert (up.status, up.reason()) == (401, "bad_token")


# --- hostnames: a session gets only what its token names -----------------------------------


@pytest.mark.parametrize(
    ("claimed", "refused_name"),
    [
        ((B_HOST,), B_HOST),
        ((HOME_HOST, B_HOST), B_HOST),
        ((RELAY_HOST,), RELAY_HOST),
        (("*.test",), "*.test"),
        (("home.test.evil",), "home.test.evil"),
    ],
)
def test_claims_beyond_the_token_are_refused(
    site: Site, claimed: tuple[str, ...], refused_name: str
) -> None:
    up = tunnel_upgrade(site.world, tunnel_headers(site.a.token, claimed), source="127.0.0.82")
    up.sock.close()
    assert (up.status, up.reason()) == (403, "hostname_not_allowed")
    assert refused_name in json.loads(up.body)["detail"]


def test_a_token_naming_the_relay_itself_gets_nothing(site: Site) -> None:
    key = load_private_key(site.world.root / "token.key")
    token = issue_token(key, hostnames=[RELAY_HOST], subject="evil", ttl=3600)
    site.secrets.append(token)
    up = tunnel_upgrade(site.world, tunnel_headers(token), source="127.0.0.83")
    up.sock.close()
    assert (up.status, up.reason()) == (403, "hostname_not_allowed")
    assert "relay's own hostname" in json.loads(up.body)["detail"]


def test_hostnames_compare_normalized(site: Site) -> None:
    # "C.TEST." is c.test: allowed by a token naming c.test; HELLO must name the same set.
    token = site.world.issue_token("c.test")
    site.secrets.append(token)
    session = open_raw_session(
        site.world, token, ("C.TEST.",), hello_hostnames=("c.test",), source="127.0.0.84"
    )
    try:
        assert session.welcome.hostnames == ("c.test",)
    finally:
        session.close()


def a_is_routed(site: Site) -> bool:
    status = control_json(site.relay_socket, "/v1/status")
    return any(s["hostnames"] == [HOME_HOST] and not s["going_away"] for s in status["sessions"])


def test_hello_must_claim_what_the_headers_claimed(site: Site) -> None:
    mark = len(site.world.relay.log())
    up = tunnel_upgrade(site.world, tunnel_headers(site.a.token, (HOME_HOST,)), source="127.0.0.85")
    assert up.status == 101
    from tunneld.wire.frames import encode

    up.sock.sendall(encode(Hello("0.1.0", (B_HOST,), 262144, 10)))
    up.sock.settimeout(10)
    assert b"".join(iter_recv(up.sock)) == b""  # no WELCOME: closed
    wait_for(lambda: "HELLO hostnames differ" in site.world.relay.log()[mark:], timeout=5)
    assert fingerprint_for(site, B_HOST) == site.b.status()["certificate"]["sha256"]


def fingerprint_for(site: Site, sni: str) -> str:
    """SHA-256 of the certificate a client for `sni` gets: which daemon answered."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", site.world.relay_port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname=sni) as conn:
        der = conn.getpeercert(binary_form=True)
        conn.sendall(f"GET /small HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
        try:
            status, _, body = split_response(b"".join(iter_recv(conn)))
        except ssl.SSLError:
            status, body = 0, b""
    assert (status, body) == (200, b"hello tunnel\n")
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def test_each_hostname_reaches_only_its_own_daemon(site: Site) -> None:
    a_fp = site.a.status()["certificate"]["sha256"]
    b_fp = site.b.status()["certificate"]["sha256"]
    assert a_fp != b_fp
    a_total = site.a.status()["streams"]["total"]
    b_total = site.b.status()["streams"]["total"]
    for _ in range(3):
        assert fingerprint_for(site, B_HOST) == b_fp
        assert fingerprint_for(site, HOME_HOST) == a_fp
    assert site.a.status()["streams"]["total"] == a_total + 3
    assert site.b.status()["streams"]["total"] == b_total + 3


def test_daemon_claiming_a_hostname_outside_its_token_never_gets_it(site: Site) -> None:
    world = site.world
    b_fp = site.b.status()["certificate"]["sha256"]
    world.home.stop()
    text = world.home_config.read_text()
    try:
        # A's config now claims b.test too; its token still names home.test only.
        config = tomllib.loads(text)
        config["tls"]["hostnames"] = [HOME_HOST, B_HOST]
        world.home_config.write_text(tomli_w.dumps(config))
        proc = world.spawn("home-a2", [PY, "-m", "tunneld", "run", "-c", str(world.home_config)])
        status = wait_for(
            lambda: (s := control_json_or_none(site.a.socket)) and s["last_error"] and s,
            what="A refused",
        )
        assert "hostname_not_allowed" in status["last_error"] and B_HOST in status["last_error"]
        for _ in range(3):
            assert fingerprint_for(site, B_HOST) == b_fp  # b.test still reaches B only
        status = control_json(site.a.socket, "/v1/status")  # after the probes, not before
        assert "hostname_not_allowed" in status["last_error"]
        assert B_HOST not in status["hostnames"] or status["state"] != "connected"
        proc.stop()
    finally:
        world.home_config.write_text(text)
        world.home = world.spawn(
            "home-a3", [PY, "-m", "tunneld", "run", "-c", str(world.home_config)]
        )
        site.a.proc = world.home
        wait_for(lambda: a_is_routed(site), timeout=20, what="daemon A back")


def control_json_or_none(sock: Path) -> dict[str, Any] | None:
    try:
        return control_json(sock, "/v1/status")
    except Exception:  # noqa: BLE001 - not up yet
        return None


# --- control sockets ---------------------------------------------------------------------


def test_control_sockets_are_private_files(site: Site) -> None:
    for sock in (site.a.socket, site.b.socket, site.relay_socket):
        st = sock.stat()
        assert stat.S_ISSOCK(st.st_mode)
        # The owner and its group (under systemd, the service's group `tunneld`), no one else.
        assert stat.S_IMODE(st.st_mode) == 0o660, (sock, oct(st.st_mode))
        assert st.st_gid == os.getegid()
        assert st.st_uid == os.geteuid()


def _as_nobody(sock: Path, path: str) -> tuple[str, str]:
    """Connect to `sock` from a child process running as uid 65534: (outcome, answer)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody for good, then try
        result = "error"
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX) as conn:
                conn.settimeout(10)
                try:
                    conn.connect(str(sock))
                except PermissionError:
                    result = "denied"
                else:
                    request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                    conn.sendall(request.encode())
                    result = "answer " + b"".join(iter_recv(conn)).decode("latin-1")
        except BaseException as exc:  # noqa: BLE001 - report anything to the parent
            result = f"error {exc!r}"
        finally:
            os.write(write_end, result.encode()[:60000])
            os._exit(0)
    os.close(write_end)
    chunks = []
    while data := os.read(read_end, 65536):
        chunks.append(data)
    os.close(read_end)
    os.waitpid(pid, 0)
    outcome, _, answer = b"".join(chunks).decode().partition(" ")
    return outcome, answer


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
@pytest.mark.parametrize("who", ["a", "relay"])
def test_another_user_is_refused_by_the_control_socket(site: Site, who: str) -> None:
    sock = site.a.socket if who == "a" else site.relay_socket
    # 0660, and nobody is neither the owner nor in the group: the kernel refuses it.
    assert _as_nobody(sock, "/v1/status") == ("denied", "")
    sock.chmod(0o666)  # someone widened it: the peer check still holds
    try:
        for path in ("/v1/status", "/metrics"):
            outcome, answer = _as_nobody(sock, path)
            assert outcome == "answer", (outcome, answer)
            status, _, body = split_response(answer.encode("latin-1"))
            assert status == 403 and f"uid {NOBODY}" in body.decode()
            assert "connected" not in body.decode() and "tunneld_" not in body.decode()
    finally:
        sock.chmod(0o660)
    assert control_json(sock, "/v1/status")["version"]  # the owner still gets in


# --- no secret anywhere ----------------------------------------------------------------------


def _key_material(path: Path) -> list[str]:
    """The base64 lines of a PEM private key: what a leak would show."""
    lines = path.read_text().splitlines()
    return [line for line in lines if line and not line.startswith("-----")]


def test_no_secret_in_logs_status_or_metrics(site: Site) -> None:
    world = site.world
    # Some ordinary traffic first, so every code path with a log line has run.
    for sni in (HOME_HOST, B_HOST):
        fingerprint_for(site, sni)
    keys = [
        world.root / "token.key",
        world.root / "relay.key",
        world.root / "state" / "private_key.pem",
        world.root / "state-b" / "private_key.pem",
    ]
    needles = {"PRIVATE KEY": "PRIVATE KEY"}
    for key in keys:
        for n, line in enumerate(_key_material(key)):
            needles[f"{key.parent.name}/{key.name} line {n}"] = line
    for n, token in enumerate(site.secrets):
        if len(token) >= 20:
            needles[f"token {n}"] = token
        parts = token.split(".")
        if len(parts) == 3 and len(parts[2]) >= 40:
            needles[f"token {n} signature"] = parts[2]
    assert len(needles) > 10
    # The needles are real: the token is in A's config file, the key lines in the key file.
    assert site.a.token in site.a.config.read_text()
    assert needles["w/token.key line 0"] in (world.root / "token.key").read_text()

    outputs: dict[str, str] = {
        "relay log": world.relay.log(),
        **{f"{p.name} log": p.log() for p in world.procs if p.name.startswith("home")},
    }
    configs = {"relay": world.relay_config, "a": site.a.config, "b": site.b.config}
    for name, config in configs.items():
        for args in (["--json"], []):
            result = tunneld("status", "-c", str(config), *args)
            assert result.returncode == 0, (name, result.stdout, result.stderr)
            outputs[f"{name} status {args}"] = result.stdout + result.stderr
    for name, sock in (("relay", site.relay_socket), ("a", site.a.socket), ("b", site.b.socket)):
        outputs[f"{name} metrics (control socket)"] = control_text(sock, "/metrics")
        listen = control_json(sock, "/v1/status")["metrics_listen"]
        assert listen, f"{name}: metrics_listen is not reported"
        host, port = listen[0].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            status, _, body = split_response(b"".join(iter_recv(conn)))
        assert status == 200 and b"tunneld_" in body
        outputs[f"{name} metrics (tcp)"] = body.decode()
    assert all(text.strip() for text in outputs.values()), [k for k, v in outputs.items() if not v]
    leaks = [
        (where, what)
        for where, text in outputs.items()
        for what, needle in needles.items()
        if needle in text
    ]
    assert not leaks, leaks
