"""The daemon's background checks: upstream TCP probe and token expiry warnings."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tunneld.config import HomeConfig, HomeRelaySection, TlsSection, UpstreamSection
from tunneld.home.health import HealthChecks, token_facts, token_warnings
from tunneld.tokens import issue_token

DAY = 86400.0


def token(ttl: float, now: float | None = None) -> str:
    return issue_token(
        Ed25519PrivateKey.generate(),
        hostnames=["home.example.com"],
        subject="home",
        ttl=ttl,
        now=now,
    )


async def until(predicate: Callable[[], bool]) -> None:
    for _ in range(500):  # 5 s at most
        if predicate():
            return
        await trio.sleep(0.01)
    raise AssertionError("timed out")


def config(upstream: str, tok: str = "") -> HomeConfig:
    return HomeConfig(
        path=Path("/x/tunneld.toml"),
        relay=HomeRelaySection(
            url="wss://relay.example.com/v1/tunnel", token=tok or token(90 * DAY)
        ),
        tls=TlsSection(hostnames=("home.example.com",)),
        upstream=UpstreamSection(url=upstream, connect_timeout=2.0),
    )


def test_token_warnings_start_14_days_before_expiry() -> None:
    now = time.time()
    assert token_warnings(token(30 * DAY, now), now) == []
    [soon] = token_warnings(token(10 * DAY, now), now)
    assert "expires in 10.0 days" in soon and "tunneld token issue" in soon
    [gone] = token_warnings(token(DAY, now - 2 * DAY), now)
    assert "expired" in gone
    assert token_warnings("not-a-token", now) == [
        "the relay token cannot be read (is it a tunneld token?)"
    ]


def test_token_facts_never_carry_the_token() -> None:
    now = time.time()
    tok = token(30 * DAY, now)
    facts = token_facts(tok, now)
    assert facts is not None
    assert facts["days_left"] == 30.0 and facts["hostnames"] == ["home.example.com"]
    signature = tok.rsplit(".", 1)[1]
    assert all(signature not in str(v) and tok not in str(v) for v in facts.values())
    assert token_facts("garbage", now) is None


async def test_probe_reports_reachable_then_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    current = config(f"http://127.0.0.1:{port}")
    checks = HealthChecks(lambda: current)
    result = await checks.probe()
    assert result.reachable and result.error is None and result.latency is not None
    assert checks.status()["reachable"] is True and checks.warnings() == []

    await listener.aclose()
    with caplog.at_level(logging.WARNING, logger="tunneld.health"):
        result = await checks.probe()
        await checks.probe()  # still down: logged once, not on every probe
    assert not result.reachable and result.error
    assert checks.status()["reachable"] is False
    assert [w for w in checks.warnings() if "unreachable" in w]
    assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1


async def test_recheck_probes_the_new_upstream_at_once() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    current = [config("http://127.0.0.1:1")]  # nothing listens on port 1
    checks = HealthChecks(lambda: current[0], probe_interval=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(checks.run)
        await until(lambda: checks.upstream is not None)
        assert checks.upstream is not None and not checks.upstream.reachable
        current[0] = dataclasses.replace(
            current[0], upstream=UpstreamSection(url=f"http://127.0.0.1:{port}")
        )
        checks.recheck()  # a reload: no waiting an hour for the next probe
        await until(lambda: checks.upstream is not None and checks.upstream.reachable)
        assert checks.status()["url"] == f"http://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()
    await listener.aclose()


async def test_expiring_token_is_logged_when_checks_start(caplog: pytest.LogCaptureFixture) -> None:
    current = config("http://127.0.0.1:1", token(3 * DAY))
    checks = HealthChecks(lambda: current, probe_interval=3600)
    with caplog.at_level(logging.WARNING, logger="tunneld.health"):
        async with trio.open_nursery() as nursery:
            await nursery.start(checks.run)
            await until(lambda: checks.upstream is not None)
            nursery.cancel_scope.cancel()
    assert any("relay token expires in 3.0 days" in r.getMessage() for r in caplog.records)
