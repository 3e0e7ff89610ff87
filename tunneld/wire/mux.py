"""The multiplexer state machine (sans-IO, h11 shaped; PROTOCOL.md is the reference).

The I/O layer feeds received bytes with `receive_data` (b"" = transport EOF),
pulls events with `next_event` until NEED_DATA, queues events with `send`, and
writes what `data_to_send` returns. Nothing here blocks, sleeps or does I/O.

Session states (`Connection.state`)
-----------------------------------
Handshake transitions; any other frame before OPEN is a protocol error (a
LocalProtocolError when we try to send it, a RemoteProtocolError when it arrives)::

    role   state            event                   next state
    HOME   START            send Hello              HELLO_SENT
    HOME   HELLO_SENT       receive Welcome         OPEN
    RELAY  START            receive Hello           HELLO_RECEIVED
    RELAY  HELLO_RECEIVED   send Welcome            OPEN
    both   any              send/receive GoAway     DRAINING (the handshake may still complete)
    both   any              next_event() returns    CLOSED   (after receive_data(b""))
                            ConnectionClosed
    both   any              RemoteProtocolError     ERROR

Who may send what once the handshake is done::

    frame                               HOME -> RELAY   RELAY -> HOME
    OPEN                                no              yes (ids > 0, strictly increasing)
    DIAL, ATTACH (an Open with ticket)  no              yes, if both offered data_connections
    BAN                                 yes             no
    DATA WINDOW EOF RESET PING PONG     yes             yes
    GOAWAY                              yes (any state) yes (any state)

* After the relay *sent* or *received* GOAWAY, `send(Open)` is a
  LocalProtocolError. A home accepts OPEN in every state after the handshake,
  GOAWAY or not: an OPEN may have crossed the GOAWAY on the wire.
* A received PING is only returned from `next_event`: the mux does not answer
  it. The I/O layer sends `Pong(ping.payload)` (it owns all timing, and an
  automatic answer would double the PONGs of an I/O layer that answers too).
  Received PONGs are returned; matching them to PINGs is the I/O layer's job.
* WINDOW frames are queued by `acknowledge`, never by `send`.
* A LocalProtocolError leaves the connection unchanged (nothing was queued).
  After a RemoteProtocolError the state is ERROR: queued output is dropped,
  `receive_data`/`next_event` raise RemoteProtocolError, `send` raises
  LocalProtocolError except `send(GoAway(...))`, so the peer can be told why.

Stream states (per stream, `Connection.stream_state`)
-----------------------------------------------------
::

    state           event                     next state
    (none)          send/receive Open         OPEN
    OPEN            send Eof                  LOCAL_CLOSED
    OPEN            receive Eof               REMOTE_CLOSED
    LOCAL_CLOSED    receive Eof               CLOSED
    REMOTE_CLOSED   send Eof                  CLOSED
    any             send/receive Reset        forgotten (a sent Reset drops unsent DATA)
    CLOSED          its queued output flushed forgotten

Sending Data/Eof after our Eof is a LocalProtocolError; receiving DATA or EOF
after the peer's EOF is a RemoteProtocolError. Only live streams are kept; a
forgotten stream is any id at or below the highest id ever opened: frames for
it are in flight and silently dropped (not returned), `send(Reset)` and
`acknowledge` on it do nothing. A frame for an id above the highest ever
opened is a RemoteProtocolError.

A stream counts towards `open_streams` until it is forgotten, so the relay's
count never undercounts the home's (a CLOSED stream whose EOF is still queued
still counts): the relay checks `open_streams` against both the home's
`peer_max_streams` and its own `max_streams` before `send(Open)`, and the home
can reject any OPEN over its `max_streams`.

Flow control (per stream, credit based, no connection window)
--------------------------------------------------------------
Each side's initial send credit per stream is the window the *peer*
advertised (Hello.window for the relay, Welcome.window for the home).
`send(Data)` consumes credit when it queues, so queued output per stream is
bounded by the credit; `send_capacity` says how much fits now. Received DATA
beyond the credit we granted is a FLOW_CONTROL_ERROR. `acknowledge` returns
credit once the application consumed received bytes: a WINDOW frame is queued
when the stream's window less what the peer may still send and what we hold
unconsumed reaches half the window. Each stream's window starts at the
advertised one; with a `WindowTuner` (flow.py) it then follows the stream's
measured delivery rate, within the tuner's budget, so a WINDOW may return more
or less than was consumed. Received WINDOW events add credit and are returned,
so the I/O layer can wake writers.

Output (`data_to_send`)
-----------------------
Control frames first, in queue order; then DATA round-robin across streams
with pending output, at most `data_chunk` bytes per stream per turn (a bulk
stream cannot starve a small one); a stream's EOF follows its last DATA.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from tunneld.errors import LocalProtocolError, RemoteProtocolError
from tunneld.wire.events import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Ban,
    ConnectionClosed,
    Data,
    Dial,
    Eof,
    Event,
    FrameType,
    GoAway,
    Hello,
    Open,
    Ping,
    Pong,
    Reset,
    ResetCode,
    Welcome,
    Window,
    _NeedData,
)
from tunneld.wire.flow import StreamSample, TunerStatistics, WindowTuner
from tunneld.wire.frames import (
    HEADER,
    HEADER_SIZE,
    MAX_FRAME_SIZE,
    MAX_STREAM_ID,
    MAX_U32,
    MAX_WINDOW,
    FrameDecoder,
    encode,
)


class Role(enum.Enum):
    HOME = "home"
    RELAY = "relay"


class SessionState(enum.Enum):
    START = "start"
    HELLO_SENT = "hello_sent"  # home: waiting for WELCOME
    HELLO_RECEIVED = "hello_received"  # relay: must send WELCOME
    OPEN = "open"
    DRAINING = "draining"  # a GOAWAY was sent or received
    CLOSED = "closed"  # the transport ended cleanly
    ERROR = "error"  # the peer violated the protocol


class StreamState(enum.Enum):
    OPEN = "open"
    LOCAL_CLOSED = "local_closed"  # we sent EOF
    REMOTE_CLOSED = "remote_closed"  # the peer sent EOF
    CLOSED = "closed"  # both sent EOF; kept only until our EOF is flushed


@dataclass(frozen=True)
class MuxStatistics:
    state: SessionState
    open_streams: int  # streams not yet forgotten
    total_streams: int  # streams opened over the session's life
    streams_pending_output: int  # streams with queued DATA or EOF
    bytes_in: int  # transport bytes received
    bytes_out: int  # transport bytes returned by data_to_send
    frames_in: int
    frames_out: int
    data_bytes_in: int  # DATA payload bytes
    data_bytes_out: int
    buffered_input: int  # received bytes not yet decoded
    buffered_output: int  # queued bytes not yet returned by data_to_send (DATA headers aside)


_FRAME_TYPES: Final[dict[type[Event], FrameType]] = {
    Hello: FrameType.HELLO,
    Welcome: FrameType.WELCOME,
    Open: FrameType.OPEN,
    Data: FrameType.DATA,
    Window: FrameType.WINDOW,
    Eof: FrameType.EOF,
    Reset: FrameType.RESET,
    Ban: FrameType.BAN,
    GoAway: FrameType.GOAWAY,
    Ping: FrameType.PING,
    Pong: FrameType.PONG,
    Dial: FrameType.DIAL,
}

_S = SessionState
# (role, state, frame type) -> state after we send / receive it (the handshake).
_SEND_HANDSHAKE: Final = {
    (Role.HOME, _S.START, FrameType.HELLO): _S.HELLO_SENT,
    (Role.RELAY, _S.HELLO_RECEIVED, FrameType.WELCOME): _S.OPEN,
}
_RECEIVE_HANDSHAKE: Final = {
    (Role.RELAY, _S.START, FrameType.HELLO): _S.HELLO_RECEIVED,
    (Role.HOME, _S.HELLO_SENT, FrameType.WELCOME): _S.OPEN,
}
_BOTH_WAYS: Final = frozenset(
    {
        FrameType.DATA,
        FrameType.WINDOW,
        FrameType.EOF,
        FrameType.RESET,
        FrameType.GOAWAY,
        FrameType.PING,
        FrameType.PONG,
    }
)
# After the handshake: the frame types each role may send.
_MAY_SEND: Final = {
    Role.HOME: _BOTH_WAYS | {FrameType.BAN},
    Role.RELAY: _BOTH_WAYS | {FrameType.OPEN, FrameType.DIAL},
}
_PEER: Final = {Role.HOME: Role.RELAY, Role.RELAY: Role.HOME}
_FLOW: Final = ResetCode.FLOW_CONTROL_ERROR


@dataclass(slots=True)
class _Stream:
    send_credit: int  # bytes we may still queue
    recv_credit: int  # bytes the peer may still send
    window: int  # what recv_credit + unacked is topped up to (WINDOW frames)
    state: StreamState = StreamState.OPEN
    unacked: int = 0  # received, not yet acknowledged by the application
    sample: StreamSample | None = None  # the tuner's measurement in progress
    out: deque[memoryview] | None = None  # queued DATA; None while idle (no buffer)
    out_bytes: int = 0
    eof_queued: bool = False
    scheduled: bool = False  # in the round-robin queue


class Connection:
    """One end of a multiplexed session; see the module docstring for the rules."""

    def __init__(
        self,
        role: Role,
        *,
        window: int = 256 * 1024,
        max_streams: int = 1000,
        max_frame_size: int = MAX_FRAME_SIZE,
        data_chunk: int = 64 * 1024,
        tuner: WindowTuner | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """`tuner` (with `clock`, any monotonic seconds) sizes each stream's receive
        window from its delivery rate; without one every stream keeps `window`."""
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be between 1 and {MAX_WINDOW}")
        if not 1 <= max_streams <= MAX_U32:
            raise ValueError(f"max_streams must be between 1 and {MAX_U32}")
        if not 1 <= data_chunk <= MAX_FRAME_SIZE:
            raise ValueError(f"data_chunk must be between 1 and {MAX_FRAME_SIZE}")
        if tuner is not None and (clock is None or tuner.initial != window):
            raise ValueError("a tuner needs a clock and the same initial window")
        self.role = role
        self._window = window
        self._tuner = tuner
        self._clock = clock
        # Credit goes back at half the window consumed; a tuned window, at an eighth,
        # so the sender is never idle long enough to blur the rate the tuner measures.
        self._grant_shift = 1 if tuner is None else 3
        self._max_streams = max_streams
        self._data_chunk = data_chunk
        self._decoder = FrameDecoder(max_frame_size)
        self._phase = SessionState.START
        self._error = False
        self._closed = False
        self._eof_received = False
        self._goaway_sent = False
        self._goaway_received = False
        self._peer_window: int | None = None
        self._peer_max_streams: int | None = None
        self._data_offer = 0  # data_connections in the Hello/Welcome we sent
        self._peer_data_offer = 0  # and in the one we received
        self._streams: dict[int, _Stream] = {}
        self._last_stream_id = 0  # highest id ever opened (sent by the relay, seen by the home)
        self._next_id = 1  # relay: what next_stream_id hands out next
        self._control: deque[bytes] = deque()
        self._ready: deque[int] = deque()  # round-robin order of streams with output
        self._queued_bytes = 0
        self._total_streams = 0
        self._bytes_in = self._bytes_out = 0
        self._frames_in = self._frames_out = 0
        self._data_in = self._data_out = 0

    # --- properties -------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        if self._error:
            return SessionState.ERROR
        if self._closed:
            return SessionState.CLOSED
        if self._goaway_sent or self._goaway_received:
            return SessionState.DRAINING
        return self._phase

    @property
    def handshake_done(self) -> bool:
        return self._phase is SessionState.OPEN

    @property
    def data_connections(self) -> bool:
        """Both ends offered data connections (DIAL, ATTACH) in the handshake."""
        return self._data_offer > 0 and self._peer_data_offer > 0

    @property
    def window(self) -> int:
        """The per-stream receive window we advertise (must match our Hello/Welcome)."""
        return self._window

    @property
    def max_streams(self) -> int:
        """Most concurrent streams a home accepts (must match its Hello)."""
        return self._max_streams

    @property
    def peer_window(self) -> int | None:
        """Initial send credit per stream, once the peer's Hello/Welcome arrived."""
        return self._peer_window

    @property
    def peer_max_streams(self) -> int | None:
        """The home's Hello.max_streams (relay side), None before it arrived."""
        return self._peer_max_streams

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def goaway_sent(self) -> bool:
        return self._goaway_sent

    @property
    def goaway_received(self) -> bool:
        return self._goaway_received

    def stream_state(self, stream_id: int) -> StreamState | None:
        """The stream's state, or None once it is forgotten (or was never opened)."""
        st = self._streams.get(stream_id)
        return None if st is None else st.state

    def output_pending(self, stream_id: int) -> bool:
        """Whether DATA or EOF queued on the stream has yet to leave in data_to_send."""
        st = self._streams.get(stream_id)
        return st is not None and st.scheduled

    def send_capacity(self, stream_id: int) -> int:
        """Bytes `send(Data)` accepts on the stream now (0 if it cannot take data)."""
        st = self._streams.get(stream_id)
        if st is None or self._error or st.state in (StreamState.LOCAL_CLOSED, StreamState.CLOSED):
            return 0
        return st.send_credit

    @property
    def buffered_output(self) -> int:
        """Bytes queued and not yet returned by data_to_send."""
        return self._queued_bytes

    def has_data_to_send(self) -> bool:
        return bool(self._control or self._ready)

    def statistics(self) -> MuxStatistics:
        return MuxStatistics(
            state=self.state,
            open_streams=len(self._streams),
            total_streams=self._total_streams,
            streams_pending_output=len(self._ready),
            bytes_in=self._bytes_in,
            bytes_out=self._bytes_out,
            frames_in=self._frames_in,
            frames_out=self._frames_out,
            data_bytes_in=self._data_in,
            data_bytes_out=self._data_out,
            buffered_input=self._decoder.buffered,
            buffered_output=self._queued_bytes,
        )

    def next_stream_id(self) -> int:
        """RELAY only: reserve the id for the next Open (ids are never reused)."""
        if self.role is not Role.RELAY:
            raise LocalProtocolError("only the relay opens streams")
        sid = max(self._next_id, self._last_stream_id + 1)
        if sid > MAX_STREAM_ID:
            raise LocalProtocolError("stream ids exhausted: this session needs replacing")
        self._next_id = sid + 1
        return sid

    # --- receiving --------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the transport; b"" means the transport ended."""
        if self._error:
            raise RemoteProtocolError("the connection is in state ERROR")
        if self._eof_received:
            if data:
                raise LocalProtocolError("receive_data after the transport ended")
            return
        if not data:
            self._eof_received = True
            return
        self._bytes_in += len(data)
        self._decoder.feed(data)

    def next_event(self) -> Event | _NeedData:
        """The next event, NEED_DATA, or ConnectionClosed once the transport ended."""
        if self._error:
            raise RemoteProtocolError("the connection is in state ERROR")
        if self._closed:
            return ConnectionClosed()
        try:
            while True:  # bounded: each turn consumes one buffered frame
                frame = self._decoder.next_event()
                if frame is None:
                    if not self._eof_received:
                        return NEED_DATA
                    if self._decoder.buffered:
                        raise RemoteProtocolError("the transport ended in the middle of a frame")
                    self._closed = True
                    return ConnectionClosed()
                self._frames_in += 1
                event = self._on_frame(frame)
                if event is not None:
                    return event
        except RemoteProtocolError:
            self._enter_error()
            raise

    def _enter_error(self) -> None:
        self._error = True
        self._control.clear()
        self._ready.clear()
        if self._tuner is not None:
            for st in self._streams.values():
                self._tuner.closed(st.window)
        self._streams.clear()
        self._queued_bytes = 0

    def _on_frame(self, event: Event) -> Event | None:
        if type(event) is Data and self._phase is SessionState.OPEN:
            return self._receive_data_frame(event)  # either peer sends DATA once open
        ftype = _FRAME_TYPES[type(event)]
        if ftype is FrameType.GOAWAY:
            self._goaway_received = True
            return event
        after = _RECEIVE_HANDSHAKE.get((self.role, self._phase, ftype))
        if after is not None:
            if isinstance(event, Hello):
                if event.protocol != PROTOCOL_VERSION:
                    raise RemoteProtocolError(f"HELLO for protocol {event.protocol}")
                self._peer_window = event.window
                self._peer_max_streams = event.max_streams
                self._peer_data_offer = event.data_connections
            elif isinstance(event, Welcome):
                self._peer_window = event.window
                self._peer_data_offer = event.data_connections
            self._phase = after
            return event
        if self._phase is not SessionState.OPEN:
            expected = {
                (Role.HOME, SessionState.START): "nothing before our HELLO",
                (Role.HOME, SessionState.HELLO_SENT): "WELCOME",
                (Role.RELAY, SessionState.START): "HELLO",
                (Role.RELAY, SessionState.HELLO_RECEIVED): "nothing before our WELCOME",
            }[(self.role, self._phase)]
            raise RemoteProtocolError(f"received {ftype.name}, expected {expected}")
        peer = _PEER[self.role]
        if ftype not in _MAY_SEND[peer]:
            raise RemoteProtocolError(f"the {peer.value} may not send {ftype.name} here")
        if isinstance(event, Data):
            return self._receive_data_frame(event)
        if isinstance(event, Window):
            return self._receive_window(event)
        if isinstance(event, Eof):
            return self._receive_eof(event)
        if isinstance(event, Reset):
            st = self._lookup(event.stream_id, ftype)
            if st is None:
                return None
            self._forget(event.stream_id, st)
            return event
        if isinstance(event, Open | Dial):
            if (isinstance(event, Dial) or event.ticket is not None) and not self.data_connections:
                name = "DIAL" if isinstance(event, Dial) else "ATTACH"
                raise RemoteProtocolError(f"{name} without data connections agreed on")
            if isinstance(event, Dial):
                return event
            return self._receive_open(event)
        return event  # BAN, PING, PONG

    def _lookup(self, stream_id: int, ftype: FrameType) -> _Stream | None:
        st = self._streams.get(stream_id)
        if st is None and stream_id > self._last_stream_id:
            raise RemoteProtocolError(f"{ftype.name} for stream {stream_id}, never opened")
        return st

    def _receive_open(self, event: Open) -> Event:
        sid = event.stream_id
        if sid <= self._last_stream_id:
            raise RemoteProtocolError(
                f"OPEN for stream {sid}, not above the last stream id {self._last_stream_id}"
            )
        if len(self._streams) >= self._max_streams:
            raise RemoteProtocolError(f"OPEN over the limit of {self._max_streams} open streams")
        assert self._peer_window is not None
        self._last_stream_id = sid
        self._streams[sid] = self._new_stream()
        self._total_streams += 1
        return event

    def _receive_data_frame(self, event: Data) -> Event | None:
        st = self._lookup(event.stream_id, FrameType.DATA)
        if st is None:
            return None
        if st.state in (StreamState.REMOTE_CLOSED, StreamState.CLOSED):
            raise RemoteProtocolError(f"DATA on stream {event.stream_id} after its EOF")
        n = len(event.data)
        if n > st.recv_credit:
            raise RemoteProtocolError(
                f"DATA of {n} bytes on stream {event.stream_id} exceeds the window"
                f" ({st.recv_credit} bytes of credit left)",
                _FLOW,
            )
        st.recv_credit -= n
        st.unacked += n
        self._data_in += n
        return event

    def _receive_window(self, event: Window) -> Event | None:
        st = self._lookup(event.stream_id, FrameType.WINDOW)
        if st is None:
            return None
        st.send_credit += event.increment
        if st.send_credit > MAX_WINDOW:
            raise RemoteProtocolError(
                f"WINDOW on stream {event.stream_id} raises its credit over {MAX_WINDOW}", _FLOW
            )
        return event

    def _receive_eof(self, event: Eof) -> Event | None:
        st = self._lookup(event.stream_id, FrameType.EOF)
        if st is None:
            return None
        if st.state is StreamState.OPEN:
            st.state = StreamState.REMOTE_CLOSED
        elif st.state is StreamState.LOCAL_CLOSED:
            st.state = StreamState.CLOSED
            self._forget_if_done(event.stream_id, st)
        else:
            raise RemoteProtocolError(f"second EOF on stream {event.stream_id}")
        return event

    # --- sending ----------------------------------------------------------------

    def send(self, event: Event) -> None:
        """Queue `event`; LocalProtocolError (and nothing queued) if it is not allowed now."""
        if self._error and not isinstance(event, GoAway):
            raise LocalProtocolError("the connection is in state ERROR: only GoAway may be sent")
        if self._closed:
            raise LocalProtocolError("the connection is closed")
        if type(event) is Data and self._phase is SessionState.OPEN:
            self._send_data(event)  # either peer sends DATA once open
            return
        ftype = _FRAME_TYPES.get(type(event))
        if ftype is None:
            raise LocalProtocolError(f"{type(event).__name__} cannot be sent")
        if ftype is FrameType.GOAWAY:
            self._queue_control(encode(event))
            self._goaway_sent = True
            return
        after = _SEND_HANDSHAKE.get((self.role, self._phase, ftype))
        if after is not None:
            self._send_handshake(event, after)
            return
        if self._phase is not SessionState.OPEN or ftype in (FrameType.HELLO, FrameType.WELCOME):
            raise LocalProtocolError(
                f"the {self.role.value} cannot send {ftype.name} in state {self._phase.name}"
            )
        if ftype not in _MAY_SEND[self.role]:
            raise LocalProtocolError(f"the {self.role.value} never sends {ftype.name}")
        if isinstance(event, Data):
            self._send_data(event)
        elif isinstance(event, Eof):
            self._send_eof(event)
        elif isinstance(event, Reset):
            self._send_reset(event)
        elif isinstance(event, Open):
            self._send_open(event)
        elif isinstance(event, Window):
            raise LocalProtocolError("WINDOW frames come from acknowledge(), not send()")
        elif isinstance(event, Dial):
            self._check_data_connections("DIAL")
            self._queue_control(encode(event))
        else:  # BAN, PING, PONG
            self._queue_control(encode(event))

    def _send_handshake(self, event: Event, after: SessionState) -> None:
        frame = encode(event)  # validates every field, including the protocol version
        if isinstance(event, Hello | Welcome) and event.window != self._window:
            raise LocalProtocolError(
                f"{type(event).__name__}.window {event.window} differs from"
                f" the Connection's window {self._window}"
            )
        if isinstance(event, Hello) and event.max_streams != self._max_streams:
            raise LocalProtocolError(
                f"Hello.max_streams {event.max_streams} differs from"
                f" the Connection's max_streams {self._max_streams}"
            )
        self._queue_control(frame)
        self._phase = after
        if isinstance(event, Hello | Welcome):
            self._data_offer = event.data_connections

    def _check_data_connections(self, what: str) -> None:
        if not self.data_connections:
            raise LocalProtocolError(f"{what} without data connections agreed on")

    def _send_open(self, event: Open) -> None:
        frame = encode(event)
        if event.ticket is not None:
            self._check_data_connections("ATTACH")
        if self._goaway_sent or self._goaway_received:
            raise LocalProtocolError("no new streams once GOAWAY was sent or received")
        sid = event.stream_id
        if sid <= self._last_stream_id:
            raise LocalProtocolError(
                f"stream id {sid} is not above the last one ({self._last_stream_id})"
            )
        assert self._peer_window is not None and self._peer_max_streams is not None
        if len(self._streams) >= self._peer_max_streams:
            raise LocalProtocolError(
                f"the home accepts at most {self._peer_max_streams} open streams",
                ResetCode.REFUSED,
            )
        if len(self._streams) >= self._max_streams:  # the relay's own limit per session
            raise LocalProtocolError(
                f"at most {self._max_streams} open streams per session", ResetCode.REFUSED
            )
        self._last_stream_id = sid
        self._next_id = max(self._next_id, sid + 1)
        self._streams[sid] = self._new_stream()
        self._total_streams += 1
        self._queue_control(frame)

    def _sendable(self, stream_id: object, what: str) -> _Stream:
        if not isinstance(stream_id, int) or isinstance(stream_id, bool) or stream_id < 1:
            raise LocalProtocolError(f"bad stream id {stream_id!r}")
        st = self._streams.get(stream_id)
        if st is None:
            if stream_id <= self._last_stream_id:
                raise LocalProtocolError(f"{what} on stream {stream_id}, which is closed")
            raise LocalProtocolError(f"{what} on stream {stream_id}, never opened")
        if st.state in (StreamState.LOCAL_CLOSED, StreamState.CLOSED):
            raise LocalProtocolError(f"{what} on stream {stream_id} after our EOF")
        return st

    def _send_data(self, event: Data) -> None:
        st = self._sendable(event.stream_id, "DATA")
        data = event.data
        if not isinstance(data, bytes | bytearray | memoryview):
            raise LocalProtocolError("Data.data must be bytes")
        n = len(data)
        if n > st.send_credit:
            raise LocalProtocolError(
                f"DATA of {n} bytes on stream {event.stream_id} exceeds its send credit"
                f" of {st.send_credit} bytes",
                _FLOW,
            )
        if not n:
            return  # empty DATA is not a frame; nothing to queue
        if not isinstance(data, bytes):
            data = bytes(data)  # the caller may reuse its buffer
        st.send_credit -= n
        if st.out is None:
            st.out = deque()
        st.out.append(memoryview(data))
        st.out_bytes += n
        self._queued_bytes += n
        self._schedule(event.stream_id, st)

    def _send_eof(self, event: Eof) -> None:
        st = self._sendable(event.stream_id, "EOF")
        st.state = StreamState.LOCAL_CLOSED if st.state is StreamState.OPEN else StreamState.CLOSED
        st.eof_queued = True
        self._queued_bytes += HEADER_SIZE
        self._schedule(event.stream_id, st)

    def _send_reset(self, event: Reset) -> None:
        frame = encode(event)
        sid = event.stream_id
        st = self._streams.get(sid)
        if st is None:
            if sid <= self._last_stream_id:
                return  # already gone (the peer reset it, or it closed): nothing to abort
            raise LocalProtocolError(f"RESET on stream {sid}, never opened")
        self._forget(sid, st)
        self._queue_control(frame)

    def _schedule(self, stream_id: int, st: _Stream) -> None:
        if not st.scheduled:
            st.scheduled = True
            self._ready.append(stream_id)

    def _forget(self, stream_id: int, st: _Stream) -> None:
        """Drop a reset stream with its unsent output."""
        if st.scheduled:
            self._ready.remove(stream_id)  # O(streams with output); resets are rare
            st.scheduled = False
        self._queued_bytes -= st.out_bytes + (HEADER_SIZE if st.eof_queued else 0)
        st.out = None
        st.out_bytes = 0
        st.eof_queued = False
        self._drop(stream_id, st)

    def _forget_if_done(self, stream_id: int, st: _Stream) -> None:
        if st.state is StreamState.CLOSED and not st.scheduled:
            self._drop(stream_id, st)

    def _new_stream(self) -> _Stream:
        assert self._peer_window is not None
        window = self._window if self._tuner is None else self._tuner.opened()
        return _Stream(send_credit=self._peer_window, recv_credit=window, window=window)

    def _drop(self, stream_id: int, st: _Stream) -> None:
        del self._streams[stream_id]
        if self._tuner is not None:
            self._tuner.closed(st.window)

    def _queue_control(self, frame: bytes) -> None:
        self._control.append(frame)
        self._queued_bytes += len(frame)

    def acknowledge(self, stream_id: int, nbytes: int) -> None:
        """The application consumed `nbytes` of the stream's received DATA.

        Queues a WINDOW frame once at least half the window was consumed since
        the last one. A no-op on a forgotten stream or a closed connection.
        """
        if self._error:
            raise LocalProtocolError("the connection is in state ERROR")
        if not isinstance(stream_id, int) or not isinstance(nbytes, int) or nbytes < 0:
            raise LocalProtocolError(f"cannot acknowledge {nbytes!r} bytes on {stream_id!r}")
        if self._closed or not nbytes:
            return
        st = self._streams.get(stream_id)
        if st is None:
            if 0 < stream_id <= self._last_stream_id:
                return
            raise LocalProtocolError(f"acknowledge on stream {stream_id}, never opened")
        if nbytes > st.unacked:
            raise LocalProtocolError(
                f"acknowledging {nbytes} bytes on stream {stream_id};"
                f" only {st.unacked} were received and not yet acknowledged"
            )
        st.unacked -= nbytes
        if st.state in (StreamState.REMOTE_CLOSED, StreamState.CLOSED):
            return  # the peer sends no more: credit would be wasted
        if self._tuner is not None:
            assert self._clock is not None
            st.sample, st.window = self._tuner.consumed(st.sample, st.window, nbytes, self._clock())
        increment = st.window - st.recv_credit - st.unacked
        if increment >= max(1, st.window >> self._grant_shift):
            st.recv_credit += increment
            self._queue_control(encode(Window(stream_id, increment)))

    # --- attached streams: bytes on a data connection, credit here ----------------

    def spend(self, stream_id: int, nbytes: int) -> None:
        """`nbytes` of the stream leave on its data connection: they take send credit
        as DATA would (LocalProtocolError over it, or after our EOF)."""
        if self._error or self._closed:
            raise LocalProtocolError("the connection is not open")
        st = self._sendable(stream_id, "data")
        if not 0 <= nbytes <= st.send_credit:
            raise LocalProtocolError(
                f"{nbytes} bytes on stream {stream_id} exceed its send credit"
                f" of {st.send_credit} bytes",
                _FLOW,
            )
        st.send_credit -= nbytes
        self._data_out += nbytes

    def received(self, stream_id: int, nbytes: int) -> bool:
        """`nbytes` of the stream arrived on its data connection: they take receive
        credit as DATA would; `acknowledge` them once consumed. False if they exceed
        the credit (the peer broke flow control: reset the stream). An EOF frame on
        an attached stream does not end its bytes (the data connection's end does),
        so bytes after it are counted too. A forgotten stream's are dropped (True)."""
        if self._error or self._closed:
            raise LocalProtocolError("the connection is not open")
        st = self._streams.get(stream_id)
        if st is None:
            if 0 < stream_id <= self._last_stream_id:
                return True
            raise LocalProtocolError(f"received on stream {stream_id}, never opened")
        if nbytes > st.recv_credit:
            return False
        st.recv_credit -= nbytes
        st.unacked += nbytes
        self._data_in += nbytes
        return True

    def tuner_statistics(self) -> TunerStatistics | None:
        return None if self._tuner is None else self._tuner.statistics()

    def observe_rtt(self, rtt: float) -> None:
        """A PING round trip, in seconds, for the window tuner (ignored without one)."""
        if self._tuner is not None:
            self._tuner.observe_rtt(rtt)

    # --- output -----------------------------------------------------------------

    def data_to_send(self, max_bytes: int = 256 * 1024) -> bytes:
        """Queued frames as one bytes object (b"" if none), about `max_bytes` long.

        Stops once `max_bytes` is reached, so the result may exceed it by up to one frame.
        """
        if max_bytes < 1:
            raise LocalProtocolError("max_bytes must be positive")
        parts: list[bytes | memoryview] = []
        size = frames = 0
        control = self._control
        while control and size < max_bytes:
            frame = control.popleft()
            parts.append(frame)
            size += len(frame)
            frames += 1
        dequeued = size  # what _queued_bytes counted: control frames, payloads, EOFs
        ready, streams, chunk = self._ready, self._streams, self._data_chunk
        data_out = 0
        while ready and size < max_bytes:
            sid = ready.popleft()
            st = streams[sid]
            n = min(chunk, st.out_bytes)
            if n:
                parts.append(HEADER.pack(FrameType.DATA, 0, sid, n))
                _take(st, n, parts)
                size += HEADER_SIZE + n
                data_out += n
                frames += 1
            if st.out_bytes:
                ready.append(sid)  # back of the line: round-robin
                continue
            st.scheduled = False
            if st.eof_queued:
                parts.append(HEADER.pack(FrameType.EOF, 0, sid, 0))
                size += HEADER_SIZE
                dequeued += HEADER_SIZE
                frames += 1
                st.eof_queued = False
                self._forget_if_done(sid, st)
        if not parts:
            return b""
        out = b"".join(parts)
        self._queued_bytes -= dequeued + data_out
        self._bytes_out += size
        self._frames_out += frames
        self._data_out += data_out
        return out


def _take(st: _Stream, n: int, parts: list[bytes | memoryview]) -> None:
    """Move the first `n` queued bytes of `st` into `parts` (memoryview slices, no copy)."""
    out = st.out
    assert out is not None
    st.out_bytes -= n
    while n:
        head = out[0]
        if len(head) <= n:
            parts.append(head)
            out.popleft()
            n -= len(head)
        else:
            parts.append(head[:n])
            out[0] = head[n:]
            n = 0
    if not out:
        st.out = None  # an idle stream holds no buffer
