"""Hostile input for the sans-IO core: mux state machine, frame payloads, ClientHello.

test_frames.py, test_mux.py and test_clienthello.py already fuzz random and
bit-flipped bytes and legal mux operations. This file aims where those cannot
reach: frame sequences that are well formed but break the session rules (frames
for streams never opened or already gone, DATA beyond the window, WINDOW past
2^31-1, duplicate and excess OPENs, frames after EOF/RESET, PING floods), JSON
control payloads of every shape, and ClientHellos built field by field. A
reference model of PROTOCOL.md sections 3-6 predicts, frame by frame, whether
each one is delivered, silently dropped or a protocol error (and its code).

Examples are bounded so the file runs in seconds; TUNNELD_FUZZ_EXAMPLES=N
runs N examples per property (the deep profile, e.g. 20000).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunneld.errors import LocalProtocolError, RemoteProtocolError
from tunneld.wire.clienthello import (
    MAX_CLIENT_HELLO,
    ClientHello,
    Status,
    parse_client_hello,
)
from tunneld.wire.events import (
    NEED_DATA,
    Ban,
    BanEntry,
    Data,
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
)
from tunneld.wire.frames import MAX_FRAME_SIZE, MAX_WINDOW, FrameDecoder, decode, encode
from tunneld.wire.mux import Connection, Role, SessionState, StreamState

DEEP = int(os.environ.get("TUNNELD_FUZZ_EXAMPLES", "0"))
PROTOCOL_ERROR = ResetCode.PROTOCOL_ERROR
FLOW = ResetCode.FLOW_CONTROL_ERROR


def fuzz(n: int) -> settings:
    """Hypothesis settings: `n` examples in CI, TUNNELD_FUZZ_EXAMPLES in the deep profile."""
    return settings(
        max_examples=DEEP or n,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def raw_frame(ftype: int, stream_id: int, payload: bytes, flags: int = 0) -> bytes:
    return struct.pack("!BBII", ftype, flags, stream_id, len(payload)) + payload


# --- a reference model of the session rules (PROTOCOL.md 3-6) -----------------------


@dataclass
class ModelStream:
    send_credit: int
    recv_credit: int
    state: StreamState = StreamState.OPEN
    unacked: int = 0
    unannounced: int = 0
    queued: int = 0  # DATA bytes queued by the victim, not yet flushed
    eof_queued: bool = False


@dataclass
class Model:
    """What a correct victim (one Connection, after the handshake) must do."""

    role: Role
    window: int  # the victim's receive window per stream
    peer_window: int  # the victim's initial send credit per stream
    max_streams: int  # HOME: its limit; RELAY: the peer's (from its HELLO)
    streams: dict[int, ModelStream] = field(default_factory=dict)
    last_id: int = 0
    goaway: bool = False
    control: list[Event] = field(default_factory=list)  # control frames the victim queued

    def receive(self, event: Event) -> tuple[str, int]:
        """("event"|"drop"|"error", error code) for one decoded frame from the peer."""
        peer_may = {
            Role.HOME: (Data, Window, Eof, Reset, GoAway, Ping, Pong, Open),
            Role.RELAY: (Data, Window, Eof, Reset, GoAway, Ping, Pong, Ban),
        }[self.role]
        if isinstance(event, GoAway):
            self.goaway = True
            return "event", 0
        if not isinstance(event, peer_may):
            return "error", PROTOCOL_ERROR
        if isinstance(event, Open):
            if event.stream_id <= self.last_id or len(self.streams) >= self.max_streams:
                return "error", PROTOCOL_ERROR
            self.last_id = event.stream_id
            self.streams[event.stream_id] = ModelStream(self.peer_window, self.window)
            return "event", 0
        if not isinstance(event, Data | Window | Eof | Reset):
            return "event", 0  # PING, PONG, BAN
        st = self.streams.get(event.stream_id)
        if st is None:
            return ("drop", 0) if event.stream_id <= self.last_id else ("error", PROTOCOL_ERROR)
        if isinstance(event, Data):
            if st.state in (StreamState.REMOTE_CLOSED, StreamState.CLOSED):
                return "error", PROTOCOL_ERROR
            if len(event.data) > st.recv_credit:
                return "error", FLOW
            st.recv_credit -= len(event.data)
            st.unacked += len(event.data)
        elif isinstance(event, Window):
            st.send_credit += event.increment
            if st.send_credit > MAX_WINDOW:
                return "error", FLOW
        elif isinstance(event, Eof):
            if st.state is StreamState.OPEN:
                st.state = StreamState.REMOTE_CLOSED
            elif st.state is StreamState.LOCAL_CLOSED:
                st.state = StreamState.CLOSED
                if not (st.queued or st.eof_queued):
                    del self.streams[event.stream_id]
            else:
                return "error", PROTOCOL_ERROR
        else:
            del self.streams[event.stream_id]
        return "event", 0

    def flushed(self) -> None:
        self.control.clear()
        for sid in list(self.streams):
            st = self.streams[sid]
            st.queued, st.eof_queued = 0, False
            if st.state is StreamState.CLOSED:
                del self.streams[sid]


@dataclass
class PeerFrame:
    raw: bytes
    event: Event | None  # None: the decoder itself must refuse the bytes


def new_victim(role: Role, window: int, peer_window: int, max_streams: int) -> Connection:
    """A Connection in state OPEN after a real handshake with an honest peer."""
    victim = Connection(role, window=window, max_streams=max_streams, data_chunk=64)
    peer_role = Role.RELAY if role is Role.HOME else Role.HOME
    peer = Connection(peer_role, window=peer_window, max_streams=max_streams)
    home, relay = (victim, peer) if role is Role.HOME else (peer, victim)
    home.send(Hello("0.1.0", ("h.example",), home.window, max_streams))
    relay.receive_data(home.data_to_send())
    assert isinstance(relay.next_event(), Hello)
    relay.send(Welcome("s", ("h.example",), relay.window, 20.0))
    home.receive_data(relay.data_to_send())
    assert isinstance(home.next_event(), Welcome)
    assert victim.state is SessionState.OPEN
    return victim


MAX_ID = 2**32 - 1


def draw_stream_id(data: st.DataObject, model: Model) -> int:
    near = {model.last_id, model.last_id + 1, 1, MAX_ID}
    candidates = sorted({*model.streams, *(n for n in near if 0 < n <= MAX_ID)})
    return data.draw(st.sampled_from(candidates) | st.integers(1, min(model.last_id + 3, MAX_ID)))


def draw_honest_frame(data: st.DataObject, model: Model) -> PeerFrame | None:
    """A frame a correct peer could send now (None if the drawn kind is impossible)."""
    kind = data.draw(st.sampled_from(["data", "data", "window", "eof", "reset", "late", "open"]))
    live = sorted(model.streams)
    readable = [s for s, v in model.streams.items() if v.state in _PEER_MAY_WRITE and v.recv_credit]
    recent = range(max(1, model.last_id - 5), model.last_id + 1)  # ids reach 2^32-1
    gone = [s for s in recent if s not in model.streams]
    event: Event
    if kind == "data" and readable:
        sid = data.draw(st.sampled_from(readable))
        event = Data(sid, b"p" * data.draw(st.integers(1, model.streams[sid].recv_credit)))
    elif kind == "window" and live:
        sid = data.draw(st.sampled_from(live))
        room = MAX_WINDOW - model.streams[sid].send_credit
        event = Window(sid, data.draw(st.integers(1, max(1, min(room, 200)))))
    elif kind == "eof" and live:
        sid = data.draw(st.sampled_from(live))
        if model.streams[sid].state not in _PEER_MAY_WRITE:
            return None
        event = Eof(sid)
    elif kind == "reset" and (live or gone):
        event = Reset(data.draw(st.sampled_from(live + gone)), ResetCode.CANCEL)
    elif kind == "late" and gone:  # in flight when the stream ended: dropped silently
        sid = data.draw(st.sampled_from(gone))
        event = data.draw(st.sampled_from([Data(sid, b"late"), Eof(sid), Window(sid, 1)]))
    elif kind == "open" and model.role is Role.HOME and len(model.streams) < model.max_streams:
        step = data.draw(st.integers(1, 3))  # gaps are allowed
        if model.last_id + step > MAX_ID:
            return None
        event = Open(model.last_id + step, "192.0.2.7", 1, "h.example")
    else:
        return None
    return PeerFrame(encode(event), event)


_PEER_MAY_WRITE = (StreamState.OPEN, StreamState.LOCAL_CLOSED)


def draw_peer_frame(data: st.DataObject, model: Model) -> PeerFrame:
    # Mostly honest frames, so sessions get deep before a rule is broken.
    if data.draw(st.sampled_from(range(8))):  # uniform, unlike integers(): 1 in 8 hostile
        for _ in range(3):
            frame = draw_honest_frame(data, model)
            if frame is not None:
                return frame
    kind = data.draw(
        st.sampled_from(
            ["data"] * 3
            + ["window"] * 3
            + ["open"] * 2
            + ["eof", "reset", "ping", "pong", "goaway", "ban", "hello", "welcome", "junk"]
        )
    )
    live = sorted(model.streams)
    if data.draw(st.booleans()) and live:  # rule breaking on a live stream reaches the most
        sid = data.draw(st.sampled_from(live))
    else:
        sid = draw_stream_id(data, model)
    st_ = model.streams.get(sid)
    if kind == "data":
        credit = st_.recv_credit if st_ else 40
        n = data.draw(st.sampled_from([credit, credit + 1, 0]) | st.integers(1, 40))
        if n == 0:  # an empty DATA frame is refused by the decoder
            return PeerFrame(raw_frame(FrameType.DATA, sid, b""), None)
        return PeerFrame(encode(Data(sid, b"p" * n)), Data(sid, b"p" * n))
    if kind == "window":
        credit = st_.send_credit if st_ else 0
        inc = data.draw(
            st.sampled_from([MAX_WINDOW - credit, MAX_WINDOW - credit + 1, MAX_WINDOW])
            | st.integers(1, 100)
            | st.sampled_from([0, MAX_WINDOW + 1, 2**32 - 1])
        )
        if not 1 <= inc <= MAX_WINDOW:
            return PeerFrame(raw_frame(FrameType.WINDOW, sid, struct.pack("!I", inc)), None)
        return PeerFrame(encode(Window(sid, inc)), Window(sid, inc))
    if kind == "open":  # a fresh id over the limit, or a duplicate or stale one
        if model.last_id < MAX_ID and data.draw(st.booleans()):
            sid = model.last_id + 1
        event: Event = Open(sid, "192.0.2.7", 4000, "h.example")
    elif kind == "eof":
        event = Eof(sid)
    elif kind == "reset":
        event = Reset(sid, data.draw(st.integers(0, 2**32 - 1)))
    elif kind in ("ping", "pong"):
        payload = data.draw(st.binary(min_size=8, max_size=8))
        event = Ping(payload) if kind == "ping" else Pong(payload)
    elif kind == "goaway":
        event = GoAway(data.draw(st.integers(0, 9)), "bye")
    elif kind == "ban":
        event = Ban((BanEntry("198.51.100.4", None),), data.draw(st.booleans()))
    elif kind == "hello":
        event = Hello("9.9", ("h.example",), 1, 1)
    elif kind == "welcome":
        event = Welcome("s2", ("h.example",), 1, 1.0)
    else:
        junk = data.draw(
            st.sampled_from(
                [
                    raw_frame(0x0C, 0, b""),  # unknown type
                    raw_frame(0x00, sid, b""),
                    raw_frame(FrameType.EOF, sid, b"", flags=0x80),
                    raw_frame(FrameType.DATA, 0, b"x"),  # stream frame on stream 0
                    raw_frame(FrameType.PING, sid, bytes(8)),  # session frame on a stream
                    struct.pack("!BBII", FrameType.DATA, 0, sid, MAX_FRAME_SIZE + 1),
                    struct.pack("!BBII", FrameType.DATA, 0, sid, 2**32 - 1),
                ]
            )
        )
        return PeerFrame(junk, None)
    # Reset codes are decoded as ResetCode when known: compare decoded forms.
    (decoded,) = decode(encode(event))
    return PeerFrame(encode(event), decoded)


def feed_in_pieces(
    data: st.DataObject, victim: Connection, raw: bytes
) -> tuple[list[Event], RemoteProtocolError | None]:
    """Feed `raw` cut at random points; every event until NEED_DATA or an error."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=4)))
    events: list[Event] = []
    start = 0
    try:
        for cut in [*cuts, len(raw)]:
            if cut > start:
                victim.receive_data(raw[start:cut])
                start = cut
            while (event := victim.next_event()) is not NEED_DATA:
                assert isinstance(event, Event)
                events.append(event)
                assert len(events) <= len(raw) // 10, "more events than frames fed"
    except RemoteProtocolError as exc:
        return events, exc
    return events, None


