"""The multiplexer state machine: two peers wired in memory, no sockets."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld.errors import LocalProtocolError, RemoteProtocolError
from tunneld.wire.events import (
    NEED_DATA,
    Ban,
    BanEntry,
    ConnectionClosed,
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
from tunneld.wire.frames import FrameDecoder, decode, encode
from tunneld.wire.mux import Connection, Role, SessionState, StreamState

HOME_WINDOW = 3000
RELAY_WINDOW = 2000


def drain(conn: Connection) -> list[Event]:
    events: list[Event] = []
    for _ in range(100_000):
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        assert isinstance(event, Event)
        events.append(event)
        if isinstance(event, ConnectionClosed):
            return events
    raise AssertionError("next_event never returned NEED_DATA")


def transfer(src: Connection, dst: Connection, max_bytes: int = 256 * 1024) -> list[Event]:
    """Move everything src has queued to dst; dst's events."""
    for _ in range(10_000):
        out = src.data_to_send(max_bytes)
        if not out:
            break
        dst.receive_data(out)
    assert not src.has_data_to_send()
    return drain(dst)


def hello(window: int = HOME_WINDOW, max_streams: int = 10) -> Hello:
    return Hello("0.1.0", ("home.example.com",), window, max_streams)


def welcome(window: int = RELAY_WINDOW) -> Welcome:
    return Welcome("s-1", ("home.example.com",), window, 25.0)


def pair(max_streams: int = 10, data_chunk: int = 32 * 1024) -> tuple[Connection, Connection]:
    home = Connection(Role.HOME, window=HOME_WINDOW, max_streams=max_streams, data_chunk=data_chunk)
    relay = Connection(Role.RELAY, window=RELAY_WINDOW, data_chunk=data_chunk)
    home.send(hello(max_streams=max_streams))
    assert home.state is SessionState.HELLO_SENT
    assert transfer(home, relay) == [hello(max_streams=max_streams)]
    assert relay.state is SessionState.HELLO_RECEIVED
    relay.send(welcome())
    assert transfer(relay, home) == [welcome()]
    return home, relay


def open_stream(home: Connection, relay: Connection) -> int:
    sid = relay.next_stream_id()
    relay.send(Open(sid, "203.0.113.5", 50000, "home.example.com"))
    assert transfer(relay, home) == [Open(sid, "203.0.113.5", 50000, "home.example.com")]
    return sid


def test_handshake_exchanges_limits() -> None:
    home, relay = pair(max_streams=7)
    assert home.state is relay.state is SessionState.OPEN
    assert relay.peer_max_streams == 7 and relay.peer_window == HOME_WINDOW
    assert home.peer_window == RELAY_WINDOW


def test_data_both_ways_and_half_close_each_way() -> None:
    home, relay = pair()
    sid = open_stream(home, relay)
    relay.send(Data(sid, b"GET / HTTP/1.1\r\n\r\n"))
    relay.send(Eof(sid))
    assert transfer(relay, home) == [Data(sid, b"GET / HTTP/1.1\r\n\r\n"), Eof(sid)]
    assert relay.stream_state(sid) is StreamState.LOCAL_CLOSED
    assert home.stream_state(sid) is StreamState.REMOTE_CLOSED
    with pytest.raises(LocalProtocolError):
        relay.send(Data(sid, b"more"))
    # The other direction is still open.
    home.send(Data(sid, b"HTTP/1.1 200 OK\r\n"))
    assert transfer(home, relay) == [Data(sid, b"HTTP/1.1 200 OK\r\n")]
    home.send(Eof(sid))
    assert home.stream_state(sid) is StreamState.CLOSED
    assert home.open_streams == 1  # its EOF is still queued
    assert transfer(home, relay) == [Eof(sid)]
    assert home.open_streams == relay.open_streams == 0
    assert relay.stream_state(sid) is home.stream_state(sid) is None


