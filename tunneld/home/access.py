"""`[access]` and Home Assistant's bans, as rules the relay enforces.

The rules (tunneld/access.py) come from `[access] allow` / `deny`, each
`[access.hostnames."name"]` table, and the addresses in Home Assistant's
`ip_bans.yaml` when `[watchdog] home_assistant_bans` names it. They go to the
relay in a BAN frame after every connect and on every change (a reload, a line
Home Assistant adds or drops), and the home applies the same rules to each
stream before TLS, for a relay that predates them.

`ip_bans.yaml` is polled (`HA_POLL`), so a ban Home Assistant writes reaches the
relay within about a second. Its format is one top-level key per address:

    192.0.2.7:
      banned_at: '2026-12-05T12:00:00.000000+00:00'

Only those keys are read (a missing file is an empty list); a file that cannot
be read keeps the addresses last read, and status says why.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from tunneld.access import ALL_HOSTNAMES, AccessPolicy
from tunneld.config import HomeConfig, IPNetwork
from tunneld.wire.events import AccessRule

__all__ = ["HA_POLL", "AccessControl", "parse_ip_bans"]

log = logging.getLogger("tunneld.access")

HA_POLL = 1.0  # seconds between looks at ip_bans.yaml
MAX_BANS_FILE = 4 * 1024 * 1024

Listener = Callable[[tuple[AccessRule, ...]], None]


def parse_ip_bans(text: str) -> list[str]:
    """The addresses Home Assistant's ip_bans.yaml bans (its top-level keys), in order."""
    out: list[str] = []
    for line in text.splitlines():
        if not line or line[0] in " \t#-." or line.startswith("..."):
            continue
        line = line.rstrip()
        if line.endswith(":"):
            key = line[:-1]
        elif ": " in line:
            key = line.split(": ", 1)[0]
        else:
            continue
        key = key.strip().strip("'\"")
        try:
            address = ipaddress.ip_address(key)
        except ValueError:
            continue
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        out.append(str(address))
    return list(dict.fromkeys(out))


class AccessControl:
    def __init__(self, config: HomeConfig) -> None:
        self.listeners: list[Listener] = []
        self.ha_bans: tuple[str, ...] = ()
        self.ha_error: str | None = None
        self.refused = 0
        self._ha_seen: tuple[int, int, int] | None = None
        self.configure(config)

    # -- rules ------------------------------------------------------------------
    def configure(self, config: HomeConfig) -> None:
        """Use `config`'s [access] and home_assistant_bans (start, reload); pushes a change."""
        self.config = config.access
        self.ha_path: Path | None = config.watchdog.home_assistant_bans
        if self.ha_path is None:
            self.ha_bans, self.ha_error, self._ha_seen = (), None, None
        else:
            self._ha_seen = None  # read it again, it may be another file
            self._read_ha_bans()
        self._changed()

    def rules(self) -> tuple[AccessRule, ...]:
        """The rules as the relay gets them (empty: no rule, everyone admitted)."""
        access = self.config
        allow = _texts(access.allow)
        deny = _texts(access.deny) + tuple(self._ha_networks())
        rules = []
        if allow or deny:
            rules.append(AccessRule(ALL_HOSTNAMES, allow, deny))
        for hostname, host in access.hostnames:
            own_allow = allow if host.allow is None else _texts(host.allow)
            rules.append(AccessRule(hostname, own_allow, deny + _texts(host.deny)))
        return tuple(rules)

    def refusal(self, ip: str, hostname: str) -> str | None:
        return self.policy.refusal(ip, hostname)

    def _ha_networks(self) -> list[str]:
        return [f"{ip}/{32 if ':' not in ip else 128}" for ip in self.ha_bans]

    def _changed(self) -> None:
        rules = self.rules()
        self.policy = AccessPolicy(rules)
        for listener in self.listeners:
            listener(rules)

    # -- Home Assistant's ip_bans.yaml -------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(HA_POLL)
            if self.ha_path is not None and self._read_ha_bans():
                self._changed()

    def _read_ha_bans(self) -> bool:
        """Read ip_bans.yaml if it changed; True when its addresses did."""
        path = self.ha_path
        assert path is not None
        try:
            st = os.stat(path)
            seen = (st.st_mtime_ns, st.st_size, st.st_ino)
            if seen == self._ha_seen:
                return False
            if st.st_size > MAX_BANS_FILE:
                raise OSError(f"larger than {MAX_BANS_FILE} bytes")
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            seen, text = (0, 0, 0), ""  # Home Assistant has banned nobody yet
        except OSError as exc:
            why = f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
            if why != self.ha_error:
                log.warning("%s (keeping %d address(es))", why, len(self.ha_bans))
            self.ha_error = why
            return False
        self._ha_seen = seen
        self.ha_error = None
        bans = tuple(parse_ip_bans(text))
        if bans == self.ha_bans:
            return False
        added = sorted(set(bans) - set(self.ha_bans))
        lifted = sorted(set(self.ha_bans) - set(bans))
        self.ha_bans = bans
        for ip in added:
            log.info("denied %s at the relay: banned by Home Assistant (%s)", ip, path)
        for ip in lifted:
            log.info("admitted %s again: Home Assistant lifted its ban (%s)", ip, path)
        return True

    # -- status --------------------------------------------------------------------
    def status(self, relay_enforces: bool | None) -> dict[str, Any]:
        access = self.config
        return {
            "allow": list(_texts(access.allow)),
            "deny": list(_texts(access.deny)),
            "hostnames": {
                name: {
                    "allow": None if host.allow is None else list(_texts(host.allow)),
                    "deny": list(_texts(host.deny)),
                }
                for name, host in access.hostnames
            },
            "home_assistant_bans": None
            if self.ha_path is None
            else {
                "file": str(self.ha_path),
                "addresses": len(self.ha_bans),
                "error": self.ha_error,
            },
            "rules": len(self.policy.rules),
            "refused": self.refused,
            "relay_enforces": relay_enforces,
        }

    def warnings(self, relay_enforces: bool | None) -> list[str]:
        out = []
        if self.ha_error:
            out.append(f"[watchdog] home_assistant_bans: {self.ha_error}")
        if self.policy and relay_enforces is False:
            out.append(
                "the relay does not enforce [access]: its clients' bytes cross the tunnel"
                " and are refused at home"
            )
        return out


def _texts(networks: tuple[IPNetwork, ...]) -> tuple[str, ...]:
    return tuple(str(n) for n in networks)
