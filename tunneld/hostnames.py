"""The one normal form of a hostname, used wherever two names are compared.

Config, tokens, ClientHello routing, certificates (pki, ACME) and the doctor all
normalise through here, so a name that matches in one place matches in every
other: `Home.Example.COM.`, `home.example.com` and a Unicode name against its
punycode A-label all compare equal.

The form: surrounding white space stripped, lower-case, one trailing dot dropped,
Unicode labels IDNA-encoded to A-labels, and an IP address in its canonical text
(`::0001` -> `::1`). `hostname_key` computes it and never raises (for names from
the network, compared but never trusted); `normalize_hostname` also checks that
the result is a valid DNS name, and refuses an IP address unless the caller
accepts one. What each caller accepts is its own rule; the form is shared.

Pure functions: imported by the sans-IO ClientHello parser, so no I/O imports here.
"""

from __future__ import annotations

import ipaddress
import json
import re

__all__ = ["hostname_key", "is_dns_name", "normalize_hostname"]

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def hostname_key(text: str) -> str:
    """`text` in the normal form. Never raises: a name that is not valid comes back
    stripped and lower-cased, and so matches no valid name."""
    name = text.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return name
    if name and (name[0].isdigit() or ":" in name):  # only then can it be an address
        try:
            return str(ipaddress.ip_address(name))
        except ValueError:
            pass
    return name


def is_dns_name(name: str) -> bool:
    """Is `name` (already in the normal form) a syntactically valid DNS name?"""
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(p) for p in name.split("."))


def normalize_hostname(text: str, *, allow_ip: bool = False) -> str:
    """`text` in the normal form; ValueError unless it is a valid DNS name, or, with
    `allow_ip`, an IP address. The error quotes `text` and says what is wrong."""
    name = hostname_key(text)
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        if allow_ip:
            return name
        raise ValueError(f"an IP address is not a hostname (SNI needs a name): {json.dumps(text)}")
    if not is_dns_name(name):
        raise ValueError(f"not a valid DNS name: {json.dumps(text)}")
    return name
