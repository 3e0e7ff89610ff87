"""SIGHUP for the relay: new certificate, token keys, revocations, blocked versions, log level.

The new certificate goes into a new SSL context used by new connections; open
sessions and client splices are untouched. A newly revoked token id also
closes the sessions that token opened (they reconnect and are refused, which
the daemon shows as `revoked`). A newly blocked version applies from the
next connection attempt. Listeners, the hostname and the control socket need
a restart: they keep their running values and are named in the log.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from tunneld.checks import relay_tls
from tunneld.config import FleetSection, RelayAcmeSection
from tunneld.errors import ConfigError, KeyFileError
from tunneld.pki import CertificateInfo
from tunneld.reload import (
    load_new,
    log_failure,
    log_outcome,
    notify_reloaded,
    notify_reloading,
    plan,
)
from tunneld.tokens import load_public_keys

if TYPE_CHECKING:
    from tunneld.relay.server import Relay

__all__ = ["RESTART_ONLY", "certificate_status", "reload_relay"]

log = logging.getLogger("tunneld.reload")

RESTART_ONLY = (
    ("relay", "hostname"),
    ("relay", "listen"),
    ("relay", "http_listen"),
    ("relay", "control_socket"),
    ("relay", "metrics_listen"),
    # [relay.acme]: the manager and the certificate store are made at start.
    *(("relay_acme", f.name) for f in dataclasses.fields(RelayAcmeSection) if f.init),
    # [fleet]: the Redis client and this node's claims are made at start.
    *(("fleet", f.name) for f in dataclasses.fields(FleetSection) if f.init),
)


def certificate_status(info: CertificateInfo, now: float) -> dict[str, Any]:
    return {
        "subject": info.subject,
        "sans": list(info.sans),
        "issuer": info.issuer,
        "not_after": info.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "days_left": round((info.not_after.timestamp() - now) / 86400, 1),
        "sha256": info.sha256,
    }


async def reload_relay(relay: Relay) -> bool:
    """Re-read the relay's config file and apply it; False (old config kept) if invalid."""
    settings = relay.settings
    notify_reloading()
    try:
        try:
            result = plan(settings, load_new(settings), RESTART_ONLY)
            cfg = result.config.relay
            label = f"{result.config.path}: [relay]"
            context, info = relay_tls(result.config)  # ConfigError naming the key
            try:
                keys = load_public_keys(cfg.token_public_key)
            except KeyFileError as exc:
                raise ConfigError(f"{label} token_public_key: {exc}") from None
        except ConfigError as exc:
            log_failure(settings, str(exc))
            return False

        # Nothing below can fail.
        newly_revoked = set(cfg.revoked_tokens) - set(settings.current.relay.revoked_tokens)
        settings.replace(result.config, result.needs_restart)
        relay.set_tls(context, info)
        relay.set_public_keys(keys)
        relay.set_connection_rate(cfg.connections_per_ip_per_second)
        if relay.fleet is not None:
            relay.fleet.revoke(tuple(newly_revoked))  # to every relay of the fleet
        for session in list(relay.registry.sessions):
            if session.token_id in newly_revoked:
                log.warning(
                    "session %s (%s): its token %s is now revoked: closing",
                    session.session_id,
                    session.subject,
                    session.token_id,
                )
                session.mux.close("token revoked")
        log_outcome(result.config.path, result, cfg.log_level)
        return True
    except Exception as exc:  # a reload must never take the relay down
        log.exception("reload failed unexpectedly")
        log_failure(settings, f"unexpected error: {exc}")
        return False
    finally:
        notify_reloaded(f"{relay.state}, {len(relay.registry.sessions)} session(s)")
