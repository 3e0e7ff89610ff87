"""Which home session serves which hostname, and the bans each session pushed."""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from tunneld.access import AccessPolicy
from tunneld.netaddr import normalize_ip
from tunneld.relay.datapool import DataPool
from tunneld.transport.session import MuxSession
from tunneld.wire import events as ev

log = logging.getLogger("tunneld.relay")


@dataclass(eq=False)
class HomeSession:
    """A connected home daemon as the relay sees it."""

    mux: MuxSession
    session_id: str
    subject: str
    token_id: str
    version: str
    hostnames: tuple[str, ...]
    peer: str
    bans: dict[str, float | None] = field(default_factory=dict)  # ip -> until (None = forever)
    access: AccessPolicy = field(default_factory=AccessPolicy)  # the home's [access] rules
    replaced: bool = False
    data: DataPool | None = None  # its data connections, when both ends agreed on them

    def is_banned(self, ip: str, now: float | None = None) -> bool:
        """Is client `ip` (normalized) banned: its address, or for IPv6 its /64 (PROTOCOL.md)?"""
        if not self.bans:
            return False
        if self._banned(ip, now):
            return True
        return ":" in ip and self._banned(_net64(ip), now)

    def _banned(self, key: str, now: float | None) -> bool:
        if key not in self.bans:
            return False
        until = self.bans[key]
        if until is None:
            return True
        if until > (now if now is not None else time.time()):
            return True
        del self.bans[key]  # expired on our own clock
        return False

    def apply_bans(self, event: ev.Ban) -> None:
        if event.access is not None:
            self.access = AccessPolicy(event.access)
            log.info(
                "session %s: access rules for %s",
                self.session_id,
                ", ".join(r.hostname for r in event.access) or "no hostname",
            )
        now = time.time()
        if event.replace:
            self.bans.clear()
        for entry in event.entries:
            ip = normalize_ip(entry.ip)
            if entry.until is not None and entry.until <= now:
                self.bans.pop(ip, None)
            else:
                self.bans[ip] = entry.until
        if not event.replace:
            # Entries that expired unseen would otherwise stay until the next full list.
            for ip in [k for k, until in self.bans.items() if until is not None and until <= now]:
                del self.bans[ip]
        log.info("session %s: ban list now holds %d address(es)", self.session_id, len(self.bans))


def banned(bans: Mapping[str, float | None], ip: str, now: float) -> bool:
    """The rule of HomeSession.is_banned for a copy of a ban list (a fleet's): `ip`'s
    entry, or for IPv6 its /64's, with no expiry or one still ahead."""
    for key in (ip, _net64(ip)) if ":" in ip else (ip,):
        if key in bans:
            until = bans[key]
            if until is None or until > now:
                return True
    return False


def _net64(ip: str) -> str:
    # A ban on an IPv6 address with a zero interface id covers its /64.
    return str(ipaddress.IPv6Network(f"{ip}/64", strict=False).network_address)


class Registry:
    def __init__(self) -> None:
        self._by_host: dict[str, HomeSession] = {}
        self.sessions: list[HomeSession] = []
        self._homes: Counter[str] = Counter()  # addresses sessions came from

    def is_home(self, ip: str) -> bool:
        """A connected home's address (its data connections come from there)."""
        return ip in self._homes

    def lookup(self, hostname: str) -> HomeSession | None:
        return self._by_host.get(hostname)

    def register(self, session: HomeSession) -> None:
        """The newest session takes its hostnames at once; older ones drain."""
        displaced: list[HomeSession] = []
        for host in session.hostnames:
            old = self._by_host.get(host)
            if old is not None and old is not session and old not in displaced:
                displaced.append(old)
            self._by_host[host] = session
        self.sessions.append(session)
        self._homes[session.peer] += 1
        for old in displaced:
            log.warning(
                "session %s (%s) replaced by another session %s for %s",
                old.session_id,
                old.subject,
                session.session_id,
                ", ".join(session.hostnames),
            )
            self.displace(old)

    def displace(self, old: HomeSession, hostname: str | None = None) -> None:
        """A newer session holds `hostname` (here or, in a fleet, on another relay):
        new clients no longer reach `old` for it, and `old` gets GOAWAY and drains."""
        if hostname is not None and self._by_host.get(hostname) is old:
            del self._by_host[hostname]
        if old.replaced:
            return
        old.replaced = True
        old.mux.goaway(ev.ResetCode.REPLACED, "replaced by another session")

    def unregister(self, session: HomeSession) -> None:
        for host in session.hostnames:
            if self._by_host.get(host) is session:
                del self._by_host[host]
        if session in self.sessions:
            self.sessions.remove(session)
            self._homes[session.peer] -= 1
            if self._homes[session.peer] <= 0:
                del self._homes[session.peer]

    def stream_count(self) -> int:
        return sum(s.mux.streams_active for s in self.sessions)
