"""Prometheus metrics: collectors read status at scrape time; the TCP listener serves them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tunneld.control import Router, request, serve_control
from tunneld.errors import ConfigError
from tunneld.metrics import (
    CONTENT_TYPE,
    HomeCollector,
    RelayCollector,
    make_registry,
    metrics_endpoint,
    render,
    serve_metrics,
)


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def home_status(**changes: Any) -> dict[str, Any]:
    now = time.time()
    status: dict[str, Any] = {
        "role": "home",
        "state": "connected",
        "connected_since": iso(now - 60),
        "reconnects": 3,
        "rtt_ms": 12.5,
        "streams": {
            "active": 2,
            "total": 40,
            "refused": 5,
            "banned": 2,
            "tls_failed": 1,
            "upstream_failed": 7,
            "websockets": 1,
        },
        "bytes": {"in": 1000, "out": 5000},
        "bans": [{"ip": "203.0.113.9", "until": None}, {"ip": "2001:db8::1", "until": None}],
        "certificate": {"not_after": iso(now + 10 * 86400), "self_signed": False},
        "upstream_check": {"reachable": True},
        "token": {"expires_at": iso(now + 20 * 86400)},
        "warnings": [],
    }
    status.update(changes)
    return status


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: bytes, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def test_home_metrics_follow_the_status_at_each_scrape() -> None:
    status = home_status()
    registry = make_registry(HomeCollector(lambda: status))
    text = render(registry)
    assert value(text, "tunneld_session_state", state="connected") == 1
    assert value(text, "tunneld_session_state", state="connecting") == 0
    assert value(text, "tunneld_session_reconnects_total") == 3
    assert value(text, "tunneld_session_ping_rtt_seconds") == pytest.approx(0.0125)
    assert value(text, "tunneld_streams_active") == 2
    assert value(text, "tunneld_streams_total") == 40
    assert value(text, "tunneld_websockets_active") == 1
    assert value(text, "tunneld_tunnel_bytes_total", direction="in") == 1000
    assert value(text, "tunneld_tunnel_bytes_total", direction="out") == 5000
    assert value(text, "tunneld_errors_total", kind="stream_refused") == 3
    assert value(text, "tunneld_errors_total", kind="stream_banned") == 2
    assert value(text, "tunneld_errors_total", kind="tls_failed") == 1
    assert value(text, "tunneld_errors_total", kind="upstream_failed") == 7
    assert value(text, "tunneld_bans_active") == 2
    assert value(text, "tunneld_certificate_expiry_seconds") == pytest.approx(10 * 86400, abs=5)
    assert value(text, "tunneld_certificate_self_signed") == 0
    assert value(text, "tunneld_upstream_up") == 1
    assert value(text, "tunneld_token_expiry_seconds") == pytest.approx(20 * 86400, abs=5)

    # Nothing is cached: the next scrape sees the new state.
    status.update(state="blocked", rtt_ms=None, upstream_check={"reachable": False})
    text = render(registry)
    assert value(text, "tunneld_session_state", state="blocked") == 1
    assert value(text, "tunneld_session_state", state="connected") == 0
    assert value(text, "tunneld_upstream_up") == 0
    assert not any(name == "tunneld_session_ping_rtt_seconds" for name, _ in samples(text))


def test_unknown_values_are_left_out_rather_than_made_up() -> None:
    status = home_status(
        connected_since=None,
        rtt_ms=None,
        certificate=None,
        token=None,
        upstream_check={"reachable": None},
    )
    names = {name for name, _ in samples(render(make_registry(HomeCollector(lambda: status))))}
    for absent in (
        "tunneld_session_connected_since_timestamp_seconds",
        "tunneld_session_ping_rtt_seconds",
        "tunneld_certificate_expiry_seconds",
        "tunneld_token_expiry_seconds",
        "tunneld_upstream_up",
    ):
        assert absent not in names


def test_relay_metrics() -> None:
    now = time.time()
    status = {
        "role": "relay",
        "state": "running",
        "sessions": [
            {
                "hostnames": ["a.example.com", "b.example.com"],
                "streams": {"active": 3, "total": 9},
                "bans": 2,
                "going_away": False,
            },
            {
                "hostnames": ["a.example.com"],
                "streams": {"active": 1, "total": 4},
                "bans": 0,
                "going_away": True,
            },
        ],
        "connections": {"total": 50, "routed": 30, "refused": {"unknown_name": 4, "banned": 2}},
        "certificate": {"not_after": iso(now + 86400)},
    }
    text = render(make_registry(RelayCollector(lambda: status)))
    assert value(text, "tunneld_relay_state", state="running") == 1
    assert value(text, "tunneld_relay_sessions") == 2
    assert value(text, "tunneld_relay_hostnames") == 2  # a draining session routes nothing
    assert value(text, "tunneld_relay_streams_active") == 4
    assert value(text, "tunneld_relay_bans") == 2
    assert value(text, "tunneld_relay_connections_total") == 50
    assert value(text, "tunneld_relay_routed_total") == 30
    assert value(text, "tunneld_relay_refused_total", reason="unknown_name") == 4
    assert value(text, "tunneld_relay_refused_total", reason="banned") == 2
    assert value(text, "tunneld_relay_certificate_expiry_seconds") == pytest.approx(86400, abs=5)
    assert value(text, "tunneld_build_info", role="relay", version=prometheus_version(text)) == 1


def prometheus_version(text: bytes) -> str:
    for (name, labels), _ in samples(text).items():
        if name == "tunneld_build_info":
            return dict(labels)["version"]
    raise AssertionError("no tunneld_build_info")


def test_registries_are_per_process_object_not_global() -> None:
    a = make_registry(HomeCollector(lambda: home_status(reconnects=1)))
    b = make_registry(HomeCollector(lambda: home_status(reconnects=2)))
    assert value(render(a), "tunneld_session_reconnects_total") == 1
    assert value(render(b), "tunneld_session_reconnects_total") == 2
    global_text = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "tunneld_" not in global_text


async def http(port: int, raw: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
    return data


async def test_tcp_listener_serves_metrics_and_only_metrics() -> None:
    registry = make_registry(HomeCollector(lambda: home_status()))
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(serve_metrics, ("127.0.0.1", 0), registry)
        port = int(bound[0].rsplit(":", 1)[1])
        answer = await http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert f"content-type: {CONTENT_TYPE}".encode() in head.lower()
        assert value(body, "tunneld_streams_active") == 2
        assert (await http(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 404 ")
        assert (await http(port, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(
            b"HTTP/1.1 405 "
        )
        head_only = await http(port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head_only.startswith(b"HTTP/1.1 200 ") and head_only.endswith(b"\r\n\r\n")
        # Garbage or silence never hurts the listener.
        await http(port, b"\x16\x03\x01 not http\r\n\r\n")
        assert (await http(port, b"GET /metrics HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        nursery.cancel_scope.cancel()


async def test_tcp_listener_bind_failure_names_the_config_key() -> None:
    registry = make_registry(HomeCollector(lambda: home_status()))
    taken = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = taken.socket.getsockname()[1]
    try:
        with pytest.raises(ConfigError, match=r"f\.toml: \[daemon\] metrics_listen: cannot listen"):
            await serve_metrics(
                ("127.0.0.1", port), registry, label="f.toml: [daemon] metrics_listen"
            )
    finally:
        await taken.aclose()


async def test_control_socket_serves_metrics(tmp_path: Path) -> None:
    router = Router()
    router.add("GET", "/metrics", metrics_endpoint(make_registry(HomeCollector(home_status))))
    sock = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, sock, router)
        status, body = await request(sock, "GET", "/metrics")
        assert status == 200
        assert value(body, "tunneld_bans_active") == 2
        nursery.cancel_scope.cancel()
