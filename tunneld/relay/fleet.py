"""`[fleet]`: this relay's part in a fleet of relays sharing a registry on Redis.

README "Fleet" is the design; this module is its registry part:

* every hostname a local session holds is claimed in Redis as
  ``tunneld:host:<hostname> = "<node_id> <session_id> <claimed_at_ms>"`` under a
  lease of `lease_ttl`, renewed every `lease_ttl / 3` by a compare-and-set
  script (only while the value is still ours), so a dead relay's claims end
  within `lease_ttl`;
* the newest session wins fleet-wide: a new session overwrites the lease and
  publishes a ``claim`` on ``tunneld:events``; the relay holding an older
  session for the name sends it GOAWAY (REPLACED), as a single relay does. A
  relay that missed the message finds the value changed at its next renewal;
* token revocations: ``tunneld:revoked`` (a set) holds every relay's
  `[relay] revoked_tokens`, published as ``revoke``; every relay closes the
  sessions of a revoked token and refuses it from then on;
* Redis unreachable: nothing local changes (sessions are kept, new ones are
  served); when Redis answers again the relay claims its hostnames again
  where the lease is gone or older than its own, re-reads the revocations and
  subscribes again ("registry repaired" in the log).

Redis is reached with redis-py (`redis`, maintained by Redis Inc.), its
synchronous client called from worker threads: its asyncio client does not run
under Trio. No Redis call is on a client connection's path; the calls are the
lease renewals, one claim per session and the subscriber's reads, each bounded
by a socket timeout, so a thread hop per call costs nothing that matters.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from tunneld.config import FleetSection, parse_listen, redact_url
from tunneld.errors import ConfigError
from tunneld.relay.registry import HomeSession, Registry, banned
from tunneld.wire.fleetforward import NonceCache

if TYPE_CHECKING:
    import redis

__all__ = ["Claim", "Fleet", "FleetStore"]

log = logging.getLogger("tunneld.relay.fleet")

PREFIX = "tunneld:"
CHANNEL = PREFIX + "events"
REVOKED = PREFIX + "revoked"
SOCKET_TIMEOUT = 3.0  # every Redis call ends within this (a dead Redis is a timeout)
SUBSCRIBER_POLL = 0.5  # how long one subscriber read waits for a message
ABSENT_FOR = 1.0  # a hostname held nowhere is looked up again after this

# Renew the lease only while it is still ours: 1 renewed, 0 gone, -1 someone else's.
_RENEW = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not v then return 0 end
return -1
"""
# After an outage: take the lease if it is gone or holds an older claim.
_RECLAIM = """
local v = redis.call('GET', KEYS[1])
if v and v ~= ARGV[1] then
  local at = tonumber(string.match(v, ' (%d+)$'))
  if at == nil or at >= tonumber(ARGV[3]) then return -1 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# Let go only of our own claim.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def host_key(hostname: str) -> str:
    return f"{PREFIX}host:{hostname}"


def bans_key(hostname: str) -> str:
    return f"{PREFIX}bans:{hostname}"


def node_key(node_id: str) -> str:
    return f"{PREFIX}node:{node_id}"


@dataclass(frozen=True)
class Claim:
    """Who holds a hostname: the value of its lease."""

    node: str
    session: str
    claimed_at: int  # ms since the epoch, on the claiming relay's clock

    def value(self) -> str:
        return f"{self.node} {self.session} {self.claimed_at}"

    @classmethod
    def parse(cls, text: str) -> Claim | None:
        parts = text.split(" ")
        if len(parts) != 3 or not parts[2].isdigit():
            return None
        return cls(parts[0], parts[1], int(parts[2]))


class FleetStore:
    """The Redis calls, synchronous (each runs in a worker thread, see `Fleet.call`)."""

    def __init__(self, url: str) -> None:
        import redis  # only a relay with [fleet] pays for the import
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No retries inside the client: one call costs at most SOCKET_TIMEOUT, and the
        # fleet's own loop (every lease_ttl / 3) is the retry.
        self.redis: redis.Redis = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        self._renew = self.redis.register_script(_RENEW)
        self._reclaim = self.redis.register_script(_RECLAIM)
        self._release = self.redis.register_script(_RELEASE)

    def ping(self) -> bool:
        return bool(self.redis.ping())

    def claim(self, hostname: str, claim: Claim, ttl_ms: int) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(host_key(hostname), claim.value(), px=ttl_ms)
        pipe.publish(CHANNEL, _message("claim", hostname=hostname, claim=claim.value()))
        pipe.execute()

    def renew(self, hostname: str, claim: Claim, ttl_ms: int) -> int:
        return int(self._renew(keys=[host_key(hostname)], args=[claim.value(), ttl_ms]))

    def reclaim(self, hostname: str, claim: Claim, ttl_ms: int) -> int:
        args: list[str | int] = [claim.value(), ttl_ms, claim.claimed_at]
        won = int(self._reclaim(keys=[host_key(hostname)], args=args))
        if won == 1:
            self.redis.publish(CHANNEL, _message("claim", hostname=hostname, claim=claim.value()))
        return won

    def release(self, hostname: str, claim: Claim) -> None:
        if int(self._release(keys=[host_key(hostname)], args=[claim.value()])):
            self.redis.publish(CHANNEL, _message("release", hostname=hostname))

    def locate(self, hostname: str) -> tuple[str, str, dict[str, float | None]] | None:
        """(node, its advertised forward address, the home's bans) for `hostname`."""
        claim = self.lookup(hostname)
        if claim is None:
            return None
        info, bans = self.redis.mget([node_key(claim.node), bans_key(hostname)])
        try:
            advertise = json.loads(info)["advertise"] if isinstance(info, str) else ""
            entries = json.loads(bans) if isinstance(bans, str) else {}
        except (ValueError, KeyError, TypeError):
            advertise, entries = "", {}
        if not advertise or not isinstance(entries, dict):
            return None
        return claim.node, advertise, {str(ip): until for ip, until in entries.items()}

    def put_bans(self, hostname: str, bans: dict[str, float | None]) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(bans_key(hostname), json.dumps(bans))
        pipe.publish(CHANNEL, _message("bans", hostname=hostname))
        pipe.execute()

    def lookup(self, hostname: str) -> Claim | None:
        value = self.redis.get(host_key(hostname))
        return Claim.parse(value) if isinstance(value, str) else None

    def announce(self, node_id: str, info: dict[str, Any], ttl_ms: int) -> None:
        self.redis.set(node_key(node_id), json.dumps(info), px=ttl_ms)

    def revoke(self, token_ids: list[str]) -> None:
        if token_ids:
            pipe = self.redis.pipeline(transaction=True)
            pipe.sadd(REVOKED, *token_ids)
            pipe.publish(CHANNEL, _message("revoke", tokens=token_ids))
            pipe.execute()

    def revoked(self) -> set[str]:
        return {str(t) for t in self.redis.smembers(REVOKED)}

    def subscribe(self) -> Any:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        pubsub.subscribe(CHANNEL)
        return pubsub

    def close(self) -> None:
        self.redis.close()


def _message(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields})


