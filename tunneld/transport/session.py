"""One multiplexed session over a WebSocket, and the streams it carries.

The sans-IO `mux.Connection` decides what is legal; this module only moves
bytes: one reader task feeds WebSocket messages into it and dispatches the
events, one writer task sends what it has queued (several frames coalesced per
message). Streams never own a task: a `MuxStream` parks on a ParkingLot until
the reader gives it data or credit, so an idle stream costs a few objects.
"""

from __future__ import annotations

import abc
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
import trio_websocket

from tunneld.errors import ProtocolError, RemoteProtocolError
from tunneld.transport import contract
from tunneld.transport.channel import Channel, ChannelClosed
from tunneld.transport.splice import STREAM_ERRORS
from tunneld.wire import events as ev
from tunneld.wire.flow import Pacer, TunerStatistics, WindowTuner
from tunneld.wire.mux import Connection, Role

log = logging.getLogger("tunneld.session")

# A stream we closed drops what still arrives; past this many bytes, it is reset.
LINGER_BYTES = 256 * 1024
# Coalesce up to this many bytes of frames into one WebSocket message: big
# messages amortise WebSocket framing and masking, the main per-byte cost.
MESSAGE_BYTES = 64 * 1024
# The receive side must accept one coalesced message plus one maximal frame.
MAX_MESSAGE_SIZE = 4 * 1024 * 1024
RECEIVE_BUFFER = 256 * 1024
CLOSE_TIMEOUT = 3.0
# PONGs queued before the reader waits for the writer to send them.
PONG_BACKLOG = 1024
# A peer pings once per ping interval. More than PING_BURST PINGs at once (the
# allowance refills at PING_RATE per second) is a flood and ends the session,
# like gRPC's "too many pings".
PING_BURST = 64
PING_RATE = 4.0
GOAWAY_REASON = 200  # characters of a protocol error's text sent in GOAWAY
MAX_PINGS = 16  # unanswered PINGs remembered
PACE_SLEEP = 0.001  # the writer sleeps for pacing only when it would wait longer
# RTT probes for the window tuner (flow.py): a few right away, then a slow trickle.
RTT_PROBES_AT_START = 3
RTT_PROBE_START = 0.2
RTT_PROBE_INTERVAL = 10.0
RTT_PROBE_TIMEOUT = 30.0


def tuned_connection(
    role: Role, *, window: int, max_window: int, budget: int, max_streams: int
) -> Connection:
    """A session's mux whose stream windows follow their delivery rate (flow.py),
    from `window` up to `max_window` each, `budget` for all; static when
    `max_window` is `window`."""
    if max_window <= window:
        return Connection(role, window=window, max_streams=max_streams)
    tuner = WindowTuner(initial=window, max_window=max_window, budget=budget)
    return Connection(
        role, window=window, max_streams=max_streams, tuner=tuner, clock=time.monotonic
    )


@dataclass(frozen=True)
class SessionStatistics:
    session_id: str
    connected_since: float  # Unix time
    streams_active: int
    streams_total: int
    bytes_in: int  # WebSocket payload bytes received
    bytes_out: int
    rtt: float | None  # seconds, last ping round trip
    going_away: bool
    flow: TunerStatistics | None  # the receive windows' tuning; None when static

    def flow_json(self) -> dict[str, Any] | None:
        """The window tuning as `status` shows it."""
        f = self.flow
        if f is None:
            return None
        return {
            "min_rtt_ms": None if f.min_rtt is None else round(f.min_rtt * 1000, 2),
            "windows_bytes": f.windows_total,
            "buffer_bytes": f.budget,
            "grown": f.grown,
            "trimmed": f.trimmed,
        }


class _Ping:
    __slots__ = ("answered", "rtt", "sent")

    def __init__(self, sent: float) -> None:
        self.sent = sent
        self.rtt = 0.0
        self.answered = trio.Event()


# Where `MuxStream.deliver_to` hands data, with a non-blocking socket's `send`
# contract: the bytes taken, or OSError (BlockingIOError) when it takes none.
Sink = Callable[[bytes], int]