def test_home_half_closes_first() -> None:
    home, relay = pair()
    sid = open_stream(home, relay)
    home.send(Eof(sid))
    assert transfer(home, relay) == [Eof(sid)]
    relay.send(Data(sid, b"still allowed"))
    relay.send(Eof(sid))
    assert transfer(relay, home) == [Data(sid, b"still allowed"), Eof(sid)]
    assert home.open_streams == relay.open_streams == 0


def test_data_after_peers_eof_is_a_remote_error() -> None:
    home, relay = pair()
    sid = open_stream(home, relay)
    relay.send(Eof(sid))
    transfer(relay, home)
    home.receive_data(encode(Data(sid, b"x")))
    with pytest.raises(RemoteProtocolError):
        home.next_event()
    assert home.state is SessionState.ERROR


def test_reset_drops_queued_data_and_late_frames_are_ignored() -> None:
    home, relay = pair()
    sid = open_stream(home, relay)
    relay.send(Data(sid, b"never sent"))
    relay.send(Reset(sid, ResetCode.CANCEL))
    assert relay.open_streams == 0
    assert transfer(relay, home) == [Reset(sid, ResetCode.CANCEL)]
    # The home had sent DATA before it saw the RESET: the relay drops it silently.
    relay.receive_data(encode(Data(sid, b"in flight")) + encode(Eof(sid)))
    assert drain(relay) == []
    relay.send(Reset(sid))  # resetting a forgotten stream is harmless
    assert not relay.has_data_to_send()
    with pytest.raises(LocalProtocolError):
        home.send(Data(sid, b"x"))


def test_frames_for_never_opened_streams_are_remote_errors() -> None:
    home, relay = pair()
    open_stream(home, relay)
    home.receive_data(encode(Data(2, b"x")))
    with pytest.raises(RemoteProtocolError, match="never opened"):
        home.next_event()


def test_ping_is_surfaced_and_the_io_layer_answers() -> None:
    home, relay = pair()
    home.send(Ping(b"12345678"))
    assert transfer(home, relay) == [Ping(b"12345678")]
    assert not relay.has_data_to_send()  # no automatic PONG
    relay.send(Pong(b"12345678"))
    assert transfer(relay, home) == [Pong(b"12345678")]
    relay.send(Ping(b"abcdefgh"))  # either side may ping
    assert transfer(relay, home) == [Ping(b"abcdefgh")]


def test_goaway_stops_new_streams_on_the_relay_only() -> None:
    home, relay = pair()
    sid = open_stream(home, relay)
    relay.send(GoAway(ResetCode.SHUTDOWN, "restarting"))
    assert relay.state is SessionState.DRAINING
    with pytest.raises(LocalProtocolError):
        relay.send(Open(relay.next_stream_id(), "192.0.2.1", 1, "home.example.com"))
    assert transfer(relay, home) == [GoAway(ResetCode.SHUTDOWN, "restarting")]
    assert home.state is SessionState.DRAINING
    # Existing streams drain normally; an OPEN that crossed the GOAWAY is still legal.
    relay.send(Data(sid, b"x"))
    home.receive_data(encode(Open(sid + 5, "192.0.2.1", 1, "home.example.com")))
    assert transfer(relay, home) == [
        Open(sid + 5, "192.0.2.1", 1, "home.example.com"),
        Data(sid, b"x"),
    ]


def test_relay_opens_nothing_after_the_homes_goaway() -> None:
    home, relay = pair()
    home.send(GoAway(ResetCode.SHUTDOWN))
    transfer(home, relay)
    with pytest.raises(LocalProtocolError):
        relay.send(Open(1, "192.0.2.1", 1, "h"))


def test_ban_travels_home_to_relay_only() -> None:
    home, relay = pair()
    ban = Ban((BanEntry("198.51.100.4", 1.9e9), BanEntry("2001:db8::7", None)))
    home.send(ban)
    assert transfer(home, relay) == [ban]
    with pytest.raises(LocalProtocolError):
        relay.send(ban)
    home.receive_data(encode(ban))
    with pytest.raises(RemoteProtocolError):
        home.next_event()


@pytest.mark.parametrize("event", [Open(1, "192.0.2.1", 1, "h"), Data(1, b"x"), Ping(bytes(8))])
def test_home_must_say_hello_first(event: Event) -> None:
    home = Connection(Role.HOME)
    with pytest.raises(LocalProtocolError):
        home.send(event)
    assert home.state is SessionState.START


