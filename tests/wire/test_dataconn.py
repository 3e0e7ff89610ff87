"""Data connections in the sans-IO core (PROTOCOL.md 11): the handshake's offer,
DIAL and ATTACH, credit for bytes that travel elsewhere, the ticket line."""

from __future__ import annotations

import dataclasses
import os

import pytest

from tests.wire.test_mux import HOME_WINDOW, RELAY_WINDOW, drain, hello, transfer, welcome
from tunneld.errors import LocalProtocolError, RemoteProtocolError
from tunneld.wire.dataconn import LINE_SIZE, Preamble, is_data_start, parse_preamble, preamble
from tunneld.wire.events import TICKET_SIZE, Dial, Open, Reset, Window
from tunneld.wire.frames import decode, encode
from tunneld.wire.mux import Connection, Role

TICKET = bytes(range(TICKET_SIZE))


def agreed(home_offer: int = 8, relay_offer: int = 4) -> tuple[Connection, Connection]:
    home = Connection(Role.HOME, window=HOME_WINDOW, max_streams=10)
    relay = Connection(Role.RELAY, window=RELAY_WINDOW)
    home.send(dataclasses.replace(hello(), data_connections=home_offer))
    transfer(home, relay)
    relay.send(dataclasses.replace(welcome(), data_connections=relay_offer))
    transfer(relay, home)
    return home, relay


def test_the_offer_is_optional_on_the_wire_and_absent_means_none() -> None:
    plain = encode(hello())
    assert b"data_connections" not in plain  # what a peer from before sends, byte for byte
    assert decode(plain) == [hello()]
    offered = dataclasses.replace(welcome(), data_connections=4)
    assert decode(encode(offered)) == [offered]


def test_dial_and_attach_round_trip_and_keep_the_ticket_out_of_repr() -> None:
    attach = Open(5, "2001:db8::7", 443, "home.example.com", TICKET)
    assert decode(encode(Dial(TICKET)) + encode(attach)) == [Dial(TICKET), attach]
    assert TICKET.hex() not in repr(attach) and repr(TICKET) not in repr(Dial(TICKET))
    with pytest.raises(LocalProtocolError):
        encode(Dial(b"short"))


@pytest.mark.parametrize(("home_offer", "relay_offer"), [(0, 4), (8, 0), (0, 0)])
def test_without_both_offers_there_is_no_dial_or_attach(home_offer: int, relay_offer: int) -> None:
    home, relay = agreed(home_offer, relay_offer)
    assert not home.data_connections and not relay.data_connections
    with pytest.raises(LocalProtocolError):
        relay.send(Dial(TICKET))
    with pytest.raises(LocalProtocolError):
        relay.send(Open(relay.next_stream_id(), "192.0.2.1", 1, "home.example.com", TICKET))
    home.receive_data(encode(Dial(TICKET)))  # a relay that sends one anyway
    with pytest.raises(RemoteProtocolError, match="DIAL without data connections"):
        drain(home)


def test_attached_stream_bytes_take_and_return_credit_as_data_would() -> None:
    home, relay = agreed()
    assert home.data_connections and relay.data_connections
    relay.send(Dial(TICKET))
    sid = relay.next_stream_id()
    relay.send(Open(sid, "192.0.2.1", 1, "home.example.com", TICKET))
    events = transfer(relay, home)
    assert events[0] == Dial(TICKET) and events[1].ticket == TICKET  # type: ignore[attr-defined]

    # The home sends a response on the data connection: it spends the relay's credit.
    assert home.send_capacity(sid) == RELAY_WINDOW
    home.spend(sid, RELAY_WINDOW)
    assert home.send_capacity(sid) == 0
    with pytest.raises(LocalProtocolError):
        home.spend(sid, 1)
    # The relay counts what the client's socket took and grants it back.
    assert relay.received(sid, RELAY_WINDOW)
    relay.acknowledge(sid, RELAY_WINDOW)
    assert [e for e in transfer(relay, home) if isinstance(e, Window)]
    assert home.send_capacity(sid) == RELAY_WINDOW
    # More than the credit it granted: the caller resets the stream.
    assert not relay.received(sid, RELAY_WINDOW + 1)
    relay.send(Reset(sid))
    assert relay.received(sid, 10)  # a forgotten stream's bytes are dropped quietly


def test_the_ticket_line() -> None:
    ticket = os.urandom(TICKET_SIZE)
    line = preamble(ticket)
    assert len(line) == LINE_SIZE and line.endswith(b"\n")
    assert parse_preamble(line) == (ticket, LINE_SIZE)
    assert parse_preamble(line + b"extra") == (ticket, LINE_SIZE)
    for cut in (1, 10, LINE_SIZE - 1):
        assert parse_preamble(line[:cut]) is Preamble.NEED_MORE
        assert is_data_start(line[:cut])
    assert parse_preamble(b"\x16\x03\x01\x02\x00") is Preamble.NOT_DATA  # a ClientHello
    assert not is_data_start(b"\x16")
    bad = [
        line[:-1] + b"x",
        line.replace(ticket.hex().encode(), ticket.hex().upper().encode()),
        line[: LINE_SIZE - 3] + b"zz\n",
        b"TUNNELD-DATA/1 ab\n",
    ]
    for wrong in bad:
        assert parse_preamble(wrong) is Preamble.MALFORMED, wrong
