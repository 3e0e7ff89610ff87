"""The daemon's outbound session to the relay: connect, serve, reconnect forever.

Each session runs as a task of the connector's nursery. When the relay sends
GOAWAY the connector opens the next session at once while the old one drains,
so a relay restart costs no new connection more than the reconnect time.
"""

from __future__ import annotations

import logging
import math
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

import trio

from tunneld import __version__
from tunneld.checks import client_context
from tunneld.config import HomeConfig, format_listen, split_connect_to
from tunneld.errors import ProtocolError, SessionRefused, first_error
from tunneld.home.dataconns import DataDialer
from tunneld.home.watchdog.bans import BanList
from tunneld.transport.channel import Channel, ChannelClosed, open_channel
from tunneld.transport.rawsock import SESSION_UNSENT, RawSocketStream, raw_stream
from tunneld.transport.session import (
    MuxSession,
    StreamHandler,
    tuned_connection,
)
from tunneld.transport.splice import aclose_quietly
from tunneld.transport.tls import SESSION_RECEIVE, TLSStream
from tunneld.wire import events as ev
from tunneld.wire.mux import Role

log = logging.getLogger("tunneld.connector")

TUNNEL_PATH = "/v1/tunnel"
BAN_CHUNK = 4096  # BAN entries per frame: well under the 1 MiB frame limit


@dataclass
class SessionOutcome:
    """What one session attempt came to; read by the reconnect loop."""

    done: trio.Event = field(default_factory=trio.Event)
    connected_at: float | None = None  # monotonic
    goaway: int | None = None  # GOAWAY code received
    refused: SessionRefused | None = None
    error: str | None = None
    renew: bool = False  # replaced on purpose (reload): drains once the next one is up
    drain: trio.Event = field(default_factory=trio.Event)


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
    dialers: dict[MuxSession, DataDialer] = field(default_factory=dict)  # data connections
    relay_access: bool | None = None  # the relay said it enforces [access] (WELCOME)

    def totals(self) -> tuple[int, int]:
        inn = self.bytes_in + sum(s.bytes_in for s in self.sessions)
        out = self.bytes_out + sum(s.bytes_out for s in self.sessions)
        return inn, out


