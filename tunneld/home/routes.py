"""Routes: which proxy, watchdog and TLS context serve a hostname.

`[upstream]` is the default route: every `[tls]` hostname that no `[[route]]` names.
Each `[[route]]` gets its own proxy (upstream pool, timeouts, upstream TLS) and its
own watchdog view (preset, trusted proxies). Routes that share bans (the default)
share one ban list and one count of failures: one client, one ban, wherever it
failed, pushed to the relay. A route with `share_bans = false` keeps its own
counts and its own ban list, in memory, that refuse the client on that route only.
A route with `client_certificate` set has its own TLS context (`RouteContexts`).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from typing import Any

from tunneld.config import DEFAULT_CLIENT_NAME_HEADER, HomeConfig, RouteSection
from tunneld.home.certs.clients import RouteContexts
from tunneld.home.certs.store import CertificateStore
from tunneld.home.proxy import Proxy
from tunneld.home.watchdog import Watchdog
from tunneld.home.watchdog.bans import BanList

__all__ = ["Route", "RouteTable"]

log = logging.getLogger("tunneld.routes")


@dataclass
class Route:
    name: str  # the route's hostname, or "default" for [upstream]
    hostnames: frozenset[str]
    proxy: Proxy
    watchdog: Watchdog
    section: RouteSection | None = None
    clients: RouteContexts | None = None

    def context(self, certs: CertificateStore) -> ssl.SSLContext:
        if self.clients is None:
            assert certs.context is not None
            return certs.context
        return self.clients.context(certs)

    def status(self) -> dict[str, Any]:
        section = self.section
        return {
            "hostnames": sorted(self.hostnames),
            "upstream": self.proxy.config.url,
            "preset": self.watchdog.config.preset,
            "share_bans": True if section is None else section.share_bans,
            "client_certificate": (section.client_certificate if section else "") or None,
            "requests": self.proxy.requests,
            "upstream_failed": self.proxy.upstream_failed,
            "misdirected": self.proxy.misdirected,
            "websockets": self.proxy.websockets,
        }


def _contexts(config: HomeConfig) -> dict[str, RouteContexts]:
    """Client-certificate contexts per route hostname; raises ConfigError (the CA)."""
    out: dict[str, RouteContexts] = {}
    for section in config.route:
        if section.client_certificate:
            contexts = RouteContexts(section, config.daemon.state_directory)
            contexts.prepare()
            out[section.hostname] = contexts
    return out


class RouteTable:
    def __init__(
        self, config: HomeConfig, watchdog: Watchdog, default_proxy: Proxy | None = None
    ) -> None:
        self.watchdog = watchdog  # the shared one: admission, manual bans, the relay's list
        self.default = Route(
            "default",
            frozenset(),
            default_proxy if default_proxy is not None else Proxy(config.upstream, watchdog),
            watchdog,
        )
        self.routes: dict[str, Route] = {}
        self._apply(config, _contexts(config))

    @staticmethod
    def prepare(config: HomeConfig) -> dict[str, RouteContexts]:
        """What can fail before a reload commits (the client CA)."""
        return _contexts(config)

    def _apply(self, config: HomeConfig, contexts: dict[str, RouteContexts]) -> list[Proxy]:
        """Build the routes of `config`; returns the proxies that are no longer used."""
        old = self.routes
        routes: dict[str, Route] = {}
        # Every route's name header, and the default one, never passes from a client.
        strip = frozenset(
            {DEFAULT_CLIENT_NAME_HEADER.lower().encode("ascii")}
            | {r.client_name_header.lower().encode("ascii") for r in config.route}
        )
        self.default.proxy.strip = strip
        for section in config.route:
            wd_config = section.watchdog_section(config.watchdog)
            if section.share_bans:
                wd = Watchdog(wd_config, self.watchdog.bans, counts_from=self.watchdog)
            else:
                previous = old.get(section.hostname)
                kept = previous is not None and previous.section is not None
                kept = kept and not previous.section.share_bans  # type: ignore[union-attr]
                bans = previous.watchdog.bans if kept else BanList()  # type: ignore[union-attr]
                wd = Watchdog(wd_config, bans)
            up = section.upstream_section(config.upstream)
            proxy = Proxy(up, wd)
            proxy.hostnames = frozenset({section.hostname})
            proxy.name_header = section.client_name_header.encode("ascii")
            proxy.strip = strip
            routes[section.hostname] = Route(
                section.hostname,
                proxy.hostnames,
                proxy,
                wd,
                section,
                contexts.get(section.hostname),
            )
        names = frozenset(config.tls.hostnames) - frozenset(routes)
        self.default.hostnames = names
        self.default.proxy.hostnames = names
        self.routes = routes
        return [r.proxy for r in old.values()]

    async def reconfigure(self, config: HomeConfig, contexts: dict[str, RouteContexts]) -> None:
        """New routes for new connections; connections under way finish on their proxy."""
        if self.default.proxy.config != config.upstream:
            await self.default.proxy.reconfigure(config.upstream)
        self.watchdog.reconfigure(config.watchdog)
        for proxy in self._apply(config, contexts):
            proxy.pool.size = 0
            await proxy.pool.aclose()

    def for_sni(self, sni: str | None) -> Route:
        if sni:
            route = self.routes.get(sni)
            if route is not None:
                return route
        return self.default

    def all(self) -> list[Route]:
        return [self.default, *self.routes.values()]

    def status(self) -> list[dict[str, Any]]:
        return [r.status() | {"name": r.name} for r in self.all()]

    @property
    def upstream_failed(self) -> int:
        return sum(r.proxy.upstream_failed for r in self.all())

    @property
    def websockets(self) -> int:
        return sum(r.proxy.websockets for r in self.all())