def check_error_state(victim: Connection, error: RemoteProtocolError, code: int) -> None:
    assert error.error_code == code, (error, code)
    assert victim.state is SessionState.ERROR
    assert victim.open_streams == 0 and not victim.has_data_to_send()
    for poke in (lambda: victim.receive_data(b"x"), victim.next_event):
        try:
            poke()
        except RemoteProtocolError:
            pass
        else:
            raise AssertionError("a connection in state ERROR accepted more input")
    for event in (Ping(bytes(8)), Data(1, b"x"), Eof(1)):
        try:
            victim.send(event)
        except LocalProtocolError:
            pass
        else:
            raise AssertionError(f"a connection in state ERROR sent {event}")
    # The peer can still be told why (PROTOCOL.md section 7).
    victim.send(GoAway(code, "protocol error"))
    assert decode(victim.data_to_send()) == [GoAway(code, "protocol error")]


def check_consistent(victim: Connection, model: Model) -> None:
    assert victim.open_streams == len(model.streams)
    near = {model.last_id, model.last_id + 1, model.last_id + 2}
    probe = {*range(1, min(model.last_id + 3, 40)), *model.streams, *(n for n in near if n)}
    for sid in sorted(probe):
        st_ = model.streams.get(sid)
        assert victim.stream_state(sid) is (st_.state if st_ else None), sid
        sendable = st_ is not None and st_.state in (StreamState.OPEN, StreamState.REMOTE_CLOSED)
        assert victim.send_capacity(sid) == (st_.send_credit if st_ and sendable else 0), sid
    if model.role is Role.HOME:
        assert victim.open_streams <= model.max_streams