class Connector:
    def __init__(
        self, config: HomeConfig, handler: StreamHandler, bans: BanSource | None = None
    ) -> None:
        self.config = config
        self.cfg = config.relay
        self.handler = handler
        self.state = ConnectorState()
        self.reconfigure(config)
        self._stopping = False
        self.connected = trio.Event()  # set once the first session is up
        self._bans = bans
        if bans is not None:
            bans.bans.listeners.append(self.push_bans)
        self._current: SessionOutcome | None = None
        self._renewing: list[SessionOutcome] = []  # sessions to drain once a new one is up
        self._wake = trio.Event()  # ends a reconnect delay early
        # [access] rules (home/access.py), sent after the ban list on every session.
        self.access_rules: Callable[[], tuple[ev.AccessRule, ...]] | None = None

    def reconfigure(self, config: HomeConfig) -> None:
        """Use `config` from the next connection attempt on (reload); raises ConfigError
        naming `[relay] ca_file` (and changes nothing) if the new CA file cannot be loaded."""
        url = urlsplit(config.relay.url)
        secure = url.scheme == "wss"
        label = f"{config.path}: [relay] ca_file"
        context = client_context(label, config.relay.ca_file) if secure else None
        self.config, self.cfg = config, config.relay
        self._host = url.hostname or ""
        self._secure = secure
        self._port = url.port or (443 if secure else 80)
        # Where to dial: `connect_to` (host, or host:port) replaces the URL's host and port
        # for the TCP connection only; TLS and the handshake still use the URL's name.
        if config.relay.connect_to:
            self._dial = split_connect_to(config.relay.connect_to, self._port)
        else:
            self._dial = (self._host, self._port)
        self._path = url.path or TUNNEL_PATH
        self._ssl: ssl.SSLContext | None = context

    def renew(self) -> None:
        """Open a fresh session now (new hostnames, token, relay); the current one keeps
        serving until the fresh one is up, then drains its open streams."""
        current = self._current
        if current is None or current.done.is_set():
            self._wake.set()  # waiting to reconnect: do it now, with the new config
            return
        if not current.renew:
            current.renew = True
            self._renewing.append(current)
        if current.connected_at is not None:
            current.done.set()  # the run loop starts the next session at once

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        failures = 0
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                outcome = self._current = SessionOutcome()
                nursery.start_soon(self._session, outcome)
                await outcome.done.wait()
                if self._stopping:
                    return
                if outcome.renew and outcome.error is None:
                    failures = 0
                    continue  # reload: the next session now, this one drains after
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
                # A session kept from before a reload may still serve: then stay connected.
                serving = any(not o.drain.is_set() for o in self._renewing)
                if outcome.refused is not None and outcome.refused.reason == "version_blocked":
                    delay = self.cfg.blocked_retry
                    self.state.state = "connected" if serving else "blocked"
                else:
                    # Full jitter: fast first retries, spread out, capped.
                    ceiling = min(
                        self.cfg.backoff_max, self.cfg.backoff_initial * 2 ** (failures - 1)
                    )
                    delay = random.uniform(0, ceiling)
                    self.state.state = "connected" if serving else "connecting"
                self.state.next_retry = time.time() + delay
                log.info("reconnecting in %.1fs", delay)
                self._wake = trio.Event()
                with trio.move_on_after(delay):
                    await self._wake.wait()
                self.state.next_retry = None
                self.state.reconnects += 1

    async def shutdown(self) -> None:
        """GOAWAY and a clean WebSocket close on every session (the caller bounds it)."""
        self._stopping = True
        self.state.state = "stopping"
        sessions = list(self.state.sessions)
        for session in sessions:
            session.goaway(ev.ResetCode.SHUTDOWN, "daemon shutting down")
            session.close("daemon shutting down")
        for session in sessions:
            await session.finished.wait()

    def push_bans(self, entries: tuple[ev.BanEntry, ...], replace: bool = False) -> None:
        """Send ban changes (or with `replace`, the whole list) to every live session."""
        for session in list(self.state.sessions):
            _send_bans(session, entries, replace=replace)

    def push_access(self, rules: tuple[ev.AccessRule, ...]) -> None:
        """Send the whole [access] policy to every live session (a change or a reload)."""
        for session in list(self.state.sessions):
            _send_access(session, rules)

    def _headers(self) -> list[tuple[str, str]]:
        return [
            ("Authorization", "Bearer " + self.cfg.token),
            ("Tunneld-Version", __version__),
            ("Tunneld-Hostnames", ", ".join(self.config.tls.hostnames)),
            ("User-Agent", f"tunneld/{__version__}"),
        ]

    async def _open_data(self) -> RawSocketStream:
        """A plain TCP connection to where the session goes (a data connection)."""
        address, port = self._dial
        return raw_stream(await trio.open_tcp_stream(address, port))

    def _target(self) -> str:
        """The address dialed, as errors name it: the URL's host and port, or with
        `connect_to` the address really dialed and, in brackets, the name TLS checks."""
        url_target = format_listen((self._host, self._port))
        if not self.cfg.connect_to:
            return url_target
        return f"{format_listen(self._dial)} ({url_target})"

    async def _session(self, outcome: SessionOutcome) -> None:
        try:
            try:
                await self._connect_and_serve(outcome)
            except BaseExceptionGroup as group:
                raise first_error(group) from None
        except SessionRefused as exc:
            outcome.refused = exc
            outcome.error = str(exc)
        except ChannelClosed as exc:
            outcome.error = f"connection to {self._target()} failed: {exc}"
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            outcome.error = f"connection to {self._target()} failed: {_cause(exc)}"
        except trio.TooSlowError:
            outcome.error = f"no answer from {self._target()} within {self.cfg.connect_timeout:g}s"
        except ProtocolError as exc:
            outcome.error = f"protocol error: {exc}"
        finally:
            if outcome.error:
                if outcome.connected_at is None:
                    log.warning("session failed: %s", outcome.error)
                self.state.last_error = outcome.error
            if outcome in self._renewing:
                self._renewing.remove(outcome)
            outcome.done.set()

    async def _connect_and_serve(self, outcome: SessionOutcome) -> None:
        # Resolved afresh on every attempt (open_tcp_stream), so a relay that
        # moved is found again; `connect_to` overrides the address only, TLS
        # still verifies the URL's name.
        address, port = self._dial
        log.info(
            "connecting to %s",
            self.cfg.url + (f" at {self._target()}" if self.cfg.connect_to else ""),
        )
        timeout = self.cfg.connect_timeout
        with trio.fail_after(timeout):
            tcp = raw_stream(await trio.open_tcp_stream(address, port), unsent=SESSION_UNSENT)
        stream: trio.abc.Stream = tcp
        try:
            if self._ssl is not None:
                stream = TLSStream(
                    tcp,
                    self._ssl,
                    server_side=False,
                    server_hostname=self._host,
                    receive_size=SESSION_RECEIVE,
                )
                with trio.fail_after(timeout):
                    await stream.do_handshake()
            host = self._host if self._port in (80, 443) else f"{self._host}:{self._port}"
            with trio.fail_after(timeout):
                channel = await open_channel(stream, host, self._path, self._headers())
            await self._serve(channel, outcome)
        finally:
            await aclose_quietly(stream)

    async def _serve(self, ws: Channel, outcome: SessionOutcome) -> None:
        daemon = self.config.daemon
        conn = tuned_connection(
            Role.HOME,
            window=daemon.stream_window,
            max_window=daemon.max_stream_window,
            budget=daemon.session_buffer,
            max_streams=daemon.max_streams,
        )
        drain = outcome.drain
        dialer = (
            DataDialer(self._open_data, daemon.data_connections, self.cfg.connect_timeout)
            if daemon.data_connections
            else None
        )

        def on_event(event: ev.Event) -> None:
            if isinstance(event, ev.Dial):
                if dialer is not None:
                    dialer.dial_soon(event.ticket)
            elif isinstance(event, ev.GoAway):
                outcome.goaway = event.code
                if outcome.renew:
                    log.info("session %s: replaced by the reloaded one, draining", mux.session_id)
                elif event.code == ev.ResetCode.REPLACED:
                    self.state.replaced = True
                    self.state.last_error = "replaced by another session"
                    log.warning("session %s replaced by another session", mux.session_id)
                else:
                    log.info("relay sent GOAWAY (%s): draining", event.reason or event.code)
                drain.set()
                outcome.done.set()

        mux = MuxSession(
            ws,
            conn,
            on_open=self.handler,
            on_event=on_event,
            attach=None if dialer is None else dialer.attach,
        )
        await mux.send_now(
            ev.Hello(
                version=__version__,
                hostnames=self.config.tls.hostnames,
                window=daemon.stream_window,
                max_streams=daemon.max_streams,
                data_connections=daemon.data_connections,
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
        # The full ban list first, in the same step that makes the session visible
        # to push_bans: no change can fall between the two.
        if self._bans is not None:
            _send_bans(mux, self._bans.ban_entries(), replace=True)
        if self.access_rules is not None:
            _send_access(mux, self.access_rules())
        st.relay_access = welcome.access
        st.sessions.append(mux)
        self.connected.set()
        for old in self._renewing:
            if old is not outcome:
                old.drain.set()  # the fresh session is up: the one it replaces drains
        if outcome.renew:
            outcome.done.set()  # renewed while connecting: it carries the old config
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
                    reason = f"no answer to ping within {self.cfg.ping_timeout:g}s"
                    log.warning("%s: session %s is dead", reason, mux.session_id)
                    # Status tells the truth now, not after the close completes.
                    if st.session_id == mux.session_id:
                        st.state, st.last_error = "connecting", f"session lost: {reason}"
                    mux.close(reason)
                    return
                except trio.BrokenResourceError:
                    return

        async def drainer() -> None:
            await drain.wait()
            if outcome.renew:
                # Reload: the relay routes nothing new here, and the open streams (a
                # WebSocket may last hours) finish however long they take; pings still
                # watch the link.
                mux.goaway(ev.ResetCode.NO_ERROR, "config reloaded")
            with trio.move_on_after(math.inf if outcome.renew else self.cfg.drain_timeout):
                await mux.idle.wait()
                while mux.streams_active:
                    await mux.idle.wait()
            mux.close("drained after GOAWAY")

        def extra(nursery: trio.Nursery) -> None:
            nursery.start_soon(pinger)
            nursery.start_soon(drainer)
            if dialer is not None and mux.data_connections:
                st.dialers[mux] = dialer
                nursery.start_soon(dialer.run)

        try:
            await mux.run(extra=extra)
        finally:
            st.sessions.remove(mux)
            st.dialers.pop(mux, None)
            st.bytes_in += mux.bytes_in
            st.bytes_out += mux.bytes_out
            if st.session_id == mux.session_id and not st.sessions:
                st.state = "stopping" if self._stopping else "connecting"
                st.session_id = None
                st.connected_since = None
            reason = mux.close_reason or "closed"
            log.info("session %s ended: %s", mux.session_id, reason)
            if outcome.goaway is None and not outcome.renew and not self._stopping:
                outcome.error = f"session lost: {reason}"


class BanSource(Protocol):
    """What the connector needs of the watchdog: the list, and where changes are announced."""

    @property
    def bans(self) -> BanList: ...

    def ban_entries(self) -> tuple[ev.BanEntry, ...]: ...


def _send_bans(session: MuxSession, entries: tuple[ev.BanEntry, ...], *, replace: bool) -> None:
    # A list too long for one frame goes as a replacing frame plus added ones.
    chunks = [entries[i : i + BAN_CHUNK] for i in range(0, len(entries), BAN_CHUNK)] or [()]
    try:
        for i, chunk in enumerate(chunks):
            session.send(ev.Ban(chunk, replace=replace and i == 0))
    except Exception as exc:  # noqa: BLE001 - a closing session; the next one gets the full list
        log.debug("could not send bans on session %s: %r", session.session_id, exc)


def _send_access(session: MuxSession, rules: tuple[ev.AccessRule, ...]) -> None:
    # An empty addition that carries the policy: a relay that predates the access key
    # ignores it (PROTOCOL.md 10), one that knows it replaces the session's policy.
    try:
        session.send(ev.Ban((), replace=False, access=rules))
    except Exception as exc:  # noqa: BLE001 - a closing session; the next one gets it all
        log.debug("could not send access rules on session %s: %r", session.session_id, exc)


def _cause(exc: BaseException) -> str:
    inner = exc.__cause__ or exc.__context__ or exc
    if isinstance(inner, BaseExceptionGroup):  # trio's "all attempts to connect failed"
        inner = first_error(inner)
    return getattr(inner, "strerror", None) or str(inner) or type(inner).__name__