def test_handshake_violations() -> None:
    relay = Connection(Role.RELAY)
    with pytest.raises(LocalProtocolError):
        relay.send(welcome(window=relay.window))  # before HELLO
    relay.receive_data(encode(Ping(bytes(8))))
    with pytest.raises(RemoteProtocolError, match="expected HELLO"):
        relay.next_event()

    home = Connection(Role.HOME)
    home.receive_data(encode(welcome()))
    with pytest.raises(RemoteProtocolError):
        home.next_event()

    home = Connection(Role.HOME, window=HOME_WINDOW, max_streams=10)
    with pytest.raises(LocalProtocolError, match="window"):
        home.send(hello(window=HOME_WINDOW + 1))
    home.send(hello())
    home.receive_data(encode(Data(1, b"x")))
    with pytest.raises(RemoteProtocolError, match="expected WELCOME"):
        home.next_event()

    relay = Connection(Role.RELAY)
    future = b'{"protocol":2,"version":"9","extra":"and no max_streams"}'
    relay.receive_data(struct.pack("!BBII", FrameType.HELLO, 0, 0, len(future)) + future)
    with pytest.raises(RemoteProtocolError, match="protocol 2"):
        relay.next_event()


def test_goaway_may_replace_welcome() -> None:
    home = Connection(Role.HOME)
    home.send(hello(window=home.window, max_streams=home.max_streams))
    home.receive_data(encode(GoAway(ResetCode.SHUTDOWN, "shutting down")))
    assert drain(home) == [GoAway(ResetCode.SHUTDOWN, "shutting down")]
    assert home.state is SessionState.DRAINING


def test_stream_ids_increase_strictly() -> None:
    home, relay = pair()
    assert home.open_streams == 0
    first = open_stream(home, relay)
    assert relay.next_stream_id() == first + 1
    with pytest.raises(LocalProtocolError):
        relay.send(Open(first, "192.0.2.1", 1, "h"))
    with pytest.raises(LocalProtocolError):
        home.next_stream_id()
    home.receive_data(encode(Open(first, "192.0.2.1", 1, "h")))
    with pytest.raises(RemoteProtocolError, match="not above"):
        home.next_event()


def test_open_limit_on_both_sides() -> None:
    home, relay = pair(max_streams=2)
    open_stream(home, relay)
    open_stream(home, relay)
    with pytest.raises(LocalProtocolError) as info:
        relay.send(Open(relay.next_stream_id(), "192.0.2.1", 1, "h"))
    assert info.value.error_code == ResetCode.REFUSED
    home.receive_data(encode(Open(10, "192.0.2.1", 1, "h")))
    with pytest.raises(RemoteProtocolError, match="limit"):
        home.next_event()


def test_relay_also_keeps_its_own_stream_limit() -> None:
    home = Connection(Role.HOME, window=HOME_WINDOW, max_streams=100)
    relay = Connection(Role.RELAY, window=RELAY_WINDOW, max_streams=2)
    home.send(hello(max_streams=100))
    transfer(home, relay)
    relay.send(welcome())
    transfer(relay, home)
    open_stream(home, relay)
    open_stream(home, relay)
    with pytest.raises(LocalProtocolError, match="2 open streams per session") as info:
        relay.send(Open(relay.next_stream_id(), "192.0.2.1", 1, "h"))
    assert info.value.error_code == ResetCode.REFUSED


def test_closed_stream_counts_until_its_eof_is_flushed() -> None:
    # Else the relay's next OPEN could overtake its own queued EOF and break the home's limit.
    home, relay = pair(max_streams=1)
    sid = open_stream(home, relay)
    relay.send(Data(sid, b"tail"))
    relay.send(Eof(sid))
    home.send(Eof(sid))
    transfer(home, relay)
    assert relay.stream_state(sid) is StreamState.CLOSED
    with pytest.raises(LocalProtocolError):
        relay.send(Open(relay.next_stream_id(), "192.0.2.1", 1, "h"))
    transfer(relay, home)
    assert relay.open_streams == home.open_streams == 0
    open_stream(home, relay)