def flush_and_check(data: st.DataObject, victim: Connection, model: Model) -> None:
    """Everything the victim queued leaves as valid frames, in the documented order."""
    out = FrameDecoder()
    for _ in range(10_000):
        chunk = victim.data_to_send(data.draw(st.integers(1, 600)))
        if not chunk:
            break
        out.feed(chunk)
    frames = list(out)
    assert out.buffered == 0
    control = [f for f in frames if not isinstance(f, Data | Eof)]
    assert control == model.control
    assert frames[: len(control)] == control  # session and control frames go out first
    sent: dict[int, int] = {}
    ended: set[int] = set()
    for f in frames[len(control) :]:
        assert isinstance(f, Data | Eof)
        assert f.stream_id not in ended, "DATA or EOF after the stream's EOF"
        if isinstance(f, Data):
            assert len(f.data) <= 64  # data_chunk
            sent[f.stream_id] = sent.get(f.stream_id, 0) + len(f.data)
        else:
            ended.add(f.stream_id)
    for sid, st_ in model.streams.items():
        assert sent.get(sid, 0) == st_.queued, sid
        assert (sid in ended) == st_.eof_queued, sid
    model.flushed()


def open_streams(data: st.DataObject, victim: Connection, model: Model, n: int) -> None:
    """Open `n` streams the honest way (the relay sends OPEN), so sessions start deep."""
    for _ in range(n):
        sid = model.last_id + 1
        opened = Open(sid, "192.0.2.7", 1, "h.example")
        if model.role is Role.HOME:
            assert model.receive(opened) == ("event", 0)
            assert feed_in_pieces(data, victim, encode(opened)) == ([opened], None)
        else:
            assert victim.next_stream_id() == sid
            victim.send(opened)
            model.last_id = sid
            model.streams[sid] = ModelStream(model.peer_window, model.window)
            model.control.append(opened)
    flush_and_check(data, victim, model)