class ClientStream(trio.abc.HalfCloseableStream):
    """What a stream handler gets for each client connection: a MuxStream, or an
    AttachedStream (transport/attached.py) when its bytes use a data connection."""

    stream_id: int
    client_ip: str
    client_port: int
    sni: str

    @abc.abstractmethod
    def reset(self, code: int = ev.ResetCode.CANCEL) -> None:
        """Abort both directions now (the peer sees a reset, never a clean end)."""


class MuxStream(ClientStream):
    """One client connection carried by the session (a trio HalfCloseableStream).

    Received data is buffered up to the window the peer may send, so memory per
    stream is bounded by the window; nothing is allocated while idle.
    """

    def __init__(
        self, session: MuxSession, stream_id: int, client_ip: str, client_port: int, sni: str
    ) -> None:
        self._session = session
        self.stream_id = stream_id
        self.client_ip = client_ip
        self.client_port = client_port
        self.sni = sni
        self._recv: bytearray | None = None  # allocated on first data
        self._recv_eof = False
        self._error: str | None = None  # set when reset or session lost
        self._local_closed = False  # we sent EOF or RESET
        self._detached = False  # closed by us: drop incoming data
        self._discarded = 0  # bytes dropped since
        self._lot = trio.lowlevel.ParkingLot()
        self._send_conflict = False
        self._recv_conflict = False
        self._receiver_parked = False  # a receive_some waits, with nothing in hand
        self._sink: Sink | None = None  # see deliver_to
        # Attached (ATTACH): the bytes travel on a data connection, this stream keeps
        # the credit; `_on_fail` then aborts that connection when the stream fails.
        self.attached = False
        self._on_fail: Callable[[], None] | None = None

    def deliver_to(self, sink: Sink | None) -> None:
        """Hand received data straight to `sink` while the consumer waits with
        nothing buffered: the relay's client socket then gets its bytes without a
        task switch (and the daemon's TLS, `TLSStream.pass_through`). Whatever the
        sink does not take at once is buffered for `receive_some` as usual, so order
        is kept. `sink` must not block (the session reader never waits on it); the
        consumer must be its only writer and write only what it received from this
        stream."""
        self._sink = sink

    # -- fed by the session reader ------------------------------------------
    def _feed(self, data: bytes) -> None:
        if self.attached:  # its bytes belong on the data connection, not in DATA
            self.reset(ev.ResetCode.PROTOCOL_ERROR)
            return
        if self._detached:
            self._discard(len(data))
            return
        sink = self._sink
        if sink is not None and self._receiver_parked and not self._recv:
            try:
                sent = sink(data)
            except OSError:  # full (BlockingIOError) or broken: the consumer sees to it
                sent = 0
            if sent:
                self._session._acknowledge(self.stream_id, sent)
                if sent == len(data):
                    return
                data = data[sent:]
        if self._recv is None:
            self._recv = bytearray(data)
        else:
            self._recv += data
        self._lot.unpark_all()

    def _discard(self, nbytes: int) -> None:
        """Data for a stream we closed: dropped, as a closed socket drops it. Like a
        server's lingering close, a peer that goes on sending a while (the rest of an
        upload that was answered already) is not cut; one that goes on past
        LINGER_BYTES, once all we sent has left, gets RESET: a socket's RST, so a
        sender that never reads learns the stream is gone."""
        self._discarded += nbytes
        session = self._session
        if self._discarded > LINGER_BYTES and not session._conn.output_pending(self.stream_id):
            self.reset(ev.ResetCode.CANCEL)
        else:
            session._acknowledge(self.stream_id, nbytes)

    def _feed_eof(self) -> None:
        self._recv_eof = True
        self._lot.unpark_all()

    def _fail(self, why: str) -> None:
        if self._error is None:
            self._error = why
        self._recv = None
        self._lot.unpark_all()
        if self._on_fail is not None:
            self._on_fail()

    # -- attached streams: bytes on a data connection, credit here ------------
    def attach(self, on_fail: Callable[[], None]) -> None:
        """This stream's bytes travel on a data connection (transport/attached.py);
        `on_fail` aborts that connection if the stream fails (RESET, session lost)."""
        self.attached = True
        self._on_fail = on_fail

    async def credit(self) -> int:
        """Wait until the stream may send (a checkpoint); how many bytes it may now."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            self._check_sendable()
            room = self._session._conn.send_capacity(self.stream_id)
            if room > 0:
                return room
            self._session._pacer.waited(time.monotonic())
            await self._lot.park()

    def spend(self, nbytes: int) -> None:
        """`nbytes` (at most what `credit` allowed) leave on the data connection."""
        self._session._conn.spend(self.stream_id, nbytes)
        self._session.bytes_out += nbytes  # the tunnel's bytes, whichever way they went

    def took(self, nbytes: int) -> bool:
        """`nbytes` arrived on the data connection and were consumed: credit goes
        back as for DATA. False if the peer sent more than its credit."""
        try:
            if not self._session._conn.received(self.stream_id, nbytes):
                return False
        except ProtocolError:  # the session is gone: the stream fails with it
            return True
        self._session.bytes_in += nbytes
        self._session._acknowledge(self.stream_id, nbytes)
        return True

    def _wake(self) -> None:
        self._lot.unpark_all()

    @property
    def finished(self) -> bool:
        return self._error is not None or (self._local_closed and self._recv_eof)

    @property
    def error(self) -> str | None:
        """Why the stream failed (reset, session lost), or None."""
        return self._error

    # -- trio.abc.Stream ------------------------------------------------------
    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None:
            max_bytes = contract.receive_size(max_bytes, 0)
        if self._recv_conflict:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._recv_conflict = True
        try:
            # A checkpoint either way, but one scheduler pass, not two, when parking.
            yielded = False
            while True:
                if not yielded and (
                    self._recv or self._error is not None or self._recv_eof or self._detached
                ):
                    await trio.lowlevel.checkpoint()
                    yielded = True
                    continue
                if self._detached:  # closed by us, whatever happened since
                    raise trio.ClosedResourceError("stream was closed")
                if self._recv:
                    if max_bytes is None or max_bytes >= len(self._recv):
                        data = bytes(self._recv)
                        self._recv = None
                    else:
                        data = bytes(self._recv[:max_bytes])
                        del self._recv[:max_bytes]
                    self._session._acknowledge(self.stream_id, len(data))
                    return data
                if self._error is not None:
                    raise trio.BrokenResourceError(self._error)
                if self._recv_eof:
                    return b""
                self._receiver_parked = True
                try:
                    await self._lot.park()
                finally:
                    self._receiver_parked = False
                yielded = True
        finally:
            self._recv_conflict = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._send_conflict:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._send_conflict = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_sendable()
            if type(data) is bytes and data:  # the usual case: one frame, no copy
                if len(data) <= self._session._conn.send_capacity(self.stream_id):
                    self._session._send(ev.Data(self.stream_id, data))
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return
            waited = False
            view = memoryview(data).cast("B")
            while view:
                self._check_sendable()
                room = self._session._conn.send_capacity(self.stream_id)
                if room <= 0:
                    self._session._pacer.waited(time.monotonic())
                    await self._lot.park()
                    waited = True
                    continue
                chunk = view[:room]
                self._session._send(ev.Data(self.stream_id, bytes(chunk)))
                view = view[len(chunk) :]
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._send_conflict = False

    def send_nowait(self, data: bytes | bytearray) -> bool:
        """Queue `data` at once if its credit allows (True), else do nothing (False). Not
        a checkpoint: for a splice whose receive just was one (transport/splice.py)."""
        if (
            self._send_conflict
            or self._detached
            or self._error is not None
            or self._local_closed
            or len(data) > self._session._conn.send_capacity(self.stream_id)
        ):
            return False
        self._session._send(ev.Data(self.stream_id, bytes(data)))  # bytes: no copy
        return True

    async def wait_send_all_might_not_block(self) -> None:
        if self._send_conflict:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._send_conflict = True
        try:
            while True:
                self._check_sendable()
                if self._session._conn.send_capacity(self.stream_id) > 0:
                    await trio.lowlevel.checkpoint()
                    return
                await self._lot.park()
        finally:
            self._send_conflict = False

    def _check_sendable(self) -> None:
        if self._detached:
            raise trio.ClosedResourceError("stream was closed")
        if self._error is not None:
            raise trio.BrokenResourceError(self._error)
        if self._local_closed:
            raise trio.ClosedResourceError("stream already half-closed or closed")

    async def send_eof(self) -> None:
        if self._send_conflict:
            raise trio.BusyResourceError("another task is sending on this stream")
        await trio.lowlevel.checkpoint()
        if self._error is not None:
            raise trio.BrokenResourceError(self._error)
        if self._local_closed:
            return
        self._local_closed = True
        self._session._send(ev.Eof(self.stream_id))
        self._session._maybe_forget(self)

    def reset(self, code: int = ev.ResetCode.CANCEL) -> None:
        """Abort both directions now (the peer sees RESET, never a clean end)."""
        if self._error is None:
            self._error = "stream reset locally"
            self._local_closed = True
            self._recv = None
            self._session._send_reset(self.stream_id, code)
            self._session._forget(self)
        self._lot.unpark_all()

    async def aclose(self) -> None:
        """Close like a socket: what was sent is delivered (EOF), unread input dropped.

        An abnormal end must call `reset()` instead, so the peer can never
        mistake a cut stream for a complete one.
        """
        self._detached = True  # every later call is ClosedResourceError, as for a socket
        if self._error is None:
            if not self._local_closed:
                self._local_closed = True
                self._session._send_quietly(ev.Eof(self.stream_id))
            if self._recv:
                self._session._acknowledge(self.stream_id, len(self._recv))
            self._recv = None
            self._session._maybe_forget(self)
        self._lot.unpark_all()
        await trio.lowlevel.checkpoint()


StreamHandler = Callable[[ClientStream], Awaitable[None]]
Attacher = Callable[[MuxStream, bytes], ClientStream | None]


class MuxSession:
    """Runs one mux `Connection` over one WebSocket.

    `run()` owns the reader and writer tasks and every stream handler task, so
    when the session ends, all of its work ends with it.
    """

    def __init__(
        self,
        ws: Channel,
        conn: Connection,
        *,
        session_id: str = "",
        on_open: StreamHandler | None = None,
        on_event: Callable[[ev.Event], None] | None = None,
        attach: Attacher | None = None,
        ping_burst: int = PING_BURST,
    ) -> None:
        """`attach(stream, ticket)`: the stream to hand `on_open` for an ATTACH (its
        bytes on the data connection that presented `ticket`), or None to refuse it."""
        self._ws = ws
        self._conn = conn
        self.session_id = session_id
        self._on_open = on_open
        self._on_event = on_event
        self._attach = attach
        self._streams: dict[int, MuxStream] = {}
        self._wake_writer = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self.close_reason: str | None = None
        self.connected_since = time.time()
        self.streams_total = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.rtt: float | None = None
        self.going_away = False  # peer sent GOAWAY
        self.last_received = time.monotonic()
        self._pings: dict[bytes, _Ping] = {}  # by payload, until answered
        self.idle = trio.Event()  # set whenever no stream is open
        self.idle.set()
        self.finished = trio.Event()  # set once run() has closed the WebSocket
        self.protocol_error: RemoteProtocolError | None = None  # what ended the session
        self._pong_backlog = 0  # PONGs queued since the writer last drained everything
        self._ping_burst = ping_burst
        self._ping_allowance = float(ping_burst)
        self._ping_checked: float | None = None  # trio time the allowance was computed
        self._flushed = trio.Event()  # set (and replaced) each time the writer drained
        self._pacer = Pacer()
        self._least_rtt: float | None = None  # the shortest PING round trip seen

    # -- handshake helpers (run before `run`) ---------------------------------
    async def send_now(self, event: ev.Event) -> None:
        self._conn.send(event)
        await self._flush()

    async def receive_handshake(self) -> ev.Event:
        """Read until the peer's first event (HELLO or WELCOME or GOAWAY)."""
        while True:
            event = self._conn.next_event()
            if event is not ev.NEED_DATA:
                assert isinstance(event, ev.Event)
                return event
            message = await self._ws.get_message()
            self._feed_message(message)

    # -- the session ---------------------------------------------------------
    async def run(self, *, extra: Callable[[trio.Nursery], None] | None = None) -> None:
        """Serve until the WebSocket ends or a protocol error; returns the reason."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                if self._conn.tuner_statistics() is not None:
                    nursery.start_soon(self._probe_rtt)
                if extra is not None:
                    extra(nursery)
                await self._reader()
                if self.protocol_error is not None:
                    # Let the writer send the GOAWAY: cancelling it mid-write would
                    # break the transport and lose the very frame that says why.
                    self._wake_writer.set()
                    with trio.move_on_after(CLOSE_TIMEOUT / 3):
                        await self._flushed.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._closed = True
            for stream in list(self._streams.values()):
                stream._fail(self.close_reason or "tunnel session lost")
            self._streams.clear()
            self.idle.set()
            with trio.move_on_after(CLOSE_TIMEOUT) as scope:
                scope.shield = True
                try:
                    # A GOAWAY queued just before close() still leaves.
                    with trio.move_on_after(1):
                        await self._flush()
                    await self._ws.aclose()
                except Exception:  # noqa: BLE001 - closing a dead socket may fail any way
                    pass
            self.finished.set()

    def close(self, reason: str) -> None:
        """End the session now (cancels its tasks; streams see an error)."""
        if self.close_reason is None:
            self.close_reason = reason
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def open_stream(
        self, client_ip: str, client_port: int, sni: str, ticket: bytes | None = None
    ) -> MuxStream:
        """Relay side: announce a client connection (raises LocalProtocolError at the
        limit); with `ticket`, one whose bytes travel on that data connection (ATTACH:
        the caller attaches the stream to it)."""
        stream_id = self._conn.next_stream_id()
        self._send(ev.Open(stream_id, client_ip, client_port, sni, ticket))
        stream = MuxStream(self, stream_id, client_ip, client_port, sni)
        self._add(stream)
        return stream

    @property
    def data_connections(self) -> bool:
        """Both ends agreed on data connections in the handshake."""
        return self._conn.data_connections

    def send(self, event: ev.Event) -> None:
        """Queue a control event (GOAWAY, BAN, PING...) for the writer."""
        self._send(event)

    def goaway(self, code: int, reason: str) -> None:
        """Queue GOAWAY: the peer opens no new streams here, the open ones finish.

        Never raises: on a session already closed, or one that sent its GOAWAY
        already, there is nobody left to tell and it does nothing."""
        self._send_quietly(ev.GoAway(code, reason[:GOAWAY_REASON]))

    async def ping(self) -> float:
        """Send PING and wait for its PONG (the caller bounds the wait); the RTT.

        Every answered PING is also an RTT sample for the window tuner."""
        payload = os.urandom(8)
        ping = _Ping(time.monotonic())
        if len(self._pings) >= MAX_PINGS:  # unanswered ones, from waits that gave up
            del self._pings[next(iter(self._pings))]
        self._pings[payload] = ping
        try:
            self._send(ev.Ping(payload))
            await ping.answered.wait()
        finally:
            self._pings.pop(payload, None)
        return ping.rtt

    async def _probe_rtt(self) -> None:
        """PINGs that measure the path for the window tuner: a few at the start (the
        minimum is what counts, and the first may queue behind the handshake's
        frames), then one every RTT_PROBE_INTERVAL. Well under a peer's PING
        allowance (PROTOCOL.md 8)."""
        for i in range(1 << 62):  # bounded by the session's life
            try:
                with trio.move_on_after(RTT_PROBE_TIMEOUT):
                    await self.ping()
            except (ProtocolError, trio.BrokenResourceError):
                # The session is ending (a protocol error puts the connection in ERROR,
                # where only GOAWAY may be sent): run() and the reader say why.
                return
            await trio.sleep(RTT_PROBE_START if i < RTT_PROBES_AT_START else RTT_PROBE_INTERVAL)

    @property
    def streams_active(self) -> int:
        return len(self._streams)

    def statistics(self) -> SessionStatistics:
        return SessionStatistics(
            session_id=self.session_id,
            connected_since=self.connected_since,
            streams_active=len(self._streams),
            streams_total=self.streams_total,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            rtt=self.rtt,
            going_away=self.going_away,
            flow=self._conn.tuner_statistics(),
        )

    # -- internals -------------------------------------------------------------
    def _add(self, stream: MuxStream) -> None:
        self._streams[stream.stream_id] = stream
        self.streams_total += 1
        self.idle = trio.Event() if self.idle.is_set() else self.idle

    def _forget(self, stream: MuxStream) -> None:
        if self._streams.pop(stream.stream_id, None) is not None and not self._streams:
            self.idle.set()

    def _maybe_forget(self, stream: MuxStream) -> None:
        if stream.finished:
            self._forget(stream)

    def _send(self, event: ev.Event) -> None:
        if self._closed:
            raise trio.BrokenResourceError(self.close_reason or "tunnel session closed")
        self._conn.send(event)
        self._wake_writer.set()

    def _send_reset(self, stream_id: int, code: int) -> None:
        self._send_quietly(ev.Reset(stream_id, code))

    def _send_quietly(self, event: ev.Event) -> None:
        """Queue a frame for a stream that may already be closed on the wire."""
        if self._closed:
            return
        try:
            self._conn.send(event)
        except ProtocolError:
            return
        self._wake_writer.set()

    def _acknowledge(self, stream_id: int, nbytes: int) -> None:
        if self._closed or nbytes <= 0:
            return
        try:
            self._conn.acknowledge(stream_id, nbytes)
        except ProtocolError:
            return
        if self._conn.has_data_to_send():
            self._wake_writer.set()

    def _feed_message(self, message: bytes | str) -> None:
        if isinstance(message, str):
            raise RemoteProtocolError("text WebSocket message on a binary session")
        self.bytes_in += len(message)
        self.last_received = time.monotonic()
        self._conn.receive_data(message)

    async def _flush(self) -> None:
        while self._conn.has_data_to_send():
            data = self._conn.data_to_send(MESSAGE_BYTES)
            if not data:
                break
            wait = self._pacer.delay(
                len(data), time.monotonic(), self._min_rtt(), self._conn.buffered_output
            )
            if wait > PACE_SLEEP:
                await trio.sleep(wait)
            self.bytes_out += len(data)
            await self._ws.send_message(data)

    async def _writer(self) -> None:
        while True:
            await self._wake_writer.wait()
            # Let every task made runnable with us queue its frames first, so
            # they leave in one message instead of one message each.
            await trio.lowlevel.checkpoint()
            self._wake_writer = trio.Event()
            try:
                await self._flush()
            except (ChannelClosed, trio_websocket.ConnectionClosed) as exc:
                self.close(_describe_close(exc))
                return
            self._pong_backlog = 0
            self._flushed.set()
            self._flushed = trio.Event()

    async def _reader(self) -> None:
        """Dispatch events until the session ends; a violation is answered with GOAWAY.

        Events come before each read: frames that arrived with HELLO/WELCOME are
        already buffered by `receive_handshake`.
        """
        try:
            while True:
                while True:
                    event = self._conn.next_event()
                    if event is ev.NEED_DATA:
                        break
                    assert isinstance(event, ev.Event)
                    if isinstance(event, ev.ConnectionClosed):
                        self.close_reason = self.close_reason or "peer closed the session"
                        return
                    self._dispatch(event)
                    if self._pong_backlog >= PONG_BACKLOG:
                        await self._wait_flushed()
                try:
                    message = await self._ws.get_message()
                except (ChannelClosed, trio_websocket.ConnectionClosed) as exc:
                    self.close_reason = self.close_reason or _describe_close(exc)
                    return
                self._feed_message(message)
        except RemoteProtocolError as exc:
            self.protocol_error = exc
            self.close_reason = self.close_reason or f"protocol error: {exc}"
            # Sent by run()'s final flush, before the transport closes (PROTOCOL.md 7).
            self._send_quietly(ev.GoAway(exc.error_code, str(exc)[:GOAWAY_REASON]))

    async def _wait_flushed(self) -> None:
        """Read no more until our PONGs went out: a peer that floods PINGs and never
        reads its answers must not grow our memory (cf. HTTP/2's CVE-2019-9512)."""
        while self._pong_backlog >= PONG_BACKLOG:
            self._wake_writer.set()
            await self._flushed.wait()

    def _dispatch(self, event: ev.Event) -> None:
        if isinstance(event, ev.Data):
            stream = self._streams.get(event.stream_id)
            if stream is None:
                # Reset by us while the data was in flight: keep credit flowing.
                self._acknowledge(event.stream_id, len(event.data))
            else:
                stream._feed(event.data)
        elif isinstance(event, ev.Window):
            busy = self._conn.buffered_output > 0
            self._pacer.credited(event.increment, time.monotonic(), busy, self._min_rtt())
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._wake()
        elif isinstance(event, ev.Eof):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._feed_eof()
                self._maybe_forget(stream)
        elif isinstance(event, ev.Reset):
            stream = self._streams.pop(event.stream_id, None)
            if stream is not None:
                stream._fail(f"stream reset by peer ({_reset_name(event.code)})")
                if not self._streams:
                    self.idle.set()
        elif isinstance(event, ev.Open):
            self._accept(event)
        elif isinstance(event, ev.Ping):
            self._allow_ping()
            self._send(ev.Pong(event.payload))
            self._pong_backlog += 1
        elif isinstance(event, ev.Pong):
            ping = self._pings.pop(event.payload, None)
            if ping is not None:
                ping.rtt = self.rtt = time.monotonic() - ping.sent
                self._least_rtt = min(self._least_rtt or ping.rtt, ping.rtt)
                self._conn.observe_rtt(ping.rtt)
                ping.answered.set()
        else:
            if isinstance(event, ev.GoAway):
                self.going_away = True
            if self._on_event is not None:
                self._on_event(event)

    def _min_rtt(self) -> float | None:
        return self._least_rtt

    def _allow_ping(self) -> None:
        now = trio.current_time()
        if self._ping_checked is not None:
            refill = (now - self._ping_checked) * PING_RATE
            self._ping_allowance = min(float(self._ping_burst), self._ping_allowance + refill)
        self._ping_checked = now
        if self._ping_allowance < 1:
            raise RemoteProtocolError(f"PING flood: over {self._ping_burst} PINGs at once")
        self._ping_allowance -= 1

    def _accept(self, event: ev.Open) -> None:
        stream = MuxStream(self, event.stream_id, event.client_ip, event.client_port, event.sni)
        self._add(stream)
        if self._on_open is None or self._nursery is None:
            stream.reset(ev.ResetCode.REFUSED)
            return
        served: ClientStream = stream
        if event.ticket is not None:
            attached = None if self._attach is None else self._attach(stream, event.ticket)
            if attached is None:  # no such data connection here (any more)
                log.warning("stream %d: ATTACH for an unknown data connection", stream.stream_id)
                stream.reset(ev.ResetCode.REFUSED)
                return
            served = attached
        self._nursery.start_soon(self._run_handler, stream, served)

    async def _run_handler(self, stream: MuxStream, served: ClientStream) -> None:
        assert self._on_open is not None
        try:
            await self._on_open(served)
        except STREAM_ERRORS as exc:  # the peer's doing, not a bug: one line
            log.warning("stream %d from %s failed: %r", stream.stream_id, stream.client_ip, exc)
        except Exception as exc:  # one stream's failure must never end the session
            log.exception("stream %d from %s failed: %r", stream.stream_id, stream.client_ip, exc)
        finally:
            if served is not stream:  # attached: its data connection ends too
                served.reset(ev.ResetCode.CANCEL)  # a no-op once the handler closed it
            elif not stream.finished and not stream._detached:
                stream.reset(ev.ResetCode.CANCEL)


def _reset_name(code: int) -> str:
    try:
        return ev.ResetCode(code).name.lower()
    except ValueError:
        return f"code {code}"


def _describe_close(exc: Exception) -> str:
    if isinstance(exc, ChannelClosed):
        return str(exc)
    reason = getattr(exc, "reason", None)
    if reason is None:
        return "session closed"
    code = getattr(reason, "code", None)
    text = getattr(reason, "reason", None) or getattr(reason, "name", "")
    return f"session closed by peer (WebSocket {code}{': ' + text if text else ''})"
