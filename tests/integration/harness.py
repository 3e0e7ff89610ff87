"""Real processes on loopback: `tunneld relay`, `tunneld run`, the demo upstream app.

Everything binds port 0 and is found again through status or port files; every
wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from tunneld.pki import (
    generate_private_key,
    issue_certificate,
    make_ca,
    write_certificate,
    write_private_key,
)

PY = sys.executable
RELAY_HOST = "relay.test"
HOME_HOST = "home.test"
FAST_RELAY = {
    "client_hello_timeout": "3s",
    "ping_interval": "1s",
    "drain_timeout": "3s",
}
FAST_HOME = {
    "connect_timeout": "3s",
    "ping_interval": "1s",
    "ping_timeout": "2s",
    "backoff_initial": "0.2s",
    "backoff_max": "1s",
    "backoff_reset_after": "5s",
    "blocked_retry": "2s",
    "drain_timeout": "3s",
}


# For tests of something other than liveness (load, upstream faults, hostile HTTP):
# pings calm enough that a loaded machine's scheduling hiccup never passes for a
# dead link (FAST_* make them 1 s / 3 s).
CALM_RELAY = {"ping_interval": "5s"}
CALM_HOME = {"ping_interval": "5s", "ping_timeout": "15s"}


def client_hello(sni: str) -> bytes:
    """The first flight of a real TLS client (OpenSSL) for `sni`."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def wait_for(predicate: Any, timeout: float = 15.0, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def tunneld(
    *args: str, timeout: float = 30, check: bool = False
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "tunneld", *args], capture_output=True, text=True, timeout=timeout, check=check
    )


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