@fuzz(250)
@given(st.sampled_from([Role.HOME, Role.RELAY]), st.data())
def test_hostile_frame_sequences_follow_the_rules(role: Role, data: st.DataObject) -> None:
    window = data.draw(st.integers(2, 120), label="window")
    peer_window = data.draw(st.integers(1, 120), label="peer_window")
    max_streams = data.draw(st.integers(1, 4), label="max_streams")
    victim = new_victim(role, window, peer_window, max_streams)
    model = Model(role, window, peer_window, max_streams)
    open_streams(data, victim, model, data.draw(st.integers(0, max_streams)))
    for _ in range(data.draw(st.integers(3, 30))):
        op = data.draw(
            st.sampled_from(["peer"] * 5 + ["ack", "send", "eof", "reset", "open", "flush", "bye"])
        )
        live = sorted(model.streams)
        sid = data.draw(st.sampled_from(live)) if live else 0
        st_ = model.streams.get(sid)
        if op == "peer":
            frames = [draw_peer_frame(data, model) for _ in range(data.draw(st.integers(1, 4)))]
            expected: list[Event] = []
            failure: int | None = None
            for frame in frames:
                if frame.event is None:
                    failure = PROTOCOL_ERROR
                    break
                outcome, code = model.receive(frame.event)
                if outcome == "error":
                    failure = code
                    break
                if outcome == "event":
                    expected.append(frame.event)
            got, error = feed_in_pieces(data, victim, b"".join(f.raw for f in frames))
            assert got == expected
            if failure is not None:
                assert error is not None, f"accepted what must be refused: {frames}"
                check_error_state(victim, error, failure)
                return
            assert error is None, error
        elif op == "ack" and st_ and st_.unacked:
            n = data.draw(st.integers(1, st_.unacked))
            victim.acknowledge(sid, n)
            st_.unacked -= n
            if st_.state in (StreamState.OPEN, StreamState.LOCAL_CLOSED):
                st_.unannounced += n
                if st_.unannounced >= max(1, window // 2):
                    model.control.append(Window(sid, st_.unannounced))
                    st_.recv_credit += st_.unannounced
                    st_.unannounced = 0
        elif op == "send" and victim.send_capacity(sid):
            # Credit may legally reach 2^31-1: send a bounded amount of it.
            n = data.draw(st.integers(1, min(victim.send_capacity(sid), 500)))
            victim.send(Data(sid, b"v" * n))
            assert st_ is not None
            st_.send_credit -= n
            st_.queued += n
        elif op == "eof" and st_ and st_.state in (StreamState.OPEN, StreamState.REMOTE_CLOSED):
            victim.send(Eof(sid))
            closed = st_.state is StreamState.REMOTE_CLOSED
            st_.state = StreamState.CLOSED if closed else StreamState.LOCAL_CLOSED
            st_.eof_queued = True
        elif op == "reset" and st_:
            victim.send(Reset(sid, ResetCode.CANCEL))
            del model.streams[sid]
            model.control.append(Reset(sid, ResetCode.CANCEL))
        elif op == "open" and role is Role.RELAY:
            if model.goaway or len(model.streams) >= max_streams:
                try:
                    victim.send(Open(model.last_id + 1, "192.0.2.7", 1, "h.example"))
                except LocalProtocolError:
                    pass
                else:
                    raise AssertionError("the relay opened a stream it must not")
            else:
                new = victim.next_stream_id()
                assert new == model.last_id + 1
                victim.send(Open(new, "192.0.2.7", 1, "h.example"))
                model.last_id = new
                model.streams[new] = ModelStream(peer_window, window)
                model.control.append(Open(new, "192.0.2.7", 1, "h.example"))
        elif op == "flush":
            flush_and_check(data, victim, model)
        elif op == "bye":
            victim.send(GoAway(ResetCode.NO_ERROR, ""))
            model.goaway = True
            model.control.append(GoAway(ResetCode.NO_ERROR, ""))
        check_consistent(victim, model)
    flush_and_check(data, victim, model)
    check_consistent(victim, model)
    assert victim.state in (SessionState.OPEN, SessionState.DRAINING)


# --- floods ---------------------------------------------------------------------------


@fuzz(30)
@given(st.sampled_from([Role.HOME, Role.RELAY]), st.integers(1, 5000))
def test_ping_flood_is_reported_never_answered_or_stored(role: Role, n: int) -> None:
    # The mux only reports PINGs (the I/O layer answers): a flood grows no state here.
    victim = new_victim(role, 100, 100, 2)
    raw = b"".join(encode(Ping(struct.pack("!Q", i))) for i in range(n))
    victim.receive_data(raw)
    count = 0
    while (event := victim.next_event()) is not NEED_DATA:
        assert event == Ping(struct.pack("!Q", count))
        count += 1
    assert count == n
    stats = victim.statistics()
    assert stats.buffered_input == stats.buffered_output == 0
    assert not victim.has_data_to_send() and victim.state is SessionState.OPEN


@fuzz(40)
@given(st.integers(1, 6), st.integers(0, 20), st.data())
def test_open_flood_stops_at_max_streams(
    max_streams: int, resets: int, data: st.DataObject
) -> None:
    # OPENs past the home's limit fail the session; RESETs free slots for later OPENs.
    home = new_victim(Role.HOME, 100, 100, max_streams)
    live: list[int] = []
    sid = 0
    for _ in range(max_streams + resets + 1):
        if data.draw(st.booleans()) and live:
            home.receive_data(encode(Reset(live.pop(0))))
            assert isinstance(home.next_event(), Reset)
            continue
        sid += data.draw(st.integers(1, 1000))  # gaps are allowed, reuse is not
        home.receive_data(encode(Open(sid, "192.0.2.7", 1, "h.example")))
        if len(live) == max_streams:
            try:
                home.next_event()
            except RemoteProtocolError as exc:
                check_error_state(home, exc, PROTOCOL_ERROR)
                return
            raise AssertionError("an OPEN over max_streams was accepted")
        assert isinstance(home.next_event(), Open)
        live.append(sid)
        assert home.open_streams == len(live) <= max_streams
    # Never more than max_streams at once (checked above), yet every OPEN within it,
    # however many came before, kept the session up.
    assert home.state is SessionState.OPEN and home.open_streams == len(live)


def test_duplicate_and_stale_open_fail_the_session() -> None:
    for again in (5, 4, 1):
        home = new_victim(Role.HOME, 100, 100, 10)
        home.receive_data(encode(Open(5, "192.0.2.7", 1, "h.example")))
        assert isinstance(home.next_event(), Open)
        home.receive_data(encode(Open(again, "192.0.2.7", 1, "h.example")))
        try:
            home.next_event()
        except RemoteProtocolError as exc:
            check_error_state(home, exc, PROTOCOL_ERROR)
        else:
            raise AssertionError(f"OPEN {again} after OPEN 5 was accepted")


# --- frame payloads: every JSON shape, every OPEN layout ------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=12,
)
JSON_KEYS = ["protocol", "version", "hostnames", "window", "max_streams", "session_id"]
JSON_KEYS += ["ping_interval", "replace", "bans", "ip", "until", "code", "reason"]
json_objects = st.dictionaries(st.sampled_from(JSON_KEYS) | st.text(max_size=5), json_values)


