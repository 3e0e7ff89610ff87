"""Receive-window tuning: the sans-IO tuner alone and inside two peers in memory."""

from __future__ import annotations

import pytest

from tests.wire.test_mux import drain, hello, transfer, welcome
from tunneld.wire.events import Data, Open, Window
from tunneld.wire.flow import MIN_QUEUE_DELAY, WindowTuner
from tunneld.wire.mux import Connection, Role

KIB = 1024
MIB = 1024 * KIB


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tuned_pair(
    initial: int = 256 * KIB, max_window: int = 16 * MIB, budget: int = 64 * MIB
) -> tuple[Connection, Connection, Clock, WindowTuner]:
    """A home and a relay whose relay tunes the windows it grants (it receives downloads)."""
    clock = Clock()
    tuner = WindowTuner(initial=initial, max_window=max_window, budget=budget)
    home = Connection(Role.HOME, window=initial, max_streams=10)
    relay = Connection(Role.RELAY, window=initial, tuner=tuner, clock=clock)
    home.send(hello(window=initial))
    transfer(home, relay)
    relay.send(welcome(window=initial))
    transfer(relay, home)
    return home, relay, clock, tuner


def open_on(home: Connection, relay: Connection) -> int:
    sid = relay.next_stream_id()
    relay.send(Open(sid, "198.51.100.7", 40000, "home.example.com"))
    transfer(relay, home)
    return sid


class Link:
    """Downloads on `sids`, home to relay, over a link of `rtt` and `rate` bytes/s, in
    steps of 1 ms. The home queues whatever credit allows; its output enters a
    bottleneck FIFO of `buffer` bytes (the home writes only while there is room, as
    a socket under backpressure), which drains at `rate`; bytes arrive rtt/2 after
    leaving it, and WINDOW frames reach the home rtt/2 after the relay queued them.
    `consume` caps a stream's consumer in bytes/s."""

    def __init__(
        self,
        home: Connection,
        relay: Connection,
        clock: Clock,
        sids: list[int],
        *,
        rtt: float,
        rate: float,
        buffer: int = 512 * KIB,
        consume: dict[int, float] | None = None,
    ) -> None:
        self.home, self.relay, self.clock, self.sids = home, relay, clock, sids
        self.rtt, self.rate, self.buffer, self.consume = rtt, rate, buffer, consume or {}
        self.fifo = bytearray()  # the bottleneck queue
        self.sent = 0.0  # fractional bytes the link may still move this step
        self.in_flight: list[tuple[float, bytes]] = []  # (arrival, bytes) toward the relay
        self.back: list[tuple[float, bytes]] = []  # WINDOW frames toward the home
        self.delivered = dict.fromkeys(sids, 0)
        self.held = dict.fromkeys(sids, 0)  # received by the relay, not yet consumed
        self.allowance = dict.fromkeys(sids, 0.0)
        self.max_queue = 0.0  # seconds of bytes waiting at the bottleneck, at worst

    def run(self, seconds: float) -> dict[int, int]:
        step = 0.001
        home, relay, clock = self.home, self.relay, self.clock
        for _ in range(round(seconds / step)):
            clock.now += step
            for sid in self.sids:
                room = home.send_capacity(sid)
                if room:
                    home.send(Data(sid, bytes(room)))
            while len(self.fifo) < self.buffer and home.has_data_to_send():
                self.fifo += home.data_to_send(self.buffer - len(self.fifo))
            self.max_queue = max(self.max_queue, len(self.fifo) / self.rate)
            self.sent += self.rate * step
            n = min(len(self.fifo), int(self.sent))
            if n:
                self.sent -= n
                self.in_flight.append((clock.now + self.rtt / 2, bytes(self.fifo[:n])))
                del self.fifo[:n]
            else:
                self.sent = min(self.sent, self.rate * step)  # an idle link banks nothing
            while self.in_flight and self.in_flight[0][0] <= clock.now:
                relay.receive_data(self.in_flight.pop(0)[1])
                for event in drain(relay):
                    if isinstance(event, Data):
                        self.held[event.stream_id] += len(event.data)
            for sid in self.sids:
                limit = self.consume.get(sid)
                if limit is None:
                    n = self.held[sid]
                else:
                    self.allowance[sid] += limit * step
                    n = min(self.held[sid], int(self.allowance[sid]))
                    self.allowance[sid] -= n
                if n:
                    relay.acknowledge(sid, n)
                    self.held[sid] -= n
                    self.delivered[sid] += n
            grants = relay.data_to_send(1 << 30)
            if grants:
                self.back.append((clock.now + self.rtt / 2, grants))
            while self.back and self.back[0][0] <= clock.now:
                home.receive_data(self.back.pop(0)[1])
                assert all(isinstance(e, Window) for e in drain(home))
        return self.delivered