class Fleet:
    """Keeps this relay's claims in Redis and applies the fleet's to local sessions."""

    def __init__(
        self,
        section: FleetSection,
        registry: Registry,
        revoked_tokens: Callable[[], tuple[str, ...]],
        store: FleetStore | None = None,
        label: str = "",
    ) -> None:
        self.section = section
        self.node_id = section.node_id or socket.gethostname()
        self.ttl_ms = int(section.lease_ttl * 1000)
        self.registry = registry
        self._local_revoked = revoked_tokens  # [relay] revoked_tokens, as reloaded
        self.store = store if store is not None else FleetStore(section.redis_url)
        self.claims: dict[str, tuple[Claim, HomeSession]] = {}  # our leases
        # Hostnames whose claim above is in Redis. Until then a renewal or another
        # relay's claim message proves nothing: our write, still to come, wins.
        self._written: set[str] = set()
        self.revoked: set[str] = set()  # the fleet's, as last read
        self.connected = False
        self.last_error: str | None = None
        self.repairs = 0  # times the registry was re-registered after an outage
        self._limiter = trio.CapacityLimiter(4)
        self._writes: tuple[trio.MemorySendChannel[Any], trio.MemoryReceiveChannel[Any]] = (
            trio.open_memory_channel[Any](1024)
        )
        self._reconnected = trio.Event()
        # Forwarding (relay/forwarding.py): the shared secret, replays seen, the cache of
        # who holds which hostname (hostname -> (node, address), until when).
        self.secret = _load_secret(section, label) if section.forwarding else None
        self.nonces = NonceCache()
        self.forwarded = 0
        self._located: dict[str, tuple[str, tuple[str, int], float]] = {}
        self._bans: dict[str, dict[str, float | None]] = {}  # hostname -> its home's bans
        self._absent: dict[str, float] = {}  # hostname -> until when "held nowhere" holds

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """One Redis call in a worker thread; cancelling abandons the thread, which
        ends by itself within SOCKET_TIMEOUT."""
        return await trio.to_thread.run_sync(
            partial(fn, *args), abandon_on_cancel=True, limiter=self._limiter
        )

    # -- hooks the relay calls (synchronous, never blocking) ------------------------
    def session_started(self, session: HomeSession) -> None:
        """A session passed its handshake and holds its hostnames here: claim them."""
        claim = Claim(self.node_id, session.session_id, int(time.time() * 1000))
        for hostname in session.hostnames:
            self.claims[hostname] = (claim, session)
            self._written.discard(hostname)
            self._queue(("claim", hostname, claim))

    def session_ended(self, session: HomeSession) -> None:
        for hostname in session.hostnames:
            held = self.claims.get(hostname)
            if held is not None and held[1] is session:
                del self.claims[hostname]
                self._written.discard(hostname)
                self._queue(("release", hostname, held[0]))

    def bans_changed(self, session: HomeSession) -> None:
        """A BAN frame changed `session`'s list: every relay gets the new copy."""
        snapshot = dict(session.bans)
        for hostname in session.hostnames:
            if self.claims.get(hostname, (None, None))[1] is session:
                self._queue(("bans", hostname, snapshot))

    def is_banned(self, hostname: str, ip: str) -> bool:
        """Checked before forwarding: the copy of the ban list of `hostname`'s home."""
        return banned(self._bans.get(hostname, {}), ip, time.time())

    def revoke(self, token_ids: tuple[str, ...]) -> None:
        """`[relay] revoked_tokens` (at start and reload) go to the fleet's set."""
        if token_ids:
            self._queue(("revoke", list(token_ids)))

    def is_revoked(self, token_id: str) -> bool:
        return token_id in self.revoked

    async def locate(self, hostname: str) -> tuple[str, tuple[str, int]] | None:
        """The other relay holding `hostname` and its forward address, or None. Cached
        until a claim or release for the name, or lease_ttl; a Redis round trip (two
        reads) only on a miss."""
        now = time.monotonic()
        cached = self._located.get(hostname)
        if cached is not None and cached[2] > now:
            return cached[0], cached[1]
        if self._absent.get(hostname, 0.0) > now:
            return None  # asked a moment ago (scanners try many names)
        try:
            with trio.fail_after(SOCKET_TIMEOUT):
                found = await self.call(self.store.locate, hostname)
        except Exception as exc:  # noqa: BLE001 - Redis away: nowhere to forward to
            self._lost(exc)
            return cached[:2] if cached is not None else None  # stale beats nothing
        if found is None or found[0] == self.node_id:
            self._located.pop(hostname, None)
            if len(self._absent) > 10_000:
                self._absent.clear()
            self._absent[hostname] = now + ABSENT_FOR
            return None
        node, advertise, bans = found
        self._bans[hostname] = bans
        try:
            address = parse_listen(advertise)
        except ValueError:
            log.warning("fleet node %s advertises %r: not host:port", node, advertise)
            return None
        if len(self._located) > 10_000:
            self._located.clear()
            self._bans.clear()
        self._located[hostname] = (node, address, now + self.section.lease_ttl)
        return node, address

    def forget(self, hostname: str) -> None:
        self._located.pop(hostname, None)
        self._bans.pop(hostname, None)
        self._absent.pop(hostname, None)

    def _queue(self, op: tuple[Any, ...]) -> None:
        try:
            self._writes[0].send_nowait(op)
        except trio.WouldBlock:
            # Redis has been away long enough to fill the queue: the repair after it
            # returns re-claims everything we hold, so dropping an op loses nothing.
            self._lost(RuntimeError("too many registry writes waiting"))

    # -- tasks ---------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Runs until cancelled. Started at once: Redis being away never stops the relay."""
        log.info(
            "fleet node %s, registry %s, lease %.0fs",
            self.node_id,
            redact_url(self.section.redis_url),
            self.section.lease_ttl,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._maintain)
            nursery.start_soon(self._write)
            nursery.start_soon(self._subscribe)
            task_status.started()

    def _lost(self, exc: BaseException) -> None:
        if self.connected or self.last_error is None:
            log.warning("fleet registry unreachable: %s; serving local sessions only", exc)
        self.connected = False
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._reconnected = trio.Event()

    async def _maintain(self) -> None:
        """Every lease_ttl / 3: announce this node and renew (or repair) every claim."""
        interval = self.section.lease_ttl / 3
        first = True
        while True:
            try:
                if not self.connected:
                    await self.call(self.store.ping)
                    await self._repair(first)
                    first = False
                await self.call(
                    self.store.announce,
                    self.node_id,
                    {"advertise": self.section.advertise, "time": time.time()},
                    self.ttl_ms,
                )
                for hostname, (claim, session) in list(self.claims.items()):
                    if hostname not in self._written:
                        continue  # its claim is on its way (_write)
                    result = await self.call(self.store.renew, hostname, claim, self.ttl_ms)
                    if result == 0:  # gone (Redis restarted, or we were away too long)
                        result = await self.call(self.store.reclaim, hostname, claim, self.ttl_ms)
                    if result < 0 and self.claims.get(hostname, (None, None))[1] is session:
                        current = await self.call(self.store.lookup, hostname)
                        self._replaced(hostname, current)
            except Exception as exc:  # noqa: BLE001 - redis errors, all of them
                self._lost(exc)
            await trio.sleep(interval)

    async def _repair(self, first: bool) -> None:
        """Redis is back (or reached the first time): claim again, read in full."""
        await self.call(self.store.revoke, list(self._local_revoked()))
        self.revoked = await self.call(self.store.revoked)
        for hostname, (claim, session) in list(self.claims.items()):
            won = await self.call(self.store.reclaim, hostname, claim, self.ttl_ms)
            if won < 0:
                self._replaced(hostname, await self.call(self.store.lookup, hostname))
            elif self.claims.get(hostname, (None, None))[0] == claim:
                self._written.add(hostname)
                await self.call(self.store.put_bans, hostname, dict(session.bans))
        self.connected = True
        self.last_error = None
        self._reconnected.set()
        self._apply_revocations()
        if not first:
            self.repairs += 1
            log.warning(
                "fleet registry reachable again: registry repaired (%d hostname(s) claimed)",
                len(self.claims),
            )
        else:
            log.info("fleet registry reachable")

    async def _write(self) -> None:
        """Claims and releases in the order sessions came and went."""
        async for op in self._writes[1]:
            if not self.connected:
                continue  # the repair re-claims what we hold
            try:
                if op[0] == "claim":
                    _, hostname, claim = op
                    if self.claims.get(hostname, (None, None))[0] == claim:
                        await self.call(self.store.claim, hostname, claim, self.ttl_ms)
                        if self.claims.get(hostname, (None, None))[0] == claim:
                            self._written.add(hostname)
                elif op[0] == "release":
                    await self.call(self.store.release, op[1], op[2])
                elif op[0] == "bans":
                    await self.call(self.store.put_bans, op[1], op[2])
                elif op[0] == "revoke":
                    await self.call(self.store.revoke, op[1])
            except Exception as exc:  # noqa: BLE001 - any client error: Redis is away (logged)
                self._lost(exc)

    async def _subscribe(self) -> None:
        while True:
            await self._reconnected.wait()
            try:
                pubsub = await self.call(self.store.subscribe)
            except Exception as exc:  # noqa: BLE001 - any client error: Redis is away (logged)
                self._lost(exc)
                continue
            try:
                # Everything published before the subscription took effect was read in
                # full by the repair; from here, messages.
                self.revoked |= await self.call(self.store.revoked)
                self._apply_revocations()
                while self.connected:
                    message = await self.call(partial(pubsub.get_message, timeout=SUBSCRIBER_POLL))
                    if message is not None and message.get("type") == "message":
                        await self._on_message(message.get("data"))
            except Exception as exc:  # noqa: BLE001 - any client error: Redis is away (logged)
                self._lost(exc)
            finally:
                with trio.CancelScope(shield=True):
                    try:
                        await self.call(pubsub.close)
                    except Exception:  # noqa: BLE001 - closing a subscription Redis already lost
                        pass

    # -- applying the fleet's state ---------------------------------------------------
    async def _on_message(self, data: object) -> None:
        try:
            message = json.loads(data) if isinstance(data, str) else None
        except ValueError:
            message = None
        if not isinstance(message, dict):
            log.debug("fleet: ignored a malformed message")
            return
        kind = message.get("type")
        if kind in ("claim", "release", "bans") and isinstance(message.get("hostname"), str):
            self.forget(message["hostname"])  # read again at the next forward
        if kind == "claim":
            hostname, claim = message.get("hostname"), message.get("claim")
            if isinstance(hostname, str) and isinstance(claim, str):
                held = self.claims.get(hostname)
                if held is not None and held[0].value() != claim and hostname in self._written:
                    # Messages can cross our own write: Redis's value decides.
                    current = await self.call(self.store.lookup, hostname)
                    if current != held[0] and self.claims.get(hostname) is held:
                        self._replaced(hostname, current)
        elif kind == "revoke":
            tokens = message.get("tokens")
            if isinstance(tokens, list):
                self.revoked |= {str(t) for t in tokens}
                self._apply_revocations()

    def _replaced(self, hostname: str, by: Claim | None) -> None:
        """A newer session elsewhere (or here, on another node id) holds `hostname`."""
        held = self.claims.pop(hostname, None)
        self._written.discard(hostname)
        if held is None:
            return
        session = held[1]
        where = f"session {by.session} on {by.node}" if by else "another session"
        log.warning(
            "session %s (%s) replaced by another session (%s) for %s",
            session.session_id,
            session.subject,
            where,
            hostname,
        )
        self.registry.displace(session, hostname)

    def _apply_revocations(self) -> None:
        for session in list(self.registry.sessions):
            if session.token_id in self.revoked and session.mux.close_reason is None:
                log.warning(
                    "session %s (%s): its token %s is revoked in the fleet: closing",
                    session.session_id,
                    session.subject,
                    session.token_id,
                )
                session.mux.close("token revoked")

    def status(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "redis": redact_url(self.section.redis_url),
            "connected": self.connected,
            "last_error": self.last_error,
            "lease_ttl": self.section.lease_ttl,
            "claims": sorted(self.claims),
            "repairs": self.repairs,
            "revoked": len(self.revoked),
            "forwarding": self.secret is not None,
            "forwarded": self.forwarded,
        }


def _load_secret(section: FleetSection, label: str) -> bytes:
    assert section.secret_file is not None
    where = f"{label}: [fleet] secret_file"
    try:
        text = section.secret_file.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {section.secret_file}: {exc.strerror}") from None
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) < 32:
        raise ConfigError(
            f"{where}: expected at least 64 hex digits (`openssl rand -hex 32`) in "
            f"{section.secret_file}"
        )  # the file's content is a secret: never shown
    return secret
