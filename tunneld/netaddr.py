"""Client addresses in the one form Home Assistant and the ban list compare."""

from __future__ import annotations

import ipaddress


def normalize_ip(text: str) -> str:
    """One bare, normalized address: no zone, IPv4-mapped IPv6 back to IPv4.

    Home Assistant compares ban addresses exactly (`::ffff:1.2.3.4` is not
    `1.2.3.4`), so every address tunneld reports or bans goes through here.
    """
    addr = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)
