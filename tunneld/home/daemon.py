"""`tunneld run`: one root nursery owns the session, the streams and the control socket."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from functools import partial
from typing import Any

import trio

from tunneld import __version__
from tunneld.config import HomeConfig
from tunneld.control import (
    SOCKET_MODE,
    ControlRequest,
    ControlResponse,
    Router,
    serve_control,
)
from tunneld.home.access import AccessControl
from tunneld.home.certs.acme import AcmeManager
from tunneld.home.certs.store import CertificateStore
from tunneld.home.connector import Connector, ConnectorState
from tunneld.home.ct import CtWatch
from tunneld.home.health import HealthChecks, token_facts
from tunneld.home.lan import LanListener
from tunneld.home.reload import reload_daemon
from tunneld.home.streams import StreamHandler
from tunneld.home.watchdog.banctl import add_ban_routes
from tunneld.home.watchdog.bans import BANS_FILE, BanFile, BanList
from tunneld.home.watchdog.core import Watchdog
from tunneld.metrics import HomeCollector, make_registry, metrics_endpoint, serve_metrics
from tunneld.reload import Settings, TaskSlot
from tunneld.signals import run_until_signalled
from tunneld.systemd import notify, run_watchdog

log = logging.getLogger("tunneld.daemon")


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class Daemon:
    def __init__(self, config: HomeConfig) -> None:
        self.settings = Settings(config)  # the running config; SIGHUP replaces it
        self.certs = CertificateStore(config)
        self.certs.load()
        self.bans = BanList(BanFile(config.daemon.state_directory / BANS_FILE))
        self.watchdog = Watchdog(config.watchdog, self.bans)
        self.streams = StreamHandler(config, self.certs, self.watchdog)
        self.connector = Connector(config, self.streams, self.watchdog)
        self.lan = LanListener(self.streams)
        self.access = AccessControl(config)
        self.streams.access = self.access
        self.connector.access_rules = self.access.rules
        self.access.listeners.append(self.connector.push_access)
        self.ct = CtWatch(config, lambda: self.certs.cert_path)
        self._stop = trio.Event()
        self.health = HealthChecks(lambda: self.config)
        self.acme = TaskSlot(AcmeManager(config, self.certs, ready=self.is_connected).run)
        self.metrics = make_registry(HomeCollector(self.status))
        self.metrics_listening: list[str] = []

    @property
    def config(self) -> HomeConfig:
        return self.settings.current

    def stop(self) -> None:
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as root:
            router = Router()
            router.add("GET", "/v1/status", self._status_endpoint)
            router.add("GET", "/metrics", metrics_endpoint(self.metrics))
            add_ban_routes(router, self.watchdog)
            router.add("POST", "/v1/ct/acknowledge", self._ct_acknowledge)
            await root.start(
                partial(serve_control, mode=SOCKET_MODE), self.config.daemon.control_socket, router
            )
            # Bans load once the socket listens (offline `tunneld bans` relies on
            # that order) and before the first session, which gets the full list.
            await root.start(self.bans.run)
            listen = self.config.daemon.metrics_listen
            if listen is not None:
                label = f"{self.config.path}: [daemon] metrics_listen"
                self.metrics_listening = await root.start(
                    partial(serve_metrics, label=label), listen, self.metrics
                )
            if self.config.lan.listen:
                # Before the session: the LAN path never waits for the relay.
                label = f"{self.config.path}: [lan] listen"
                await root.start(partial(self.lan.run, label=label), self.config.lan.listen)
            await root.start(self.access.run)
            await root.start(self.ct.run)
            await root.start(self.connector.run)
            # Orders wait for the session: the CA reaches us only through the relay.
            await root.start(self.acme.run)
            await root.start(self.health.run)
            root.start_soon(self._notify_status)
            root.start_soon(run_watchdog)
            notify("READY=1", "STATUS=connecting to the relay")
            log.info(
                "tunneld %s serving %s via %s",
                __version__,
                ", ".join(self.config.tls.hostnames),
                self.config.relay.url,
            )
            task_status.started()
            await self._stop.wait()
            notify("STOPPING=1")
            # The relay hears GOAWAY and a clean close; open streams are cut.
            with trio.move_on_after(3):
                await self.connector.shutdown()
            root.cancel_scope.cancel()
        log.info("stopped")

    async def _notify_status(self) -> None:
        last = ""
        while True:
            st = self.connector.state
            line = f"{st.state}" + (f": {st.last_error}" if st.last_error else "")
            if line != last:
                notify(f"STATUS={line}")
                last = line
            await trio.sleep(1)

    def is_connected(self) -> bool:
        return self.connector.state.state == "connected"

    async def _ct_acknowledge(self, req: ControlRequest) -> ControlResponse:
        try:
            body = json.loads(req.body or b"{}")
            if not isinstance(body, dict) or not isinstance(body.get("sha256"), str):
                raise ValueError('expected a JSON object with a "sha256" string')
            cert = self.ct.acknowledge(body["sha256"])
        except ValueError as exc:
            return ControlResponse.error(400, str(exc))
        except OSError as exc:
            return ControlResponse.error(500, f"cannot save {self.ct.path}: {exc}")
        if cert is None:
            return ControlResponse.error(404, "not among the unknown certificates (tunneld status)")
        return ControlResponse.json({"acknowledged": dataclasses.asdict(cert)})

    async def _status_endpoint(self, _: ControlRequest) -> ControlResponse:
        return ControlResponse.json(self.status())

    def status(self) -> dict[str, Any]:
        st = self.connector.state
        streams = self.streams.statistics()
        bytes_in, bytes_out = st.totals()
        return {
            "role": "home",
            "state": st.state,
            "relay": self.config.relay.url,
            "session_id": st.session_id,
            "hostnames": list(self.config.tls.hostnames),
            "connected_since": iso(st.connected_since),
            "next_retry": iso(st.next_retry),
            "last_error": st.last_error,
            "replaced": st.replaced,
            "rtt_ms": round(st.rtt * 1000, 2) if st.rtt is not None else None,
            # The live session's receive-window tuning (tunneld/wire/flow.py).
            "flow": st.sessions[-1].statistics().flow_json() if st.sessions else None,
            # Its data connections (PROTOCOL.md 11); null when the relay or config has none.
            "data_connections": _dialer_json(st),
            "reconnects": st.reconnects,
            "tasks": trio.lowlevel.current_statistics().tasks_living,
            "streams": {
                "active": streams.active,
                "total": streams.total,
                "refused": streams.refused,
                "banned": streams.banned,
                "tls_failed": streams.tls_failed,
                "upstream_failed": streams.upstream_failed,
                "websockets": self.streams.routes.websockets,
                "certificate_refused": self.streams.certificate_refused,
            },
            # How clients reach us: through the relay, and straight on the home network.
            "paths": {
                "relay": {"url": self.config.relay.url, "state": st.state},
                "lan": (
                    {"state": "listening", **self.lan.status()}
                    if self.lan.listening
                    else {"state": "off", "listen": [], "active": 0, "total": 0}
                ),
            },
            "routes": self.streams.routes.status(),
            "bytes": {"in": bytes_in, "out": bytes_out},
            "upstream": self.config.upstream.url,
            "upstream_check": self.health.status(),
            "token": token_facts(self.config.relay.token, time.time()),
            "certificate": self.certs.status(),
            "metrics_listen": self.metrics_listening,
            "config": self.settings.status(),
            "warnings": [
                *self.certs.warnings(),
                *self.health.warnings(),
                *self.settings.warnings(),
                *self.access.warnings(st.relay_access),
                *self.ct.warnings(),
            ],
            "bans": [{"ip": b.ip, "until": iso(b.until)} for b in self.watchdog.ban_list()],
            "access": self.access.status(st.relay_access),
            "ct": self.ct.status(),
            "version": __version__,
        }


async def run_daemon(config: HomeConfig) -> int:
    daemon = Daemon(config)
    return await run_until_signalled(
        daemon.run,
        reload=lambda: reload_daemon(daemon),
        stop=daemon.stop,
        config_path=lambda: daemon.config.path,
        log=log,
    )


def _dialer_json(st: ConnectorState) -> dict[str, int] | None:
    dialer = st.dialers.get(st.sessions[-1]) if st.sessions else None
    return None if dialer is None else dataclasses.asdict(dialer.statistics())