def test_flow_control_blocks_and_acknowledge_unblocks() -> None:
    home, relay = pair()
    sid = open_stream(home, relay)
    assert relay.send_capacity(sid) == HOME_WINDOW
    relay.send(Data(sid, bytes(HOME_WINDOW)))
    assert relay.send_capacity(sid) == 0
    with pytest.raises(LocalProtocolError) as info:
        relay.send(Data(sid, b"x"))
    assert info.value.error_code == ResetCode.FLOW_CONTROL_ERROR
    assert transfer(relay, home) == [Data(sid, bytes(HOME_WINDOW))]
    home.acknowledge(sid, HOME_WINDOW // 2 - 1)
    assert not home.has_data_to_send()  # under half the window: no WINDOW yet
    home.acknowledge(sid, 1)
    assert transfer(home, relay) == [Window(sid, HOME_WINDOW // 2)]
    assert relay.send_capacity(sid) == HOME_WINDOW // 2
    home.acknowledge(sid, HOME_WINDOW // 2)
    assert transfer(home, relay) == [Window(sid, HOME_WINDOW // 2)]
    assert relay.send_capacity(sid) == HOME_WINDOW
    with pytest.raises(LocalProtocolError):
        home.acknowledge(sid, 1)  # nothing left unacknowledged
    # The home's sends use the relay's window.
    assert home.send_capacity(sid) == RELAY_WINDOW
    # Returned credit is exactly one window again: a byte more is a violation.
    home.receive_data(encode(Data(sid, bytes(HOME_WINDOW + 1))))
    with pytest.raises(RemoteProtocolError) as overrun:
        home.next_event()
    assert overrun.value.error_code == ResetCode.FLOW_CONTROL_ERROR


def test_peer_overrunning_the_window_is_a_flow_control_error() -> None:
    home, relay = pair()
    sid = open_stream(home, relay)
    home.receive_data(encode(Data(sid, bytes(HOME_WINDOW + 1))))
    with pytest.raises(RemoteProtocolError) as info:
        home.next_event()
    assert info.value.error_code == ResetCode.FLOW_CONTROL_ERROR


def test_window_overflow_is_a_flow_control_error() -> None:
    home, relay = pair()
    sid = open_stream(home, relay)
    relay.receive_data(encode(Window(sid, 2**31 - 1)))
    with pytest.raises(RemoteProtocolError) as info:
        relay.next_event()
    assert info.value.error_code == ResetCode.FLOW_CONTROL_ERROR


def test_round_robin_serves_a_small_stream_next_to_a_bulk_one() -> None:
    home = Connection(Role.HOME, window=4 << 20)
    relay = Connection(Role.RELAY, data_chunk=32 * 1024)
    home.send(Hello("v", ("h",), 4 << 20, home.max_streams))
    transfer(home, relay)
    relay.send(Welcome("s", ("h",), relay.window, 25.0))
    transfer(relay, home)
    bulk, small = relay.next_stream_id(), relay.next_stream_id()
    relay.send(Open(bulk, "192.0.2.1", 1, "h"))
    relay.send(Open(small, "192.0.2.2", 2, "h"))
    relay.send(Data(bulk, bytes(1 << 20)))
    relay.send(Data(small, b"s" * 100))
    relay.send(Eof(small))
    out = relay.data_to_send(256 * 1024)
    assert len(out) < 256 * 1024 + 32 * 1024 + 100
    frames = decode(out)
    assert [e for e in frames if getattr(e, "stream_id", None) == small][1:] == [
        Data(small, b"s" * 100),
        Eof(small),
    ]
    bulk_frames = [e for e in frames if isinstance(e, Data) and e.stream_id == bulk]
    assert all(len(e.data) <= 32 * 1024 for e in bulk_frames)
    # The rest of the bulk stream follows in later calls, complete and in order.
    home.receive_data(out)
    events = drain(home) + transfer(relay, home)
    received = b"".join(e.data for e in events if isinstance(e, Data) and e.stream_id == bulk)
    assert received == bytes(1 << 20)


def test_data_chunks_keep_order_and_coalesce_small_writes() -> None:
    home, relay = pair(data_chunk=5)
    sid = open_stream(home, relay)
    for piece in (b"ab", b"cdefgh", b"ij"):
        relay.send(Data(sid, piece))
    relay.send(Eof(sid))
    events = decode(relay.data_to_send())
    assert events == [Data(sid, b"abcde"), Data(sid, b"fghij"), Eof(sid)]


def test_local_errors_leave_the_connection_usable() -> None:
    home, relay = pair()
    sid = open_stream(home, relay)
    with pytest.raises(LocalProtocolError):
        relay.send(Data(sid, bytes(HOME_WINDOW + 1)))
    with pytest.raises(LocalProtocolError):
        relay.send(Window(sid, 10))
    with pytest.raises(LocalProtocolError):
        relay.send(Ping(b"short"))
    relay.send(Data(sid, b"fine"))
    assert transfer(relay, home) == [Data(sid, b"fine")]


def test_error_state_allows_only_goaway() -> None:
    home, relay = pair()
    sid = open_stream(home, relay)
    home.send(Data(sid, b"queued"))
    home.receive_data(b"\xff" * 10)
    with pytest.raises(RemoteProtocolError):
        home.next_event()
    assert home.state is SessionState.ERROR
    with pytest.raises(RemoteProtocolError):
        home.next_event()
    with pytest.raises(RemoteProtocolError):
        home.receive_data(b"x")
    with pytest.raises(LocalProtocolError):
        home.send(Data(sid, b"x"))
    home.send(GoAway(ResetCode.PROTOCOL_ERROR, "bad frame"))
    assert decode(home.data_to_send()) == [GoAway(ResetCode.PROTOCOL_ERROR, "bad frame")]


def test_transport_end() -> None:
    home, relay = pair()
    home.receive_data(encode(Ping(bytes(8))))
    home.receive_data(b"")
    assert drain(home) == [Ping(bytes(8)), ConnectionClosed()]
    assert home.state is SessionState.CLOSED
    with pytest.raises(LocalProtocolError):
        home.receive_data(b"more")
    with pytest.raises(LocalProtocolError):
        home.send(Ping(bytes(8)))

    relay.receive_data(encode(Data(1, b"x"))[:5])
    relay.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        relay.next_event()


def test_oversized_frame_header_fails_at_once() -> None:
    relay = Connection(Role.RELAY, max_frame_size=4096)
    relay.receive_data(b"\x04\x00\x00\x00\x00\x01\x00\x00\x10\x01")  # DATA of 4097 bytes
    with pytest.raises(RemoteProtocolError):
        relay.next_event()


def test_statistics_count_traffic() -> None:
    home, relay = pair()
    sid = open_stream(home, relay)
    relay.send(Data(sid, b"x" * 100))
    assert relay.statistics().streams_pending_output == 1
    assert relay.statistics().buffered_output == 100
    transfer(relay, home)
    stats = relay.statistics()
    assert stats.open_streams == 1 and stats.total_streams == 1
    assert stats.data_bytes_out == 100 and stats.frames_out == 3  # WELCOME, OPEN, DATA
    assert stats.buffered_output == 0
    assert stats.bytes_out == home.statistics().bytes_in
    assert home.statistics().data_bytes_in == 100
    assert home.statistics().frames_in == 3


def test_max_bytes_bounds_each_call() -> None:
    home, relay = pair(data_chunk=1000)
    sids = [open_stream(home, relay) for _ in range(3)]
    for sid in sids:
        relay.send(Data(sid, bytes(HOME_WINDOW)))
    sizes = []
    for _ in range(100):
        out = relay.data_to_send(2500)
        if not out:
            break
        sizes.append(len(out))
    assert sum(sizes) == 3 * (HOME_WINDOW + 3 * 10)
    assert max(sizes) <= 2500 + 1010


# --- property test: credit invariants under random legal operations ------------------


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_random_operations_keep_credit_invariants(data: st.DataObject) -> None:
    home, relay = pair(max_streams=4, data_chunk=700)
    peers = {"home": home, "relay": relay}
    window_of = {"home": RELAY_WINDOW, "relay": HOME_WINDOW}  # a sender's credit per stream
    other = {"home": "relay", "relay": "home"}
    # Per (sender, stream): bytes queued, bytes delivered, bytes acknowledged, WINDOW credit.
    sent: dict[tuple[str, int], int] = {}
    delivered: dict[tuple[str, int], int] = {}
    acked: dict[tuple[str, int], int] = {}
    credited: dict[tuple[str, int], int] = {}
    live: list[int] = []

    def record(receiver: str, events: list[Event]) -> None:
        sender = other[receiver]
        for event in events:
            if isinstance(event, Open):
                live.append(event.stream_id)
            elif isinstance(event, Data):
                key = (sender, event.stream_id)
                delivered[key] = delivered.get(key, 0) + len(event.data)
            elif isinstance(event, Window):
                key = (receiver, event.stream_id)
                credited[key] = credited.get(key, 0) + event.increment

    for _ in range(data.draw(st.integers(1, 40))):
        op = data.draw(st.sampled_from(["open", "send", "ack", "flush", "eof"]))
        name = data.draw(st.sampled_from(["home", "relay"]))
        conn = peers[name]
        if op == "open" and relay.open_streams < 4 and not relay.goaway_sent:
            relay.send(Open(relay.next_stream_id(), "192.0.2.1", 1, "h"))
        elif op == "send" and live:
            sid = data.draw(st.sampled_from(live))
            room = conn.send_capacity(sid)
            if room:
                n = data.draw(st.integers(1, room))
                conn.send(Data(sid, b"d" * n))
                sent[(name, sid)] = sent.get((name, sid), 0) + n
        elif op == "ack" and live:
            sid = data.draw(st.sampled_from(live))
            key = (other[name], sid)
            pending = delivered.get(key, 0) - acked.get(key, 0)
            if pending:
                n = data.draw(st.integers(1, pending))
                conn.acknowledge(sid, n)
                acked[key] = acked.get(key, 0) + n
        elif op == "flush":
            peer = peers[other[name]]
            out = conn.data_to_send(data.draw(st.integers(1, 3000)))
            cut = data.draw(st.integers(0, len(out)))
            for piece in (out[:cut], out[cut:]):
                if piece:  # b"" would mean the transport ended
                    peer.receive_data(piece)
            record(other[name], drain(peer))
        elif op == "eof" and live:
            sid = data.draw(st.sampled_from(live))
            if conn.stream_state(sid) in (StreamState.OPEN, StreamState.REMOTE_CLOSED):
                conn.send(Eof(sid))

        for (sender, sid), n in sent.items():
            window = window_of[sender]
            in_flight = n - credited.get((sender, sid), 0)
            assert 0 <= in_flight <= window  # never more than the window outstanding
            capacity = peers[sender].send_capacity(sid)
            if capacity or peers[sender].stream_state(sid) in (
                StreamState.OPEN,
                StreamState.REMOTE_CLOSED,
            ):
                assert capacity == window - in_flight
            # The receiver never holds more unacknowledged bytes than the window,
            # and never grants credit for bytes it has not consumed.
            assert delivered.get((sender, sid), 0) - acked.get((sender, sid), 0) <= window
            assert credited.get((sender, sid), 0) <= acked.get((sender, sid), 0)

    # Everything flushed both ways: nothing is lost or duplicated.
    record("home", transfer(relay, home))
    record("relay", transfer(home, relay))
    for key, n in sent.items():
        assert delivered.get(key, 0) == n


def test_frame_decoder_is_what_the_mux_uses() -> None:
    # Output of data_to_send is plain frames any decoder reads.
    home, relay = pair()
    sid = open_stream(home, relay)
    home.send(Data(sid, b"abc"))
    decoder = FrameDecoder()
    decoder.feed(home.data_to_send())
    assert list(decoder) == [Data(sid, b"abc")]