@fuzz(400)
@given(
    st.sampled_from([FrameType.HELLO, FrameType.WELCOME, FrameType.BAN, FrameType.GOAWAY]),
    json_objects | json_values,
    st.booleans(),
)
def test_any_json_control_payload_decodes_or_is_a_protocol_error(
    ftype: FrameType, obj: object, as_valid_base: bool
) -> None:
    if as_valid_base and isinstance(obj, dict):
        base: dict[str, Any] = {
            FrameType.HELLO: {
                "protocol": 1,
                "version": "1",
                "hostnames": [],
                "window": 1,
                "max_streams": 1,
            },
            FrameType.WELCOME: {
                "protocol": 1,
                "session_id": "s",
                "hostnames": [],
                "window": 1,
                "ping_interval": 1,
            },
            FrameType.BAN: {"replace": True, "bans": []},
            FrameType.GOAWAY: {"code": 0, "reason": ""},
        }[ftype]
        obj = {**base, **obj}  # one or more keys of a valid object replaced by anything
    payload = json.dumps(obj).encode()
    try:
        events = decode(raw_frame(ftype, 0, payload))
    except RemoteProtocolError:
        return
    # Accepted: it is a frame we could have sent ourselves.
    assert len(events) == 1 and decode(encode(events[0])) == events


