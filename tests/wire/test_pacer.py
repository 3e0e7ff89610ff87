"""The sender's pacer (wire/flow.py): a burst of banked credit leaves at a little over
the measured delivery rate, and nothing that the returning credit clocks is slowed."""

from __future__ import annotations

import pytest

from tunneld.wire.flow import PACE_GAIN, PACE_MEMORY, PACE_MIN_BURST, Pacer

KIB = 1024
RTT = 0.1
RATE = 5_000_000.0  # bytes/s the peer takes in: a 40 Mbit/s link
CHUNK = 64 * KIB


def measured(rate: float = RATE, seconds: float = 2.0, start: float = 0.0) -> Pacer:
    """A pacer that saw a busy sender's credit come back at `rate` for `seconds`."""
    pacer = Pacer()
    step = 0.01
    for i in range(1, int(seconds / step) + 1):
        now = start + i * step
        pacer.waited(now)  # a stream waiting for credit: the sender is busy
        pacer.credited(int(rate * step), now, busy=True, rtt=RTT)
    return pacer


def send(pacer: Pacer, nbytes: int, now: float) -> float:
    """Write `nbytes` in 64 KiB pieces as the session's writer does (sleeping when told
    to); returns when the last piece left."""
    left = nbytes
    while left > 0:
        piece = min(CHUNK, left)
        left -= piece
        now += pacer.delay(piece, now, RTT, backlog=left)
    return now


def test_no_pacing_before_any_measurement() -> None:
    pacer = Pacer()
    assert pacer.rate == 0
    assert send(pacer, 1024 * KIB, 10.0) == 10.0


def test_a_burst_after_a_pause_leaves_at_a_little_over_the_delivery_rate() -> None:
    pacer = measured()
    assert pacer.rate == pytest.approx(PACE_GAIN * RATE, rel=0.02)
    burst = 640 * KIB
    now = 2.0 + RTT  # a round trip after the last wait for credit: no clock
    took = send(pacer, burst, now) - now
    expected = (burst - PACE_MIN_BURST) / (PACE_GAIN * RATE)  # all but the first piece wait
    assert 0.9 * expected <= took <= 1.1 * expected
    # so the bottleneck (draining at RATE) gains only about a fifth of the burst
    assert burst - RATE * took < 0.3 * burst


def test_sending_clocked_by_returning_credit_is_never_slowed() -> None:
    pacer = measured()
    now = 2.0 + RTT / 4  # a stream waited for credit a quarter of a round trip ago
    assert send(pacer, 640 * KIB, now) == now


def test_a_paced_burst_is_paced_to_its_end_when_a_stream_waits_for_credit() -> None:
    # The stream moved all its credit into the session's queue at once and then waited
    # for more: that wait is no clock for what is still queued.
    pacer = measured()
    now = 2.0 + RTT
    now += pacer.delay(CHUNK, now, RTT, backlog=9 * CHUNK)
    now += pacer.delay(CHUNK, now, RTT, backlog=8 * CHUNK)
    pacer.waited(now)
    assert pacer.delay(CHUNK, now, RTT, backlog=7 * CHUNK) > 0
    done = send(pacer, 7 * CHUNK, now)
    assert done - now >= 6 * CHUNK / (PACE_GAIN * RATE)
    # the burst is over; with the stream waiting for credit, sending is clocked again
    pacer.waited(done)
    assert send(pacer, 10 * CHUNK, done) == done


def test_an_idle_sender_says_nothing_about_the_path() -> None:
    pacer = measured()
    for i in range(1, 51):  # 5 s of a trickle of credit with nothing waiting to go
        pacer.credited(1000, 2.0 + i * 0.1, busy=False, rtt=RTT)
    assert pacer.rate == pytest.approx(PACE_GAIN * RATE, rel=0.02)


def test_one_clump_of_credit_does_not_set_the_rate_for_long() -> None:
    pacer = measured(seconds=4.0)
    pacer.waited(4.2)
    pacer.credited(int(3 * RATE * 0.2), 4.2, busy=True, rtt=RTT)  # three times the rate
    assert pacer.rate > 2 * PACE_GAIN * RATE  # the latest sample leads for a moment
    pacer.waited(4.4)
    pacer.credited(int(RATE * 0.2), 4.4, busy=True, rtt=RTT)
    assert pacer.rate == pytest.approx(
        PACE_GAIN * RATE, rel=0.02
    )  # then the median of the samples holds


def test_the_rate_follows_windows_that_open_up() -> None:
    # While windows grow, each sample beats the last: the median lags, the latest leads.
    pacer = Pacer()
    now, rate = 0.0, 500_000.0
    for _ in range(8):
        now += 0.25
        pacer.waited(now)
        pacer.credited(int(rate * 0.25), now, busy=True, rtt=RTT)
        assert pacer.rate == pytest.approx(PACE_GAIN * rate, rel=0.02)
        rate *= 1.5


def test_what_was_measured_is_forgotten_after_a_while() -> None:
    pacer = measured()
    later = 2.0 + PACE_MEMORY + 1
    pacer.credited(1000, later, busy=False, rtt=RTT)
    assert pacer.rate == 0
    assert send(pacer, 1024 * KIB, later) == later
