"""Prometheus metrics for the daemon and the relay, and a tiny TCP listener for them.

The collectors read the process's status object at scrape time (the same dict
`tunneld status --json` prints), so metrics and status never disagree and
nothing is counted twice. Each process object builds its own CollectorRegistry:
nothing is registered in prometheus-client's global registry.
"""

from __future__ import annotations

import calendar
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import h11
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tunneld import __version__
from tunneld.config import Listen, format_listen
from tunneld.control import ControlRequest, ControlResponse, Handler
from tunneld.errors import ConfigError
from tunneld.httpio import next_event, send_response

__all__ = [
    "CONTENT_TYPE",
    "HomeCollector",
    "RelayCollector",
    "make_registry",
    "metrics_endpoint",
    "render",
    "serve_metrics",
]

log = logging.getLogger("tunneld.metrics")

# The classic text format every Prometheus version reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HOME_STATES = ("connecting", "connected", "blocked", "stopping")
RELAY_STATES = ("starting", "running", "stopping")
REQUEST_TIMEOUT = 10.0
MAX_REQUEST_HEAD = 16 * 1024

StatusSource = Callable[[], Mapping[str, Any]]


def _timestamp(iso: object) -> float | None:
    """`2024-05-01T12:00:00Z` (the status format) as Unix time."""
    if not isinstance(iso, str):
        return None
    try:
        return float(calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _build_info(role: str) -> GaugeMetricFamily:
    info = GaugeMetricFamily(
        "tunneld_build_info", "Always 1; labels say what runs.", labels=["version", "role"]
    )
    info.add_metric([__version__, role], 1)
    return info


def _states(name: str, doc: str, states: tuple[str, ...], current: object) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["state"])
    for state in states:
        family.add_metric([state], 1 if state == current else 0)
    return family


def _certificate(prefix: str, cert: object, now: float) -> Iterator[Metric]:
    if not isinstance(cert, Mapping):
        return
    not_after = _timestamp(cert.get("not_after"))
    if not_after is None:
        return
    yield _gauge(
        f"{prefix}_expiry_timestamp_seconds", "When the certificate expires (Unix time).", not_after
    )
    yield _gauge(
        f"{prefix}_expiry_seconds",
        "Seconds until the certificate expires (negative once expired).",
        not_after - now,
    )
    if "self_signed" in cert:
        yield _gauge(
            f"{prefix}_self_signed",
            "1 while the certificate is the self-signed bootstrap one.",
            1 if cert["self_signed"] else 0,
        )


def _home_paths_and_routes(st: Mapping[str, Any]) -> Iterator[Metric]:
    """The LAN listener, routes and client certificates (issue 17)."""
    lan = (st.get("paths") or {}).get("lan") or {}
    yield _gauge(
        "tunneld_lan_connections_active",
        "Connections being served by the [lan] listener.",
        lan.get("active", 0),
    )
    yield _counter(
        "tunneld_lan_connections",
        "Connections accepted by the [lan] listener.",
        lan.get("total", 0),
    )
    yield _counter(
        "tunneld_client_certificate_refused",
        "Handshakes refused for want of a valid client certificate.",
        (st.get("streams") or {}).get("certificate_refused", 0),
    )
    requests = CounterMetricFamily(
        "tunneld_route_requests", "Requests per route.", labels=["route"]
    )
    misdirected = CounterMetricFamily(
        "tunneld_route_misdirected",
        "421 answers per route: a Host that names no route or differs from the SNI.",
        labels=["route"],
    )
    for route in st.get("routes") or []:
        requests.add_metric([route["name"]], route.get("requests", 0))
        misdirected.add_metric([route["name"]], route.get("misdirected", 0))
    yield requests
    yield misdirected


