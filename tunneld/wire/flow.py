"""Receive-window tuning (sans-IO): how much credit each stream is granted.

A static window caps one stream at window / RTT: 256 KiB over a 50 ms link is
5 MB/s, whatever the link's rate. So the receiver sizes each stream's window
from what its consumer takes, aiming at a full link with a short queue. Over
samples of two target round trips it measures the stream's delivery rate, then:

* **window-limited** (rate x min RTT is at least `LIMITED` of the window: the
  whole window crosses the path every round trip, so nothing waits in a queue
  and the window, not the link, sets the pace): the window doubles, like TCP's
  slow start;
* otherwise the window moves to `rate x (min RTT + queue delay)`: enough to keep
  the link busy plus `queue delay` worth of bytes waiting at its bottleneck, so a
  small request queued behind a download waits little. A window above that (a
  stream sharing the link with others, or an app that sends slowly) shrinks, by
  at most a quarter per sample. Several busy streams each measure their share,
  so their windows add up to about one link's worth; a stream whose consumer is
  slow delivers little and holds back only itself.

Windows never fall below the advertised initial window (the peer may always
send that much: it is what HELLO/WELCOME promised) and never grow past
`max_window`. Growth beyond the initial windows comes out of the session's
`budget`: the sum of all live streams' windows stays within it, except for the
initial windows themselves, which the handshake already promised.

The queue delay is a quarter of the minimum RTT, and at least `MIN_QUEUE_DELAY`:
on loopback the "RTT" under load is mostly waiting for a CPU, which more bytes in
flight do not lengthen, and 20 ms of a fast consumer's rate keeps a download from
stalling on credit there.

Nothing here reads a clock: the caller passes times (seconds, any monotonic
origin) and RTT samples (from PING/PONG).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

MIN_QUEUE_DELAY: Final = 0.020  # seconds
QUEUE_SHARE: Final = 0.25  # of the minimum RTT
LIMITED: Final = 0.9  # rate x min RTT over window at or above this: window-limited
EARLY: Final = 1.1  # ... and at or above this, after one target round trip already
SAMPLE_RTTS: Final = 2.0  # a rate sample spans at least this many target round trips
# A sample that spans more than this many target round trips had an idle gap in it:
# it says nothing about the link, so it is dropped and a new one begins.
STALE_RTTS: Final = 8.0
SHRINK: Final = 0.5  # most a window shrinks per sample


@dataclass(frozen=True)
class TunerStatistics:
    min_rtt: float | None  # seconds, None before the first RTT sample
    windows_total: int  # sum of the live streams' windows
    budget: int
    grown: int  # window changes up
    trimmed: int  # window changes down


@dataclass(slots=True)
class StreamSample:
    """One stream's tuning state (kept on the stream)."""

    start: float  # the rate sample's start
    nbytes: int = 0  # consumed since `start`


class WindowTuner:
    """Sizes stream windows for one session; see the module docstring."""

    def __init__(self, *, initial: int, max_window: int, budget: int) -> None:
        if not 1 <= initial <= max_window:
            raise ValueError("need 1 <= initial <= max_window")
        if budget < initial:
            raise ValueError("the budget must hold at least one initial window")
        self.initial = initial
        self.max_window = max_window
        self.budget = budget
        self.min_rtt: float | None = None
        self.windows_total = 0
        self._grown = 0
        self._trimmed = 0

    def observe_rtt(self, rtt: float) -> None:
        """A PING's round trip. The minimum is the path's delay without a queue."""
        if rtt > 0 and (self.min_rtt is None or rtt < self.min_rtt):
            self.min_rtt = rtt

    @property
    def target_rtt(self) -> float | None:
        """The round trip the windows aim at: min RTT plus the accepted queue delay."""
        if self.min_rtt is None:
            return None
        return self.min_rtt + max(MIN_QUEUE_DELAY, QUEUE_SHARE * self.min_rtt)

    def opened(self) -> int:
        """A new stream starts with the initial window; returns it."""
        self.windows_total += self.initial
        return self.initial

    def closed(self, window: int) -> None:
        self.windows_total -= window

    def consumed(
        self, sample: StreamSample | None, window: int, nbytes: int, now: float
    ) -> tuple[StreamSample, int]:
        """The stream's consumer took `nbytes` at `now`: the sample to keep and the
        stream's window from now on."""
        target = self.target_rtt
        if sample is None or target is None:
            return StreamSample(now, nbytes), window
        elapsed = now - sample.start
        if elapsed < 0:
            return sample, window  # a new window settling: not measured yet
        if elapsed > STALE_RTTS * target:  # an idle gap: start afresh
            sample.start, sample.nbytes = now, nbytes
            return sample, window
        sample.nbytes += nbytes
        if elapsed < target:
            return sample, window
        min_rtt = self.min_rtt
        assert min_rtt is not None
        rate = sample.nbytes / elapsed
        limited = rate * min_rtt / window
        # A sample of one round trip is noisy (it may hold one burst of credit more or
        # less), so it decides only when it is clearly window-limited: a fast start.
        if elapsed < SAMPLE_RTTS * target and limited < EARLY:
            return sample, window
        sample.start, sample.nbytes = now, 0
        if limited >= LIMITED:
            wanted = 2 * window
        else:
            wanted = min(2 * window, int(rate * target))
        if wanted > window:
            new = self._bounded(window, min(self.max_window, wanted))
            self._grown += new > window
        else:
            new = max(self.initial, window - int(window * SHRINK), wanted)
            self.windows_total -= window - new
            self._trimmed += new < window
        if new != window:
            # The new credit reaches the sender and its bytes come back a round trip
            # from now: measure after that.
            sample.start = now + min_rtt
        return sample, new

    def _bounded(self, window: int, wanted: int) -> int:
        """`wanted`, or what the budget leaves of it."""
        grant = max(0, min(wanted - window, self.budget - self.windows_total))
        self.windows_total += grant
        return window + grant

    def statistics(self) -> TunerStatistics:
        return TunerStatistics(
            self.min_rtt, self.windows_total, self.budget, self._grown, self._trimmed
        )


