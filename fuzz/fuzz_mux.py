"""atheris harness: the multiplexer state machine (tunneld/wire/mux.py).

One `Connection` (home or relay, after a real handshake) is the victim. The
fuzzer interleaves hostile input -- raw bytes and frames built field by field
(any type, stream id, length, credit) -- with legal local operations (send DATA
within credit, EOF, RESET, acknowledge, OPEN, flush). Contract checked:

* receiving raises only RemoteProtocolError, and after it the connection is in
  state ERROR: input raises RemoteProtocolError, sends other than GOAWAY raise
  LocalProtocolError, and a GOAWAY can still be queued and flushed;
* legal local operations never raise;
* what the victim writes always decodes cleanly (it never emits a bad frame);
* a home never holds more than its max_streams; credit stays within 0..2^31-1.
"""

from __future__ import annotations

import json
import struct
import sys

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports():
    from tunneld.errors import LocalProtocolError, RemoteProtocolError
    from tunneld.wire import events as ev
    from tunneld.wire.frames import MAX_WINDOW, FrameDecoder
    from tunneld.wire.mux import Connection, Role, SessionState, StreamState

WINDOW = 300
PEER_WINDOW = 200
MAX_STREAMS = 3
_HEADER = struct.Struct("!BBII")


def _victim(role: Role) -> Connection:
    conn = Connection(role, window=WINDOW, max_streams=MAX_STREAMS, data_chunk=128)
    peer = Connection(
        Role.RELAY if role is Role.HOME else Role.HOME, window=PEER_WINDOW, max_streams=MAX_STREAMS
    )
    home, relay = (conn, peer) if role is Role.HOME else (peer, conn)
    home.send(ev.Hello("0.1.0", ("h",), home.window, MAX_STREAMS))
    relay.receive_data(home.data_to_send())
    assert isinstance(relay.next_event(), ev.Hello)
    relay.send(ev.Welcome("s", ("h",), relay.window, 20.0))
    home.receive_data(relay.data_to_send())
    assert isinstance(home.next_event(), ev.Welcome)
    return conn


def _stream_id(fdp: atheris.FuzzedDataProvider) -> int:
    kind = fdp.ConsumeIntInRange(0, 3)
    if kind == 3:
        return int(fdp.ConsumeIntInRange(0, 2**32 - 1))
    return int(fdp.ConsumeIntInRange(0, 6))  # small ids: live, closed and never-opened streams


def _frame(fdp: atheris.FuzzedDataProvider) -> bytes:
    ftype = fdp.ConsumeIntInRange(0, 12)
    sid = _stream_id(fdp)
    if ftype == ev.FrameType.DATA:
        payload = b"d" * fdp.ConsumeIntInRange(0, 2 * WINDOW)
    elif ftype in (ev.FrameType.WINDOW, ev.FrameType.RESET):
        big = fdp.ConsumeBool()
        value = (
            fdp.ConsumeIntInRange(MAX_WINDOW - 400, 2**32 - 1)
            if big
            else fdp.ConsumeIntInRange(0, 400)
        )
        payload = struct.pack("!I", value)
    elif ftype == ev.FrameType.OPEN:
        sni = b"h" * fdp.ConsumeIntInRange(0, 3)
        payload = bytes([4, 192, 0, 2, 1, 0, 80, len(sni)]) + sni
    elif ftype in (ev.FrameType.PING, ev.FrameType.PONG):
        payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(7, 9))
    elif ftype == ev.FrameType.BAN:
        payload = json.dumps({"replace": fdp.ConsumeBool(), "bans": []}).encode()
    elif ftype == ev.FrameType.GOAWAY:
        payload = json.dumps({"code": fdp.ConsumeIntInRange(0, 9), "reason": ""}).encode()
    elif ftype == ev.FrameType.HELLO:
        obj = {"protocol": 1, "version": "1", "hostnames": ["h"], "window": 9, "max_streams": 9}
        payload = json.dumps(obj).encode()
    else:
        payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 32))
    length = len(payload)
    if fdp.ConsumeIntInRange(0, 15) == 0:
        length = fdp.ConsumeIntInRange(0, 2**32 - 1)  # a lying header
    return bytes(_HEADER.pack(ftype, 0, sid, length) + payload)


def _check_error_state(conn: Connection) -> None:
    assert conn.state is SessionState.ERROR
    for poke in (lambda: conn.receive_data(b"x"), conn.next_event):
        try:
            poke()
        except RemoteProtocolError:
            pass
        else:
            raise AssertionError("a connection in ERROR accepted input")
    try:
        conn.send(ev.Ping(b"12345678"))
    except LocalProtocolError:
        pass
    else:
        raise AssertionError("a connection in ERROR sent a PING")
    conn.send(ev.GoAway(ev.ResetCode.PROTOCOL_ERROR, "bye"))
    decoder = FrameDecoder()
    decoder.feed(conn.data_to_send())
    assert [type(e) for e in decoder] == [ev.GoAway]


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    role = Role.HOME if fdp.ConsumeBool() else Role.RELAY
    conn = _victim(role)
    out = FrameDecoder()  # the victim's output, as its peer would decode it
    unacked: dict[int, int] = {}
    for _ in range(200):
        if not fdp.remaining_bytes():
            break
        op = fdp.ConsumeIntInRange(0, 7)
        sid = _stream_id(fdp)
        st = conn.stream_state(sid)
        if op == 0:
            chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64))
            if chunk:
                conn.receive_data(chunk)
        elif op == 1:
            conn.receive_data(_frame(fdp))
        elif op == 2 and unacked.get(sid):
            n = fdp.ConsumeIntInRange(1, unacked[sid])
            conn.acknowledge(sid, n)
            unacked[sid] -= n
        elif op == 3 and conn.send_capacity(sid):
            # Credit may legally reach 2^31-1: send a bounded amount of it.
            n = fdp.ConsumeIntInRange(1, min(conn.send_capacity(sid), 1000))
            conn.send(ev.Data(sid, b"u" * n))
        elif op == 4 and st in (StreamState.OPEN, StreamState.REMOTE_CLOSED):
            conn.send(ev.Eof(sid))
        elif op == 5 and st is not None:
            conn.send(ev.Reset(sid, ev.ResetCode.CANCEL))
            unacked.pop(sid, None)
        elif op == 6:
            out.feed(conn.data_to_send(fdp.ConsumeIntInRange(1, 4096)))
            list(out)  # raises if the victim wrote a bad frame: a crash for the fuzzer
        elif (
            op == 7
            and role is Role.RELAY
            and not (conn.goaway_sent or conn.goaway_received)
            and conn.open_streams < MAX_STREAMS
        ):
            conn.send(ev.Open(conn.next_stream_id(), "192.0.2.1", 1, "h"))
        try:
            while True:
                event = conn.next_event()
                if event is ev.NEED_DATA:
                    break
                if isinstance(event, ev.Data):
                    unacked[event.stream_id] = unacked.get(event.stream_id, 0) + len(event.data)
                elif isinstance(event, ev.Reset):
                    unacked.pop(event.stream_id, None)
        except RemoteProtocolError:
            _check_error_state(conn)
            return
        if role is Role.HOME:
            assert conn.open_streams <= MAX_STREAMS
        for s in range(1, 7):
            assert 0 <= conn.send_capacity(s) <= MAX_WINDOW
    assert conn.state in (SessionState.OPEN, SessionState.DRAINING)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