@dataclass
class World:
    """One relay, one daemon, one upstream app, their files in `root`."""

    root: Path
    procs: list[Proc] = field(default_factory=list)
    relay_port: int = 0
    app_port: int = 0
    tunnel_port: int = 0  # where the daemon dials, when not the relay itself (fault proxy)
    fault_control_port: int = 0  # the fault proxy's command port
    relay_overrides: dict[str, Any] = field(default_factory=dict)
    relay_tables: dict[str, dict[str, Any]] = field(default_factory=dict)  # [fleet], say
    home_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "run").mkdir(exist_ok=True)
        ca_key, ca_pem = make_ca("tunneld test CA")
        self.ca_file = self.root / "ca.pem"
        write_certificate(ca_pem, self.ca_file)
        key = generate_private_key()
        write_private_key(key, self.root / "relay.key")
        write_certificate(
            issue_certificate(ca_key, ca_pem, key, [RELAY_HOST]), self.root / "relay.crt"
        )
        tunneld(
            "keygen",
            "--private-key",
            str(self.root / "token.key"),
            "--public-key",
            str(self.root / "token.pub"),
            check=True,
        )
        self.relay_config = self.root / "relay.toml"
        self.home_config = self.root / "tunneld.toml"

    # -- processes ---------------------------------------------------------------
    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        log_path = self.root / f"{name}.log"
        fh = open(log_path, "ab")  # noqa: SIM115 - owned by the process
        popen = subprocess.Popen(
            args,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
        fh.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def write_relay_config(self, port: int = 0, **overrides: Any) -> None:
        relay = {
            "hostname": RELAY_HOST,
            "listen": [f"127.0.0.1:{port}"],
            "certificate": "relay.crt",
            "private_key": "relay.key",
            "token_public_key": "token.pub",
            "token_private_key": "token.key",
            "control_socket": str(self.root / "run" / "relay.sock"),
            "log_level": "debug",
            **FAST_RELAY,
            **self.relay_overrides,
            **overrides,
        }
        self.relay_config.write_text(tomli_w.dumps({"relay": relay, **self.relay_tables}))

    def start_relay(self, port: int = 0, **overrides: Any) -> Proc:
        self.write_relay_config(port, **overrides)
        proc = self.spawn("relay", [PY, "-m", "tunneld", "relay", "-c", str(self.relay_config)])
        status = wait_for(lambda: self.status(self.relay_config, proc), what="relay status")
        self.relay_port = int(status["listen"][0].rsplit(":", 1)[1])
        self.relay = proc
        return proc

    def start_app(self) -> Proc:
        port_file = self.root / "app.port"
        port_file.unlink(missing_ok=True)
        proc = self.spawn(
            "app",
            [
                PY,
                "-m",
                "tunneld.demoapp",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--port-file",
                str(port_file),
            ],
        )
        wait_for(port_file.exists, what="app port file")
        self.app_port = int(port_file.read_text().strip())
        self.app = proc
        return proc

    def issue_token(self, *hostnames: str, ttl: str = "30d", extra: list[str] | None = None) -> str:
        # Over 14 days, so status shows no "token expires soon" warning unless a test wants one.
        result = tunneld(
            "token",
            "issue",
            "-c",
            str(self.relay_config),
            *[a for h in (hostnames or (HOME_HOST,)) for a in ("--hostname", h)],
            "--ttl",
            ttl,
            *(extra or []),
            check=True,
        )
        return result.stdout.strip()

    def write_home_config(self, token: str | None = None, **sections: dict[str, Any]) -> None:
        cfg: dict[str, dict[str, Any]] = {
            "relay": {
                "url": f"wss://{RELAY_HOST}:{self.tunnel_port or self.relay_port}/v1/tunnel",
                "token": token if token is not None else self.issue_token(),
                "ca_file": str(self.ca_file),
                "connect_to": "127.0.0.1",
                **FAST_HOME,
            },
            "tls": {
                "hostnames": [HOME_HOST],
                "handshake_timeout": "3s",
                "client_hello_timeout": "3s",
            },
            "acme": {"enabled": False},
            "upstream": {"url": f"http://127.0.0.1:{self.app_port}", "connect_timeout": "2s"},
            "watchdog": {},
            "daemon": {
                "state_directory": str(self.root / "state"),
                "control_socket": str(self.root / "run" / "home.sock"),
                "log_level": "debug",
            },
        }
        for name, values in {**self.home_overrides, **sections}.items():
            cfg.setdefault(name, {}).update(values)
        self.home_config.write_text(tomli_w.dumps(cfg))

    def start_home(
        self, token: str | None = None, wait_connected: bool = True, **sections: dict[str, Any]
    ) -> Proc:
        self.write_home_config(token, **sections)
        proc = self.spawn("home", [PY, "-m", "tunneld", "run", "-c", str(self.home_config)])
        self.home = proc
        if wait_connected:
            wait_for(
                lambda: (self.status(self.home_config, proc) or {}).get("state") == "connected",
                what="home connected",
            )
        return proc

    def start_fault_proxy(self) -> Proc:
        """tests/faultproxy.py between daemon and relay; the daemon dials it.
        Faults by signal (see faultproxy.py) or by `fault()`."""
        port_file = self.root / "proxy.port"
        control_file = self.root / "proxy.control.port"
        port_file.unlink(missing_ok=True)
        control_file.unlink(missing_ok=True)
        proc = self.spawn(
            "faultproxy",
            [
                PY,
                "-m",
                "tests.faultproxy",
                "--target",
                f"127.0.0.1:{self.relay_port}",
                "--port-file",
                str(port_file),
                "--control-port-file",
                str(control_file),
            ],
        )
        # The control port file is written first, so both exist once this one does.
        wait_for(port_file.exists, what="fault proxy port file")
        self.tunnel_port = int(port_file.read_text())
        self.fault_control_port = int(control_file.read_text())
        return proc

    def fault(self, command: str, timeout: float = 10) -> str:
        """One command to the fault proxy (`pass`, `delay MS`, `throttle BPS`, `stall`,
        `resume`, `cut`, `reset`, `status`); returns its `ok ...` answer."""
        with socket.create_connection(
            ("127.0.0.1", self.fault_control_port), timeout=timeout
        ) as conn:
            conn.sendall(command.encode() + b"\n")
            answer = b""
            while not answer.endswith(b"\n"):
                data = conn.recv(4096)
                if not data:
                    break
                answer += data
        text = answer.decode().strip()
        if not text.startswith("ok"):
            raise AssertionError(f"fault proxy refused {command!r}: {text!r}")
        return text

    def start_all(self) -> None:
        self.start_app()
        self.start_relay()
        self.start_home()

    def status(self, config: Path, proc: Proc | None = None) -> dict[str, Any] | None:
        if proc is not None and not proc.alive():
            raise AssertionError(f"{proc.name} exited {proc.popen.returncode}:\n{proc.log()}")
        result = tunneld("status", "-c", str(config), "--json", timeout=10)
        if result.returncode == 3:
            return None
        try:
            value = json.loads(result.stdout)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def home_status(self) -> dict[str, Any]:
        # A busy daemon may miss one status deadline; three misses is a failure.
        for _ in range(3):
            status = self.status(self.home_config, getattr(self, "home", None))
            if status is not None:
                return status
            time.sleep(0.2)
        result = tunneld("status", "-c", str(self.home_config), "--json", timeout=10)
        raise AssertionError(f"no status: {result.returncode} {result.stdout} {result.stderr}")

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    # -- clients -----------------------------------------------------------------
    def home_cert(self) -> Path:
        return self.root / "state" / "certificate.pem"

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.home_cert()))
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def connect(
        self, source: str = "127.0.0.1", sni: str = HOME_HOST, timeout: float = 10
    ) -> ssl.SSLSocket:
        raw = socket.create_connection(
            ("127.0.0.1", self.relay_port), timeout=timeout, source_address=(source, 0)
        )
        # Like browsers and curl, a TCP end without TLS close_notify is an error.
        return self.client_context().wrap_socket(
            raw, server_hostname=sni, suppress_ragged_eofs=False
        )

    def http_get(self, path: str, source: str = "127.0.0.1", timeout: float = 30) -> bytes:
        """One HTTP/1.0-style GET through the tunnel; returns the raw response."""
        with self.connect(source, timeout=timeout) as conn:
            conn.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {HOME_HOST}\r\nConnection: close\r\n\r\n".encode()
            )
            return b"".join(iter_recv(conn))