class HomeCollector:
    """The home daemon's metrics, read from `Daemon.status()` at each scrape."""

    def __init__(self, status: StatusSource) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        st = self._status()
        now = time.time()
        yield _build_info("home")
        yield _states(
            "tunneld_session_state",
            "1 for the session's current state (connecting, connected, blocked, stopping).",
            HOME_STATES,
            st.get("state"),
        )
        since = _timestamp(st.get("connected_since"))
        if since is not None:
            yield _gauge(
                "tunneld_session_connected_since_timestamp_seconds",
                "When the current session connected (Unix time).",
                since,
            )
        yield _counter(
            "tunneld_session_reconnects",
            "Reconnect attempts after a failed or lost session.",
            st.get("reconnects", 0),
        )
        if st.get("rtt_ms") is not None:
            yield _gauge(
                "tunneld_session_ping_rtt_seconds",
                "Round trip of the last PING to the relay.",
                float(st["rtt_ms"]) / 1000,
            )
        streams = st.get("streams") or {}
        yield _gauge(
            "tunneld_streams_active", "Client streams being served.", streams.get("active", 0)
        )
        yield _counter(
            "tunneld_streams", "Client streams opened by the relay.", streams.get("total", 0)
        )
        yield _gauge(
            "tunneld_websockets_active",
            "Upgraded connections (WebSockets) being spliced to the upstream.",
            streams.get("websockets", 0),
        )
        errors = CounterMetricFamily("tunneld_errors", "Failures by kind.", labels=["kind"])
        # Kinds partition the failures: a banned stream is counted as banned only.
        banned = streams.get("banned", 0)
        errors.add_metric(["stream_refused"], streams.get("refused", 0) - banned)
        errors.add_metric(["stream_banned"], banned)
        errors.add_metric(["tls_failed"], streams.get("tls_failed", 0))
        errors.add_metric(["upstream_failed"], streams.get("upstream_failed", 0))
        yield errors
        yield from _home_paths_and_routes(st)
        traffic = CounterMetricFamily(
            "tunneld_tunnel_bytes",
            "Bytes on the relay session (in: from the relay, out: to the relay).",
            labels=["direction"],
        )
        tunnel_bytes = st.get("bytes") or {}
        traffic.add_metric(["in"], tunnel_bytes.get("in", 0))
        traffic.add_metric(["out"], tunnel_bytes.get("out", 0))
        yield traffic
        yield _gauge(
            "tunneld_bans_active", "Client addresses banned now.", len(st.get("bans") or ())
        )
        yield from _certificate("tunneld_certificate", st.get("certificate"), now)
        upstream = st.get("upstream_check")
        if isinstance(upstream, Mapping) and upstream.get("reachable") is not None:
            yield _gauge(
                "tunneld_upstream_up",
                "1 when the last TCP connect probe to the upstream succeeded.",
                1 if upstream["reachable"] else 0,
            )
        token = st.get("token")
        expires = _timestamp(token.get("expires_at")) if isinstance(token, Mapping) else None
        if expires is not None:
            yield _gauge(
                "tunneld_token_expiry_seconds",
                "Seconds until the relay token expires (negative once expired).",
                expires - now,
            )
        ct = st.get("ct")
        if isinstance(ct, Mapping) and ct.get("enabled"):
            yield _gauge(
                "tunneld_ct_unknown_certificates",
                "Certificates in CT logs for our hostnames that this daemon did not obtain.",
                len(ct.get("unknown") or ()),
            )
            last = _timestamp(ct.get("last_check"))
            if last is not None:
                yield _gauge(
                    "tunneld_ct_last_check_timestamp_seconds",
                    "When the last certificate-transparency check succeeded (Unix time).",
                    last,
                )
        yield _gauge(
            "tunneld_warnings", "Warnings `tunneld status` shows.", len(st.get("warnings") or ())
        )


