"""The one place that decides a request's real client address, and whether it may pass.

The relay reports the TCP peer of every stream. That address is the client,
unless it is one of `[watchdog] trusted_proxies`: then the client is the
rightmost address of the proxy's forwarded chain that is not itself a trusted
proxy. Every address leaves here in `normalize_ip` form (bare, no port, no
brackets, IPv4-mapped IPv6 unmapped), the form Home Assistant and the ban list
compare.

Whether it may pass: the stream acceptor asks `admit` (bans, streams per
address) before the TLS handshake, the proxy asks `banned` for every request
(a trusted proxy's clients are known only then). Failed authentications are
counted from upstream answers (`observe`): `ban_statuses`, and with the
`home-assistant` preset the login flow's `invalid_auth` / `invalid_code`
answers, read from a bounded peek at that one path's response body. A
successful login resets the count, as Home Assistant does. `ban_threshold`
failures within `ban_window` ban the address (or its /64) for `ban_duration`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
import zlib
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence

from tunneld.config import IPNetwork, WatchdogSection, format_duration
from tunneld.home.watchdog.bans import BanList, BanRecord, ban_key, never_banned, parse_target
from tunneld.netaddr import normalize_ip
from tunneld.wire.events import BanEntry

__all__ = ["LoginPeek", "Watchdog", "client_address", "is_trusted", "parse_node"]

log = logging.getLogger("tunneld.watchdog")

PEEK_BYTES = 8 * 1024  # of a login-flow response body; Home Assistant's are well under 1 KiB
MAX_TRACKED = 10_000  # addresses with failures remembered (oldest forgotten first)
LOGIN_FLOW = re.compile(rb"/auth/login_flow/[^/?#]+")
LOGIN_FAILURES = frozenset({"invalid_auth", "invalid_code"})


def parse_node(text: str) -> str | None:
    """One forwarded-chain entry as a normalized address, or None if it is not one.

    Accepts what proxies write: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`,
    `[2001:db8::1]`, `[2001:db8::1]:443`, and RFC 7239 quoting (`"[::1]:80"`).
    `unknown` and obfuscated identifiers (`_hidden`) are not addresses.
    """
    node = text.strip().strip('"').strip()
    if node.startswith("["):
        end = node.find("]")
        if end < 0:
            return None
        rest = node[end + 1 :]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
        node = node[1:end]
    elif node.count(":") == 1:  # IPv4 with a port; bare IPv6 has several colons
        node, _, port = node.partition(":")
        if not port.isdigit():
            return None
    try:
        return normalize_ip(node)
    except ValueError:
        return None


def is_trusted(ip: str, trusted_proxies: Iterable[IPNetwork]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in trusted_proxies)


def client_address(
    relay_ip: str, forwarded_chain: Sequence[str], trusted_proxies: Sequence[IPNetwork]
) -> str:
    """The real client of a request that arrived from `relay_ip`.

    `forwarded_chain` is the peer's forwarded chain in header order (leftmost =
    original client), entries as written. Only a trusted peer's chain counts:
    walk it right to left past trusted proxies; the first other address is the
    client. An entry that is not an address stops the walk (whatever is left of
    it was written by someone we do not trust), and so the last trusted hop is
    the answer; so is the leftmost hop when every hop is trusted.
    """
    current = normalize_ip(relay_ip)
    if not trusted_proxies or not is_trusted(current, trusted_proxies):
        return current
    for entry in reversed(forwarded_chain):
        hop = parse_node(entry)
        if hop is None:
            break
        current = hop
        if not is_trusted(hop, trusted_proxies):
            break
    return current


class Watchdog:
    """Client addresses, bans and failed-authentication counting for the home daemon."""

    def __init__(
        self,
        config: WatchdogSection,
        bans: BanList | None = None,
        *,
        clock: Callable[[], float] = time.time,
        counts_from: Watchdog | None = None,
    ) -> None:
        """`counts_from`: another route's watchdog whose failure counts this one shares
        (one client, one count and one ban across routes)."""
        self.config = config
        self.clock = clock
        self.bans = bans if bans is not None else BanList(clock=clock)
        self._trusted: tuple[IPNetwork, ...] = config.trusted_proxies
        self._streams: Counter[str] = Counter()
        # ban key -> times of its recent failures, least recently failed first
        self._failures: OrderedDict[str, deque[float]] = (
            counts_from._failures if counts_from is not None else OrderedDict()
        )

    def reconfigure(self, config: WatchdogSection) -> None:
        """New limits and trusted proxies (reload); counts and bans are kept."""
        self.config = config
        self._trusted = config.trusted_proxies

    def trusts(self, ip: str) -> bool:
        """True when `ip` is a trusted proxy, whose forwarded chain is believed."""
        return bool(self._trusted) and is_trusted(ip, self._trusted)

    def client_address(self, relay_ip: str, forwarded_chain: Sequence[str] = ()) -> str:
        return client_address(relay_ip, forwarded_chain, self._trusted)

    # -- may it pass ----------------------------------------------------------------
    def banned(self, ip: str) -> BanRecord | None:
        """The ban that keeps client `ip` (normalized) out, if any."""
        record = self.bans.covering(ip)
        if record is None or self._protected(ip):
            return None
        return record

    def admit(self, ip: str) -> str | None:
        """Before a stream's TLS handshake: None and the stream is counted, else why not.

        Every admitted stream must be `release`d.
        """
        if self.banned(ip) is not None:
            return "banned"
        limit = self.config.max_streams_per_ip
        if self._streams[ip] >= limit:
            return f"over {limit} streams per address"
        self._streams[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self._streams[ip] -= 1
        if self._streams[ip] <= 0:
            del self._streams[ip]

    def streams_from(self, ip: str) -> int:
        return self._streams[ip]

    # -- failed authentications ---------------------------------------------------------
    def observe(
        self,
        ip: str,
        method: bytes,
        target: bytes,
        status: int,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> LoginPeek | None:
        """An upstream response head for client `ip`; a LoginPeek to feed its body to, or None."""
        if status in self.config.ban_statuses:
            path = target.split(b"?", 1)[0].decode("ascii", "replace")
            self.failed(ip, f"HTTP {status} for {method.decode('ascii', 'replace')} {path}")
            return None
        if (
            self.config.preset == "home-assistant"
            and status == 200
            and method == b"POST"
            and LOGIN_FLOW.fullmatch(target.split(b"?", 1)[0])
        ):
            encoding = next((v for n, v in headers if n.lower() == b"content-encoding"), b"")
            return LoginPeek(self, ip, encoding.strip().lower())
        return None

    def failed(self, ip: str, why: str) -> BanRecord | None:
        """Count one failed authentication; returns the ban it triggered, if it did."""
        if self._protected(ip):
            return None
        key = self._key(ip)
        now = self.clock()
        times = self._failures.pop(key, None)
        if times is None:
            times = deque()
            if len(self._failures) >= MAX_TRACKED:
                self._failures.popitem(last=False)
        self._failures[key] = times
        horizon = now - self.config.ban_window
        while times and times[0] <= horizon:
            times.popleft()
        times.append(now)
        count = len(times)
        threshold = self.config.ban_threshold
        log.info("failed authentication %d/%d from %s: %s", count, threshold, ip, why)
        if count < threshold:
            return None
        del self._failures[key]
        window = format_duration(self.config.ban_window)
        reason = f"{count} failed authentications within {window} (last: {why})"
        return self.bans.add(key, self._duration(self.config.ban_duration), reason)

    def succeeded(self, ip: str) -> None:
        """A successful login forgets the address's failures."""
        if self._failures.pop(self._key(ip), None):
            log.info("successful login from %s: failed authentications reset", ip)

    def failures(self, ip: str) -> int:
        """Failures from `ip` (or its /64) still inside the window."""
        times = self._failures.get(self._key(ip))
        horizon = self.clock() - self.config.ban_window
        return sum(1 for t in times or () if t > horizon)

    def ban_list(self) -> list[BanRecord]:
        """The active bans, without any a `never_ban` network (added since) protects."""
        never = self.config.never_ban
        return [r for r in self.bans.active() if never_banned(r.ip, never) is None]

    def ban_entries(self) -> tuple[BanEntry, ...]:
        """The whole list as BAN entries: what the relay gets after every connect."""
        return tuple(r.entry() for r in self.ban_list())

    # -- manual bans --------------------------------------------------------------------
    def ban(self, target: str, duration: float | None, reason: str) -> BanRecord:
        """Ban an address or IPv6 /64 by hand (duration None or 0 = until removed).

        ValueError with a message for a bad address or a `never_ban` one.
        """
        key = parse_target(target, self.config.ipv6_prefix)
        protected = never_banned(key, self.config.never_ban)
        if protected is not None:
            raise ValueError(f"{key} is in never_ban ({protected})")
        self._failures.pop(key, None)
        return self.bans.add(key, self._duration(duration), reason)

    def unban(self, target: str, reason: str) -> list[BanRecord]:
        """Lift every ban covering `target` (an address or an IPv6 /64); ValueError if bad."""
        key = parse_target(target)
        if "/" not in key:
            self._failures.pop(self._key(key), None)
        return self.bans.remove(key, reason)

    # -- helpers ------------------------------------------------------------------------
    def _key(self, ip: str) -> str:
        """What failures of `ip` count against and what gets banned: it, or its /64."""
        key = ban_key(ip, self.config.ipv6_prefix)
        if "/" in key and never_banned(key, self.config.never_ban) is not None:
            return ip  # its /64 holds a never_ban address: this address only
        return key

    def _protected(self, ip: str) -> bool:
        never = self.config.never_ban
        if not never:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in never)

    @staticmethod
    def _duration(seconds: float | None) -> float | None:
        return None if not seconds else seconds


class LoginPeek:
    """Reads the start of one login-flow response body (bounded) and judges it at the end."""

    def __init__(self, watchdog: Watchdog, ip: str, encoding: bytes) -> None:
        self.watchdog = watchdog
        self.ip = ip
        self._buf = bytearray()
        self._inflate: zlib._Decompress | None = None
        self._usable = encoding in (b"", b"identity", b"gzip", b"x-gzip", b"deflate")
        if encoding in (b"gzip", b"x-gzip", b"deflate"):
            self._inflate = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header

    def feed(self, data: bytes) -> None:
        room = PEEK_BYTES - len(self._buf)
        if room > 0 and self._usable:
            self._buf += data[:room]

    def finish(self) -> None:
        """The response ended completely: count a failure or reset on success."""
        verdict = login_verdict(self._body())
        if verdict is False:
            self.watchdog.failed(self.ip, "Home Assistant login failed")
        elif verdict is True:
            self.watchdog.succeeded(self.ip)

    def _body(self) -> bytes:
        if not self._usable:
            return b""
        if self._inflate is None:
            return bytes(self._buf)
        try:
            return self._inflate.decompress(bytes(self._buf), PEEK_BYTES)
        except zlib.error:
            return b""


def login_verdict(body: bytes) -> bool | None:
    """A Home Assistant login-flow answer: True = logged in, False = failed, None = neither."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    if obj.get("type") == "create_entry":
        return True
    errors = obj.get("errors")
    if isinstance(errors, dict) and errors.get("base") in LOGIN_FAILURES:
        return False
    return None