def iter_recv(conn: socket.socket, size: int = 65536) -> Iterator[bytes]:
    while True:
        try:
            data = conn.recv(size)
        except ssl.SSLZeroReturnError:
            return
        if not data:
            return
        yield data


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


# -- a hand-driven tunnel session (hostile-input and auth tests) ------------------


def relay_endpoint(world: World, timeout: float = 10, source: str = "127.0.0.1") -> ssl.SSLSocket:
    """A TLS connection to the relay's own hostname (its /v1/tunnel endpoint)."""
    ctx = ssl.create_default_context(cafile=str(world.ca_file))
    raw = socket.create_connection(
        ("127.0.0.1", world.relay_port), timeout=timeout, source_address=(source, 0)
    )
    return ctx.wrap_socket(raw, server_hostname=RELAY_HOST)


@dataclass
class Upgrade:
    """The relay's answer to a tunnel upgrade request."""

    status: int
    headers: dict[str, str]
    body: bytes  # a refusal's JSON body; after a 101, bytes already read past the head
    sock: ssl.SSLSocket

    def reason(self) -> str:
        return str(json.loads(self.body)["reason"])


def tunnel_upgrade(
    world: World,
    headers: list[tuple[str, str]],
    timeout: float = 10,
    raw: bool = True,
    source: str = "127.0.0.1",
) -> Upgrade:
    """Send the daemon's WebSocket upgrade for /v1/tunnel with `headers` added.

    `raw` offers the tunneld-raw.1 subprotocol (mux frames straight on TLS).
    """
    from tunneld.transport.channel import RAW_SUBPROTOCOL

    sock = relay_endpoint(world, timeout, source)
    lines = [
        "GET /v1/tunnel HTTP/1.1",
        f"Host: {RELAY_HOST}:{world.relay_port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *([f"Sec-WebSocket-Protocol: {RAW_SUBPROTOCOL}"] if raw else []),
        *(f"{k}: {v}" for k, v in headers),
    ]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in buf:
        if time.monotonic() > deadline or len(buf) > 65536:
            raise AssertionError(f"no answer head from the relay: {buf[:200]!r}")
        data = sock.recv(65536)
        if not data:
            raise AssertionError(f"relay closed before answering: {buf[:200]!r}")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    status, fields, _ = split_response(head + b"\r\n\r\n")
    if status != 101:
        rest += b"".join(iter_recv(sock))  # refusals end with Connection: close
    return Upgrade(status, fields, rest, sock)


