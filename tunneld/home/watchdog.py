"""The one place that decides a request's real client address.

The relay reports the TCP peer of every stream. That address is the client,
unless it is one of `[watchdog] trusted_proxies`: then the client is the
rightmost address of the proxy's forwarded chain that is not itself a trusted
proxy. Every address leaves here in `normalize_ip` form (bare, no port, no
brackets, IPv4-mapped IPv6 unmapped), the form Home Assistant and the ban list
compare. Bans (a later issue) hang off `Watchdog` too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from tunneld.config import IPNetwork, WatchdogSection
from tunneld.netaddr import normalize_ip

__all__ = ["Watchdog", "client_address", "is_trusted", "parse_node"]


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
    """Client addresses (and, later, bans) for the home daemon."""

    def __init__(self, config: WatchdogSection) -> None:
        self.config = config
        self._trusted: tuple[IPNetwork, ...] = config.trusted_proxies

    def trusts(self, ip: str) -> bool:
        """True when `ip` is a trusted proxy, whose forwarded chain is believed."""
        return bool(self._trusted) and is_trusted(ip, self._trusted)

    def client_address(self, relay_ip: str, forwarded_chain: Sequence[str] = ()) -> str:
        return client_address(relay_ip, forwarded_chain, self._trusted)