@fuzz(300)
@given(
    st.integers(0, 255),
    st.binary(max_size=17),
    st.integers(0, 65535),
    st.integers(0, 255),
    st.binary(max_size=260),
)
def test_any_open_payload_decodes_or_is_a_protocol_error(
    family: int, addr: bytes, port: int, sni_len: int, sni: bytes
) -> None:
    payload = bytes([family]) + addr + struct.pack("!HB", port, sni_len) + sni
    try:
        events = decode(raw_frame(FrameType.OPEN, 1, payload))
    except RemoteProtocolError:
        return
    (event,) = events
    assert isinstance(event, Open) and decode(encode(event)) == events
    size = 16 if family == 6 else 4
    assert family in (4, 6) and len(payload) == 1 + size + 2 + 1 + len(event.sni)


@fuzz(200)
@given(st.binary(min_size=1, max_size=300), st.lists(st.integers(0, 300), max_size=6))
def test_garbage_fails_at_the_same_frame_however_it_is_split(raw: bytes, cuts: list[int]) -> None:
    # What an I/O layer sees may not depend on how TCP cut the bytes.
    def run(pieces: list[bytes]) -> tuple[list[Event], bool]:
        decoder = FrameDecoder(max_frame_size=64)
        events: list[Event] = []
        try:
            for piece in pieces:
                decoder.feed(piece)
                events.extend(decoder)
        except RemoteProtocolError:
            return events, True
        return events, False

    points = sorted({c % (len(raw) + 1) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    assert run(pieces) == run([raw])


@fuzz(100)
@given(st.integers(MAX_FRAME_SIZE + 1, 2**32 - 1), st.sampled_from(list(FrameType)))
def test_oversize_length_fails_on_the_header_alone(length: int, ftype: FrameType) -> None:
    decoder = FrameDecoder()
    sid = 0 if ftype in (FrameType.HELLO, FrameType.WELCOME, FrameType.PING) else 1
    decoder.feed(struct.pack("!BBII", ftype, 0, sid, length))
    try:
        decoder.next_event()
    except RemoteProtocolError:
        return
    raise AssertionError("a header announcing more than the limit was accepted")


# --- ClientHellos built field by field ---------------------------------------------------


def _u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


host_labels = st.text(alphabet="abcXYZ019-_", min_size=1, max_size=10)
sni_names = st.lists(host_labels, min_size=1, max_size=4).map(".".join).map(str.encode) | st.binary(
    max_size=20
)


@st.composite
def extensions(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["sni", "alpn", "other", "sni", "alpn"]))
        if kind == "sni":
            names = b""
            for _ in range(draw(st.integers(0, 2))):
                name = draw(sni_names)
                names += bytes([draw(st.sampled_from([0, 0, 1]))]) + _u16(len(name)) + name
            body = _u16(len(names)) + names
            out += _u16(0) + _u16(len(body)) + body
        elif kind == "alpn":
            protos = b"".join(
                bytes([len(p)]) + p for p in draw(st.lists(st.binary(max_size=6), max_size=3))
            )
            body = _u16(len(protos)) + protos
            out += _u16(16) + _u16(len(body)) + body
        else:
            body = draw(st.binary(max_size=30))
            out += _u16(draw(st.integers(1, 65535))) + _u16(len(body)) + body
    return out


@st.composite
def client_hellos(draw: st.DrawFn) -> bytes:
    """A handshake message: ClientHello fields with lengths that may or may not fit."""
    session = draw(st.binary(max_size=33))
    ciphers = draw(st.binary(max_size=6))
    body = b"\x03\x03" + bytes(32) + bytes([len(session)]) + session
    body += _u16(len(ciphers)) + ciphers + b"\x01\x00"
    if draw(st.booleans()):
        exts = draw(extensions())
        body += _u16(len(exts)) + exts
    body += draw(st.sampled_from([b"", b"", b"\x00"]))
    return bytes([draw(st.sampled_from([1, 1, 1, 2]))]) + len(body).to_bytes(3, "big") + body


def frame_records(message: bytes, sizes: list[int]) -> bytes:
    out, pos = b"", 0
    for size in [*sizes, len(message)]:
        fragment = message[pos : pos + size]
        if fragment:
            out += b"\x16\x03\x01" + _u16(len(fragment)) + fragment
        pos += len(fragment)
    return out


@fuzz(300)
@given(client_hellos(), st.lists(st.integers(1, 80), max_size=4), st.integers(0, 400))
def test_built_client_hellos_parse_the_same_however_framed(
    message: bytes, sizes: list[int], cut: int
) -> None:
    whole = parse_client_hello(frame_records(message, []))
    framed = frame_records(message, sizes)
    split = parse_client_hello(framed)
    assert isinstance(whole, ClientHello | Status) and isinstance(split, ClientHello | Status)
    if isinstance(whole, ClientHello):
        # Record boundaries never change what is routed.
        assert isinstance(split, ClientHello) or split is Status.TOO_LARGE
        if isinstance(split, ClientHello):
            assert (split.sni, split.alpn) == (whole.sni, whole.alpn)
            assert split.length == len(framed)
        sni = whole.sni
        assert sni is None or (sni == sni.lower() and not sni.endswith(".") and sni.isascii())
    else:
        assert whole is not Status.NEED_MORE  # the message is complete
        assert not isinstance(split, ClientHello)
    prefix = parse_client_hello(framed[: cut % (len(framed) + 1)], max_size=MAX_CLIENT_HELLO)
    assert prefix is Status.NEED_MORE or prefix == split
