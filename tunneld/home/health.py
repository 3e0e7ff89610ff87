"""Background checks for `status`: can the upstream be reached, and when does the token expire.

The upstream probe is a bare TCP connect (no request, so the app's logs and
its ban counters stay quiet) every `PROBE_INTERVAL`, and at once after a
reload. The token check decodes the claims without verifying them (the relay
does that): only the expiry matters here, and it is logged while it is near.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from tunneld.config import HomeConfig
from tunneld.errors import TokenError
from tunneld.tokens import decode_claims_unverified

__all__ = ["HealthChecks", "ProbeResult", "token_facts", "token_warnings"]

log = logging.getLogger("tunneld.health")

PROBE_INTERVAL = 30.0
TOKEN_WARN_DAYS = 14
TOKEN_CHECK_INTERVAL = 12 * 3600.0


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@dataclass(frozen=True)
class ProbeResult:
    url: str
    reachable: bool
    checked_at: float  # Unix time
    latency: float | None  # seconds to connect
    error: str | None


def token_facts(token: str, now: float) -> dict[str, Any] | None:
    """What status shows about the token (never the token itself); None if unreadable."""
    try:
        claims = decode_claims_unverified(token)
    except TokenError:
        return None
    return {
        "id": claims.token_id,
        "subject": claims.subject,
        "hostnames": list(claims.hostnames),
        "expires_at": _iso(claims.expires_at),
        "days_left": round((claims.expires_at - now) / 86400, 1),
    }


def token_warnings(token: str, now: float) -> list[str]:
    facts = token_facts(token, now)
    if facts is None:
        return ["the relay token cannot be read (is it a tunneld token?)"]
    days = facts["days_left"]
    if days <= 0:
        return [f"the relay token expired at {facts['expires_at']}: issue a new one"]
    if days <= TOKEN_WARN_DAYS:
        return [
            f"the relay token expires in {days} days ({facts['expires_at']}): issue a new one "
            "with `tunneld token issue`, put it in the config and reload"
        ]
    return []


class HealthChecks:
    """Started with `nursery.start(checks.run)`; reads the config through `config()` each time."""

    def __init__(self, config: Callable[[], HomeConfig], probe_interval: float = PROBE_INTERVAL):
        self._config = config
        self.probe_interval = probe_interval
        self.upstream: ProbeResult | None = None
        self._wake = trio.Event()

    def recheck(self) -> None:
        """Probe the upstream and look at the token now (after a reload)."""
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        token_due = trio.current_time()
        while True:
            self._wake = trio.Event()
            if trio.current_time() >= token_due:
                self.log_token_warnings()
                token_due = trio.current_time() + TOKEN_CHECK_INTERVAL
            await self.probe()
            with trio.move_on_after(self.probe_interval):
                await self._wake.wait()
                token_due = trio.current_time()  # a reload may bring a new token

    def log_token_warnings(self) -> None:
        for warning in token_warnings(self._config().relay.token, time.time()):
            log.warning("%s", warning)

    async def probe(self) -> ProbeResult:
        cfg = self._config().upstream
        start = trio.current_time()
        error: str | None = None
        try:
            with trio.fail_after(cfg.connect_timeout):
                stream = await trio.open_tcp_stream(cfg.host, cfg.port)
            await stream.aclose()
        except trio.TooSlowError:
            error = f"no TCP connection within {cfg.connect_timeout:g}s"
        except OSError as exc:
            error = exc.strerror or str(exc) or type(exc).__name__
        latency = None if error else trio.current_time() - start
        before = self.upstream
        self.upstream = ProbeResult(cfg.url, error is None, time.time(), latency, error)
        if error and (before is None or before.reachable or before.url != cfg.url):
            log.warning("upstream %s unreachable: %s", cfg.url, error)
        elif not error and before is not None and not before.reachable:
            log.info("upstream %s reachable again", cfg.url)
        return self.upstream

    def status(self) -> dict[str, Any]:
        result = self.upstream
        if result is None:
            return {"url": self._config().upstream.url, "reachable": None, "checked_at": None}
        return {
            "url": result.url,
            "reachable": result.reachable,
            "checked_at": _iso(result.checked_at),
            "latency_ms": round(result.latency * 1000, 2) if result.latency is not None else None,
            "error": result.error,
        }

    def warnings(self) -> list[str]:
        out = token_warnings(self._config().relay.token, time.time())
        result = self.upstream
        if result is not None and not result.reachable:
            out.append(f"the upstream {result.url} is unreachable: {result.error}")
        return out
