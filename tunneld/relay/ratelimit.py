"""New connections per client address: a token bucket each, in a bounded table.

`rate` tokens per second refill a bucket of `rate` tokens (at least one), so an
address may open `rate` connections at once and `rate` per second after that.
A bucket that has refilled completely carries no information and is dropped
when the table grows, so many addresses cost memory only while they are busy.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["ConnectionRate"]

MAX_TRACKED = 65536


class ConnectionRate:
    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        self.rate = rate
        self.burst = max(1.0, rate)
        self.clock = clock
        self.max_tracked = max_tracked
        self._buckets: dict[str, tuple[float, float]] = {}  # ip -> (tokens, at)

    def allow(self, ip: str) -> bool:
        """Take one token for a new connection from `ip`; False when there is none."""
        if self.rate <= 0:
            return True
        now = self.clock()
        tokens, at = self._buckets.get(ip, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[ip] = (tokens, now)
            return False
        if ip not in self._buckets and len(self._buckets) >= self.max_tracked:
            self._prune(now)
        self._buckets[ip] = (tokens - 1.0, now)
        return True

    def __len__(self) -> int:
        return len(self._buckets)

    def _prune(self, now: float) -> None:
        full = [
            ip
            for ip, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * self.rate >= self.burst
        ]
        for ip in full:
            del self._buckets[ip]
        if len(self._buckets) >= self.max_tracked:
            # Under a flood from very many addresses: forget the oldest half.
            for ip in list(self._buckets)[: len(self._buckets) // 2]:
                del self._buckets[ip]