def test_tuner_alone_doubles_a_window_limited_stream_and_settles_on_rate_x_target() -> None:
    tuner = WindowTuner(initial=256 * KIB, max_window=16 * MIB, budget=64 * MIB)
    window = tuner.opened()
    sample, window = tuner.consumed(None, window, 1000, 0.0)
    sample, window = tuner.consumed(sample, window, 10 * MIB, 1.0)
    assert window == 256 * KIB  # no RTT yet: nothing to size against
    tuner.observe_rtt(0.050)
    tuner.observe_rtt(0.080)  # a queued sample does not raise the minimum
    assert tuner.min_rtt == 0.050
    target = tuner.target_rtt
    assert target == pytest.approx(0.050 + MIN_QUEUE_DELAY)
    t = 2.0
    sample, window = tuner.consumed(sample, window, 0, t)  # an idle gap: a fresh sample

    def deliver(rate: float) -> int:
        """Feed `rate` bytes/s in 1 ms steps until the window changes (or 2 s pass)."""
        nonlocal sample, window, t
        before = window
        for _ in range(2000):
            t += 0.001
            sample, window = tuner.consumed(sample, window, int(rate / 1000), t)
            if window != before:
                break
        return window

    # The whole window crosses every min RTT: window-limited, so it doubles.
    assert deliver(256 * KIB / 0.050) == 512 * KIB
    # 12.5 MB/s fills 512 KiB in 42 ms, under the 50 ms path: still window-limited.
    assert deliver(12.5e6) == 1024 * KIB
    # With 1 MiB the link is full at 12.5 MB/s: the window becomes rate x target
    # (70 ms: the 50 ms path plus 20 ms of queue).
    assert deliver(12.5e6) == pytest.approx(12.5e6 * target, rel=0.02)
    assert tuner.windows_total == window
    # A consumer down to 1 MB/s: the window halves at most per sample, and never
    # goes under the initial window.
    assert deliver(1e6) == pytest.approx(12.5e6 * target / 2, rel=0.02)
    assert deliver(1e6) == 256 * KIB
    assert tuner.windows_total == 256 * KIB
    stats = tuner.statistics()
    assert (stats.grown, stats.trimmed) == (2, 3)


def test_a_download_over_a_long_link_fills_it_with_a_short_queue() -> None:
    home, relay, clock, tuner = tuned_pair()
    sid = open_on(home, relay)
    relay.observe_rtt(0.050)
    rate = 12.5e6
    link = Link(home, relay, clock, [sid], rtt=0.050, rate=rate)
    got = link.run(3.0)
    # A static 256 KiB window would deliver 256 KiB per 50 ms: 5.2 MB/s.
    assert got[sid] / 3.0 > 0.85 * rate
    link.max_queue = 0.0
    got = link.run(2.0)
    assert got[sid] / 5.0 > 0.9 * rate
    # The link's worth plus a short queue (20 ms), not megabytes.
    assert 0.010 < link.max_queue < 0.030
    window = relay._streams[sid].window
    assert window == pytest.approx(rate * 0.070, rel=0.05)


def test_busy_streams_share_one_links_worth_and_slow_readers_hold_back_only_themselves() -> None:
    home, relay, clock, tuner = tuned_pair()
    fast = [open_on(home, relay) for _ in range(3)]
    slow = open_on(home, relay)
    relay.observe_rtt(0.050)
    rate = 12.5e6
    link = Link(home, relay, clock, [*fast, slow], rtt=0.050, rate=rate, consume={slow: 100e3})
    got = link.run(4.0)
    shares = [got[sid] for sid in fast]
    assert min(shares) > 0.8 * max(shares)  # round-robin keeps them even
    assert sum(got.values()) / 4.0 > 0.8 * rate
    windows = sum(relay._streams[sid].window for sid in fast)
    assert windows < 2 * rate * 0.050
    assert relay._streams[slow].window == 256 * KIB  # a slow reader never grows


def test_the_budget_bounds_the_sum_of_windows() -> None:
    home, relay, clock, tuner = tuned_pair(budget=1 * MIB)
    sids = [open_on(home, relay) for _ in range(4)]
    relay.observe_rtt(0.050)
    Link(home, relay, clock, sids, rtt=0.050, rate=50e6).run(2.0)
    assert sum(relay._streams[sid].window for sid in sids) <= 1 * MIB
    assert tuner.windows_total <= 1 * MIB
    assert relay.tuner_statistics() is not None


def test_forgotten_streams_give_their_window_back() -> None:
    home, relay, clock, tuner = tuned_pair()
    sid = open_on(home, relay)
    relay.observe_rtt(0.050)
    Link(home, relay, clock, [sid], rtt=0.050, rate=12.5e6).run(1.0)
    assert tuner.windows_total > 256 * KIB
    from tunneld.wire.events import Reset, ResetCode

    relay.send(Reset(sid, ResetCode.CANCEL))
    assert tuner.windows_total == 0


def test_without_a_tuner_windows_stay_static() -> None:
    home = Connection(Role.HOME, window=64 * KIB, max_streams=10)
    relay = Connection(Role.RELAY, window=64 * KIB)
    home.send(hello(window=64 * KIB))
    transfer(home, relay)
    relay.send(welcome(window=64 * KIB))
    transfer(relay, home)
    clock = Clock()
    sid = open_on(home, relay)
    relay.observe_rtt(0.050)  # no tuner: ignored
    got = Link(home, relay, clock, [sid], rtt=0.050, rate=12.5e6).run(1.0)
    assert got[sid] < 64 * KIB * 21  # one window per round trip at most
    assert relay.tuner_statistics() is None


def test_a_tuner_must_match_the_advertised_window() -> None:
    with pytest.raises(ValueError):
        Connection(
            Role.RELAY,
            window=1000,
            tuner=WindowTuner(initial=2000, max_window=4000, budget=4000),
            clock=Clock(),
        )
    with pytest.raises(ValueError):
        Connection(
            Role.RELAY, window=1000, tuner=WindowTuner(initial=1000, max_window=4000, budget=4000)
        )