# --- sending: pacing when there is no credit clock ----------------------------------
PACE_GAIN: Final = 1.25  # pace at this much over the measured delivery rate
PACE_SAMPLE: Final = 0.1  # seconds, at least, per delivery-rate sample (and two RTTs)
PACE_MEMORY: Final = 60.0  # seconds a busy sample's rate is remembered
PACE_BURST: Final = 0.005  # seconds of pacing rate sent at once
PACE_MIN_BURST: Final = 64 * 1024


class Pacer:
    """Spreads what a session sends when no returning credit clocks it.

    While a stream waits for credit, its sending follows the WINDOWs that come back,
    one grant at a time: the peer's consumption paces it, as ACKs pace TCP, and
    windows grow under that clock. After a pause a stream may hold a whole window of
    credit (a response that follows another on a keep-alive connection): sent at
    once it would sit in the path's bottleneck queue, and a small request on another
    stream would wait behind all of it. So while no stream has waited for credit
    within the last half round trip, the session sends at `PACE_GAIN` times the
    delivery rate it measured, and the queue grows by a fifth of the burst only. Once
    a stream waits for credit again the clock is back and pacing stops: a download
    is never held back by it.

    The delivery rate is the credit the peer returns (WINDOW increments: bytes its
    consumers took) per sample of at least two round trips. Only samples taken while
    the sender was busy (data waiting in the mux or for credit) measure the path; an
    idle sender's are dropped. The rate paced is the median of the busy samples of the
    last `PACE_MEMORY` seconds, or the latest if higher (while windows open up the
    median lags): one sample inflated by credit returned in a clump does not set it
    for long. With none, nothing is paced.
    """

    def __init__(self) -> None:
        self._start = 0.0
        self._credited = 0
        self._busy = False
        self._samples: list[tuple[float, float]] = []  # (time, rate) of busy samples
        self._rate = 0.0  # pacing rate, bytes/s; 0 = not pacing
        self._clocked_at = float("-inf")  # the last time a stream waited for credit
        self._pacing = False  # in a paced burst
        self._tokens = 0.0
        self._filled_at = 0.0

    @property
    def rate(self) -> float:
        """Bytes per second sent while unclocked (0: not pacing)."""
        return self._rate

    def waited(self, now: float) -> None:
        """A stream waited for credit: returning WINDOWs clock the sender again."""
        self._clocked_at = now
        self._busy = True

    def credited(self, nbytes: int, now: float, busy: bool, rtt: float | None) -> None:
        """The peer returned `nbytes` of credit; `busy`: data waits to be sent; `rtt`:
        the session's shortest round trip, if known."""
        self._credited += nbytes
        self._busy = self._busy or busy
        elapsed = now - self._start
        length = max(PACE_SAMPLE, 2 * (rtt or 0.0))
        if elapsed < length:
            return
        samples = [(t, r) for t, r in self._samples if now - t < PACE_MEMORY]
        if self._busy and elapsed < 4 * length:  # else a pause in it: not a busy sample
            samples.append((now, self._credited / elapsed))
        self._samples = samples
        rates = sorted(r for _, r in samples)
        if rates:  # the latest busy sample too: it leads the median while rates grow
            self._rate = PACE_GAIN * max(rates[len(rates) // 2], samples[-1][1])
        else:
            self._rate = 0.0
        self._start, self._credited, self._busy = now, 0, False

    def delay(self, nbytes: int, now: float, rtt: float | None, backlog: int) -> float:
        """Seconds to wait before sending `nbytes` (0: now); counts them as sent.
        `rtt`: the session's shortest round trip, if known; `backlog`: bytes still
        queued behind these. A paced burst is paced to its end (no backlog left), even
        if a stream waits for credit meanwhile: it took that credit into the queue."""
        rate = self._rate
        burst = max(PACE_MIN_BURST, rate * PACE_BURST)
        if not self._pacing:
            if rate <= 0 or now - self._clocked_at < 0.5 * (rtt or PACE_SAMPLE):
                self._tokens, self._filled_at = burst, now
                return 0.0
            self._pacing = True
        self._tokens = min(burst, self._tokens + (now - self._filled_at) * rate)
        self._filled_at = now
        self._tokens -= nbytes
        self._pacing = backlog > 0
        return 0.0 if self._tokens >= 0 else -self._tokens / rate
