"""Access rules (sans-IO): which client addresses may reach which hostname.

The home builds the rules from `[access]` and Home Assistant's `ip_bans.yaml`
and pushes them to the relay in BAN frames (PROTOCOL.md section 10); both
sides decide with `AccessPolicy.refusal`. A hostname's own rule applies alone;
the rule for "*" covers the session's other hostnames. A client in `deny` is
refused; when `allow` is not empty, so is a client outside it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from tunneld.wire.events import AccessRule

__all__ = ["ALL_HOSTNAMES", "DENIED", "NOT_ALLOWED", "AccessPolicy"]

ALL_HOSTNAMES = "*"
DENIED = "access_denied"  # the counter names, at the relay and at home
NOT_ALLOWED = "access_not_allowed"

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AccessPolicy:
    def __init__(self, rules: Iterable[AccessRule] = ()) -> None:
        self.rules = tuple(rules)
        self._compiled: dict[str, tuple[tuple[_Network, ...], tuple[_Network, ...]]] = {
            rule.hostname: (_networks(rule.allow), _networks(rule.deny)) for rule in self.rules
        }

    def __bool__(self) -> bool:
        return bool(self._compiled)

    def refusal(self, ip: str, hostname: str) -> str | None:
        """DENIED or NOT_ALLOWED when client `ip` may not reach `hostname`, else None."""
        if not self._compiled:
            return None
        rule = self._compiled.get(hostname) or self._compiled.get(ALL_HOSTNAMES)
        if rule is None:
            return None
        allow, deny = rule
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return DENIED  # not an address: nothing to match it against, so no
        if any(address in network for network in deny):
            return DENIED
        if allow and not any(address in network for network in allow):
            return NOT_ALLOWED
        return None


def _networks(texts: Iterable[str]) -> tuple[_Network, ...]:
    return tuple(ipaddress.ip_network(text, strict=False) for text in texts)