def tunnel_headers(token: str, hostnames: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """The headers a daemon sends (tunneld/home/connector.py), for this token and names."""
    from tunneld import __version__

    headers = [("Authorization", f"Bearer {token}"), ("Tunneld-Version", __version__)]
    if hostnames:
        headers.append(("Tunneld-Hostnames", ", ".join(hostnames)))
    return headers


@dataclass
class RawSession:
    """A session driven frame by frame from a test, after the real handshake.

    Behaves like a daemon only as far as a test tells it to: nothing is sent
    unless the test sends it (no PONGs, no WINDOWs). The relay's own PINGs (it
    measures the path for window tuning) are kept aside in `pings`, not returned.
    """

    sock: ssl.SSLSocket
    welcome: Any  # tunneld.wire.events.Welcome
    decoder: Any  # tunneld.wire.frames.FrameDecoder
    pings: list[Any] = field(default_factory=list)

    def send(self, *events: Any) -> None:
        from tunneld.wire.frames import encode

        self.sock.sendall(b"".join(encode(e) for e in events))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next_event(self, timeout: float = 10) -> Any:
        """The relay's next frame as an event; None when the relay ended the connection."""
        from tunneld.wire.events import Ping

        deadline = time.monotonic() + timeout
        while (event := self.decoder.next_event()) is None or isinstance(event, Ping):
            if event is not None:
                self.pings.append(event)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no frame from the relay within {timeout}s")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(262144)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError, ConnectionError):
                return None
            except TimeoutError:
                continue
            if not data:
                return None
            self.decoder.feed(data)
        return event

    def wait_closed(self, timeout: float = 15) -> list[Any]:
        """Read until the relay ends the connection; the frames it sent meanwhile.

        A stall (the relay keeps the connection open) fails after `timeout`.
        """
        events: list[Any] = []
        deadline = time.monotonic() + timeout
        while (
            event := self.next_event(max(0.0, deadline - time.monotonic()) or 0.001)
        ) is not None:
            events.append(event)
        return events

    def close(self) -> None:
        self.sock.close()


def open_raw_session(
    world: World,
    token: str,
    hostnames: tuple[str, ...],
    *,
    window: int = 262144,
    max_streams: int = 1000,
    hello_hostnames: tuple[str, ...] | None = None,
    source: str = "127.0.0.1",
) -> RawSession:
    """Upgrade with `token` over tunneld-raw.1, send HELLO, and read the WELCOME."""
    from tunneld import __version__
    from tunneld.wire.events import Hello, Welcome
    from tunneld.wire.frames import FrameDecoder

    up = tunnel_upgrade(world, tunnel_headers(token, hostnames), source=source)
    assert up.status == 101, (up.status, up.body)
    decoder = FrameDecoder()
    decoder.feed(up.body)
    session = RawSession(up.sock, None, decoder)
    names = hostnames if hello_hostnames is None else hello_hostnames
    session.send(Hello(__version__, names, window, max_streams))
    welcome = session.next_event()
    assert isinstance(welcome, Welcome), welcome
    session.welcome = welcome
    return session
