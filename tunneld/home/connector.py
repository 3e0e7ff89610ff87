"""The daemon's outbound session to the relay: connect, serve, reconnect forever.

Each session runs as a task of the connector's nursery. When the relay sends
GOAWAY the connector opens the next session at once while the old one drains,
so a relay restart costs no new connection more than the reconnect time.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import trio
import trio_websocket

from tunneld import __version__
from tunneld.config import HomeConfig
from tunneld.errors import ProtocolError, SessionRefused, first_error
from tunneld.transport.session import (
    MAX_MESSAGE_SIZE,
    RECEIVE_BUFFER,
    MuxSession,
    StreamHandler,
)
from tunneld.transport.splice import aclose_quietly
from tunneld.wire import events as ev
from tunneld.wire.mux import Connection, Role

log = logging.getLogger("tunneld.connector")

TUNNEL_PATH = "/v1/tunnel"


@dataclass
class SessionOutcome:
    """What one session attempt came to; read by the reconnect loop."""

    done: trio.Event = field(default_factory=trio.Event)
    connected_at: float | None = None  # monotonic
    goaway: int | None = None  # GOAWAY code received
    refused: SessionRefused | None = None
    error: str | None = None


@dataclass
class ConnectorState:
    """What `status` shows about the session; mutated only by the connector."""

    state: str = "connecting"  # connecting | connected | blocked | stopping
    session_id: str | None = None
    connected_since: float | None = None  # Unix time
    last_error: str | None = None
    next_retry: float | None = None  # Unix time
    reconnects: int = 0
    replaced: bool = False
    rtt: float | None = None
    bytes_in: int = 0  # finished sessions; the live one is added on read
    bytes_out: int = 0
    sessions: list[MuxSession] = field(default_factory=list)

    def totals(self) -> tuple[int, int]:
        inn = self.bytes_in + sum(s.bytes_in for s in self.sessions)
        out = self.bytes_out + sum(s.bytes_out for s in self.sessions)
        return inn, out


def client_ssl_context(ca_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    return ctx


class Connector:
    def __init__(self, config: HomeConfig, handler: StreamHandler) -> None:
        self.config = config
        self.cfg = config.relay
        self.handler = handler
        self.state = ConnectorState()
        url = urlsplit(self.cfg.url)
        self._host = url.hostname or ""
        self._secure = url.scheme == "wss"
        self._port = url.port or (443 if self._secure else 80)
        self._path = url.path or TUNNEL_PATH
        self._ssl: ssl.SSLContext | None = (
            client_ssl_context(str(self.cfg.ca_file) if self.cfg.ca_file else None)
            if self._secure
            else None
        )
        self._stopping = False
        self.connected = trio.Event()  # set once the first session is up

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        failures = 0
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                outcome = SessionOutcome()
                nursery.start_soon(self._session, outcome)
                await outcome.done.wait()
                if self._stopping:
                    return
                if outcome.goaway is not None and outcome.goaway != ev.ResetCode.REPLACED:
                    failures = 0
                    continue  # the relay is draining us: next session now
                stable = (
                    outcome.connected_at is not None
                    and time.monotonic() - outcome.connected_at >= self.cfg.backoff_reset_after
                )
                if stable:
                    failures = 0
                failures += 1
                if outcome.refused is not None and outcome.refused.reason == "version_blocked":
                    delay = self.cfg.blocked_retry
                    self.state.state = "blocked"
                else:
                    # Full jitter: fast first retries, spread out, capped.
                    ceiling = min(
                        self.cfg.backoff_max, self.cfg.backoff_initial * 2 ** (failures - 1)
                    )
                    delay = random.uniform(0, ceiling)
                    self.state.state = "connecting"
                self.state.next_retry = time.time() + delay
                log.info("reconnecting in %.1fs", delay)
                await trio.sleep(delay)
                self.state.next_retry = None
                self.state.reconnects += 1

    async def shutdown(self) -> None:
        """GOAWAY and a clean WebSocket close on every session (the caller bounds it)."""
        self._stopping = True
        self.state.state = "stopping"
        sessions = list(self.state.sessions)
        for session in sessions:
            try:
                session.send(ev.GoAway(ev.ResetCode.SHUTDOWN, "daemon shutting down"))
            except Exception:  # noqa: BLE001 - a closing session may refuse
                pass
            session.close("daemon shutting down")
        for session in sessions:
            await session.finished.wait()

    def _headers(self) -> list[tuple[bytes, bytes]]:
        return [
            (b"Authorization", b"Bearer " + self.cfg.token.encode()),
            (b"Tunneld-Version", __version__.encode()),
            (b"Tunneld-Hostnames", ", ".join(self.config.tls.hostnames).encode()),
            (b"User-Agent", f"tunneld/{__version__}".encode()),
        ]

    async def _session(self, outcome: SessionOutcome) -> None:
        try:
            try:
                await self._connect_and_serve(outcome)
            except BaseExceptionGroup as group:
                # trio-websocket raises the relay's refusal from its reader task.
                raise first_error(group) from None
        except SessionRefused as exc:
            outcome.refused = exc
            outcome.error = str(exc)
        except trio_websocket.ConnectionRejected as exc:
            outcome.refused = _refusal(exc)
            outcome.error = str(outcome.refused)
        except trio_websocket.HandshakeError as exc:
            outcome.error = f"cannot connect to {self._host}:{self._port}: {_cause(exc)}"
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            outcome.error = f"connection to {self._host}:{self._port} failed: {_cause(exc)}"
        except trio.TooSlowError:
            outcome.error = (
                f"no answer from {self._host}:{self._port} within {self.cfg.connect_timeout:g}s"
            )
        except ProtocolError as exc:
            outcome.error = f"protocol error: {exc}"
        finally:
            if outcome.error:
                if outcome.connected_at is None:
                    log.warning("session failed: %s", outcome.error)
                self.state.last_error = outcome.error
            outcome.done.set()

    async def _connect_and_serve(self, outcome: SessionOutcome) -> None:
        # Resolved afresh on every attempt (open_tcp_stream), so a relay that
        # moved is found again; `connect_to` overrides the address only, TLS
        # still verifies the URL's name.
        address = self.cfg.connect_to or self._host
        log.info("connecting to %s", self.cfg.url)
        timeout = self.cfg.connect_timeout
        with trio.fail_after(timeout):
            tcp = await trio.open_tcp_stream(address, self._port)
        stream: trio.abc.Stream = tcp
        try:
            if self._ssl is not None:
                stream = trio.SSLStream(tcp, self._ssl, server_hostname=self._host)
                with trio.fail_after(timeout):
                    await stream.do_handshake()
            async with trio.open_nursery() as nursery:
                with trio.fail_after(timeout):
                    ws = await trio_websocket.wrap_client_stream(
                        nursery,
                        stream,  # type: ignore[arg-type]
                        self._host if self._port in (80, 443) else f"{self._host}:{self._port}",
                        self._path,
                        extra_headers=self._headers(),
                        max_message_size=MAX_MESSAGE_SIZE,
                        receive_buffer_size=RECEIVE_BUFFER,
                    )
                await self._serve(ws, outcome)
                nursery.cancel_scope.cancel()
        finally:
            await aclose_quietly(stream)

    async def _serve(self, ws: Any, outcome: SessionOutcome) -> None:
        daemon = self.config.daemon
        conn = Connection(Role.HOME, window=daemon.stream_window, max_streams=daemon.max_streams)
        drain = trio.Event()

        def on_event(event: ev.Event) -> None:
            if isinstance(event, ev.GoAway):
                outcome.goaway = event.code
                if event.code == ev.ResetCode.REPLACED:
                    self.state.replaced = True
                    self.state.last_error = "replaced by another session"
                    log.warning("session %s replaced by another session", mux.session_id)
                else:
                    log.info("relay sent GOAWAY (%s): draining", event.reason or event.code)
                drain.set()
                outcome.done.set()

        mux = MuxSession(ws, conn, on_open=self.handler, on_event=on_event)
        await mux.send_now(
            ev.Hello(
                version=__version__,
                hostnames=self.config.tls.hostnames,
                window=daemon.stream_window,
                max_streams=daemon.max_streams,
            )
        )
        with trio.fail_after(self.cfg.connect_timeout):
            welcome = await mux.receive_handshake()
        if not isinstance(welcome, ev.Welcome):
            raise ProtocolError(f"expected WELCOME, got {type(welcome).__name__}")
        mux.session_id = welcome.session_id
        outcome.connected_at = time.monotonic()
        st = self.state
        st.state, st.session_id, st.connected_since = "connected", welcome.session_id, time.time()
        st.last_error, st.replaced = None, False
        st.sessions.append(mux)
        self.connected.set()
        log.info(
            "connected to %s as session %s for %s",
            self.cfg.url,
            welcome.session_id,
            ", ".join(welcome.hostnames),
        )
        interval = self.cfg.ping_interval or welcome.ping_interval

        async def pinger() -> None:
            while True:
                await trio.sleep(interval)
                try:
                    with trio.fail_after(self.cfg.ping_timeout):
                        st.rtt = await mux.ping()
                except trio.TooSlowError:
                    log.warning("no PONG within %gs: session is dead", self.cfg.ping_timeout)
                    mux.close(f"no answer to ping within {self.cfg.ping_timeout:g}s")
                    return
                except trio.BrokenResourceError:
                    return

        async def drainer() -> None:
            await drain.wait()
            with trio.move_on_after(self.cfg.drain_timeout):
                await mux.idle.wait()
                while mux.streams_active:
                    await mux.idle.wait()
            mux.close("drained after GOAWAY")

        def extra(nursery: trio.Nursery) -> None:
            nursery.start_soon(pinger)
            nursery.start_soon(drainer)

        try:
            await mux.run(extra=extra)
        finally:
            st.sessions.remove(mux)
            st.bytes_in += mux.bytes_in
            st.bytes_out += mux.bytes_out
            if st.session_id == mux.session_id and not st.sessions:
                st.state = "stopping" if self._stopping else "connecting"
                st.session_id = None
                st.connected_since = None
            reason = mux.close_reason or "closed"
            log.info("session %s ended: %s", mux.session_id, reason)
            if outcome.goaway is None and not self._stopping:
                outcome.error = f"session lost: {reason}"


def _refusal(exc: Any) -> SessionRefused:
    reason, detail = "refused", ""
    try:
        body = json.loads(exc.body or b"{}")
        reason = str(body.get("reason", reason))
        detail = str(body.get("detail", ""))
    except (ValueError, AttributeError):
        detail = (exc.body or b"")[:200].decode("utf-8", "replace")
    return SessionRefused(exc.status_code, reason, detail or "no detail given")


def _cause(exc: BaseException) -> str:
    inner = exc.__cause__ or exc.__context__ or exc
    if isinstance(inner, BaseExceptionGroup):  # trio's "all attempts to connect failed"
        inner = first_error(inner)
    return getattr(inner, "strerror", None) or str(inner) or type(inner).__name__