class RelayCollector:
    """The relay's metrics, read from `Relay.status()` at each scrape."""

    def __init__(self, status: StatusSource) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        st = self._status()
        now = time.time()
        sessions = list(st.get("sessions") or ())
        yield _build_info("relay")
        yield _states(
            "tunneld_relay_state", "1 for the relay's current state.", RELAY_STATES, st.get("state")
        )
        yield _gauge("tunneld_relay_sessions", "Home sessions connected.", len(sessions))
        yield _gauge(
            "tunneld_relay_hostnames",
            "Hostnames routed to a home session.",
            len({h for s in sessions if not s.get("going_away") for h in s.get("hostnames", ())}),
        )
        yield _gauge(
            "tunneld_relay_streams_active",
            "Client streams open on home sessions.",
            sum(s.get("streams", {}).get("active", 0) for s in sessions),
        )
        yield _gauge(
            "tunneld_relay_bans",
            "Banned client addresses pushed by the homes.",
            sum(s.get("bans", 0) for s in sessions),
        )
        connections = st.get("connections") or {}
        yield _counter(
            "tunneld_relay_connections",
            "Client TCP connections accepted.",
            connections.get("total", 0),
        )
        yield _counter(
            "tunneld_relay_routed",
            "Client connections routed to a home session.",
            connections.get("routed", 0),
        )
        refused = CounterMetricFamily(
            "tunneld_relay_refused",
            "Connections and sessions refused, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted((connections.get("refused") or {}).items()):
            refused.add_metric([reason], count)
        yield refused
        yield from _certificate("tunneld_relay_certificate", st.get("certificate"), now)


def make_registry(collector: Collector) -> CollectorRegistry:
    """A registry of its own for one process object (auto_describe off: collect is live)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def metrics_endpoint(registry: CollectorRegistry) -> Handler:
    """`GET /metrics` for the control socket's router."""

    async def handler(_: ControlRequest) -> ControlResponse:
        return ControlResponse(200, render(registry), CONTENT_TYPE)

    return handler


# ---------------------------------------------------------------- the TCP listener


async def serve_metrics(
    listen: Listen,
    registry: CollectorRegistry,
    *,
    label: str = "metrics_listen",
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `GET /metrics` on `listen` until cancelled; started() gets the bound addresses.

    A bind failure raises ConfigError naming `label` (e.g. "FILE: [daemon] metrics_listen").
    """
    host, port = listen
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ConfigError(
            f"{label}: cannot listen on {format_listen(listen)}: {exc.strerror or exc}"
        ) from None
    bound = [_address(lst) for lst in listeners]
    log.info("metrics on http://%s/metrics", bound[0])

    async def handler(stream: trio.SocketStream) -> None:
        await _serve_one(stream, registry)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(bound)


def _address(listener: trio.SocketListener) -> str:
    addr = listener.socket.getsockname()
    return format_listen((str(addr[0]), int(addr[1])))


async def _serve_one(stream: trio.SocketStream, registry: CollectorRegistry) -> None:
    """One request per connection, then close: scrapers need no keep-alive."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            async with stream:
                request = await _read_request(stream, conn)
                if request is None:
                    return
                status, body, ctype = _answer(request, registry)
                headers = [
                    ("Content-Type", ctype),
                    ("Content-Length", str(len(body))),
                    ("Connection", "close"),
                ]
                head = request.method == b"HEAD"
                await send_response(stream, conn, status, headers, body, head=head)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.ProtocolError):
        pass
    except Exception as exc:  # one scrape must never take the process down
        log.exception("metrics request failed: %r", exc)


async def _read_request(stream: trio.SocketStream, conn: h11.Connection) -> h11.Request | None:
    event = await next_event(stream, conn, MAX_REQUEST_HEAD)
    return event if isinstance(event, h11.Request) else None


def _answer(request: h11.Request, registry: CollectorRegistry) -> tuple[int, bytes, str]:
    path = request.target.split(b"?", 1)[0]
    if request.method not in (b"GET", b"HEAD"):
        return 405, b"method not allowed\n", "text/plain"
    if path != b"/metrics":
        return 404, b"not found; metrics are at /metrics\n", "text/plain"
    return 200, render(registry), CONTENT_TYPE
