"""Which home session serves which hostname, and the bans each session pushed."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

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
    replaced: bool = False

    def is_banned(self, ip: str, now: float | None = None) -> bool:
        if ip not in self.bans:
            return False
        until = self.bans[ip]
        if until is None:
            return True
        if until > (now if now is not None else time.time()):
            return True
        del self.bans[ip]
        return False

    def apply_bans(self, event: ev.Ban) -> None:
        now = time.time()
        if event.replace:
            self.bans.clear()
        for entry in event.entries:
            if entry.until is not None and entry.until <= now:
                self.bans.pop(entry.ip, None)
            else:
                self.bans[entry.ip] = entry.until
        log.info("session %s: ban list now holds %d address(es)", self.session_id, len(self.bans))


class Registry:
    def __init__(self) -> None:
        self._by_host: dict[str, HomeSession] = {}
        self.sessions: list[HomeSession] = []

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
        for old in displaced:
            old.replaced = True
            log.warning(
                "session %s (%s) replaced by another session %s for %s",
                old.session_id,
                old.subject,
                session.session_id,
                ", ".join(session.hostnames),
            )
            try:
                old.mux.send(ev.GoAway(ev.ResetCode.REPLACED, "replaced by another session"))
            except Exception:  # noqa: BLE001 - the old session may be closing already
                pass

    def unregister(self, session: HomeSession) -> None:
        for host in session.hostnames:
            if self._by_host.get(host) is session:
                del self._by_host[host]
        if session in self.sessions:
            self.sessions.remove(session)

    def stream_count(self) -> int:
        return sum(s.mux.streams_active for s in self.sessions)
