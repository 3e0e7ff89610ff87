"""SIGHUP for the home daemon: apply a changed config without dropping open streams.

Everything that can fail is done before anything changes: the file is loaded
and validated, a changed certificate is loaded, the relay CA is read. Then the
new config is handed to each component, which reads it at use time:

* `[relay]` and `[tls] hostnames` (and the HELLO limits): a fresh session is
  opened with them while the current one keeps serving; once the fresh one is
  up, the old one drains its open streams (WebSockets, downloads) and closes.
* `[upstream]`, `[[route]]`: new requests go to the new upstream, new connections
  to the new routes; exchanges under way finish.
* `[watchdog]`, `[daemon] max_streams`, timeouts: read at their next use.
* `[tls]` / `[acme]`: the certificate is reloaded (files re-read, the bootstrap
  one follows the hostnames) and the ACME manager restarts with the new names.
* `log_level`: at once.
* `[daemon] state_directory`, `control_socket`, `metrics_listen`, `[lan] listen`:
  need a restart; they keep their running values and are named in the log and status.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from tunneld.config import HomeConfig
from tunneld.errors import ConfigError
from tunneld.home.certs.acme import AcmeManager
from tunneld.home.certs.store import CertificateStore
from tunneld.home.routes import RouteTable
from tunneld.reload import (
    load_new,
    log_failure,
    log_outcome,
    notify_reloaded,
    notify_reloading,
    plan,
)

if TYPE_CHECKING:
    from tunneld.home.daemon import Daemon

__all__ = ["RESTART_ONLY", "reload_daemon"]

log = logging.getLogger("tunneld.reload")

RESTART_ONLY = (
    ("daemon", "state_directory"),
    ("daemon", "control_socket"),
    ("daemon", "metrics_listen"),
    ("lan", "listen"),
)


def _needs_new_session(old: HomeConfig, new: HomeConfig) -> bool:
    """What the relay learns only in the handshake (token, hostnames, HELLO limits)."""
    o, n = old.relay, new.relay
    return (
        (o.url, o.token, o.ca_file, o.connect_to) != (n.url, n.token, n.ca_file, n.connect_to)
        or old.tls.hostnames != new.tls.hostnames
        or _session_limits(old) != _session_limits(new)
    )


def _session_limits(config: HomeConfig) -> tuple[int, ...]:
    d = config.daemon
    return (d.stream_window, d.max_stream_window, d.session_buffer, d.max_streams)


async def reload_daemon(daemon: Daemon) -> bool:
    """Re-read the daemon's config file and apply it; False (old config kept) if invalid."""
    settings = daemon.settings
    notify_reloading()
    try:
        try:
            result = plan(settings, load_new(settings), RESTART_ONLY)
        except ConfigError as exc:
            log_failure(settings, str(exc))
            return False
        old, new = settings.current, result.config
        certs_changed = (old.tls, old.acme) != (new.tls, new.acme)
        certs = daemon.certs
        if certs_changed or not certs.managed:  # files given: re-read them (renewed on disk)
            certs = CertificateStore(new)
            try:
                await trio.to_thread.run_sync(certs.load)
            except ConfigError as exc:
                log_failure(settings, str(exc))
                return False
        try:
            contexts = RouteTable.prepare(new)  # the client CA of routes that ask for one
        except ConfigError as exc:
            log_failure(settings, str(exc))
            return False
        try:
            daemon.connector.reconfigure(new)
        except ConfigError as exc:  # names [relay] ca_file
            log_failure(settings, str(exc))
            return False

        # Nothing below can fail.
        settings.replace(new, result.needs_restart)
        daemon.streams.config = new
        # [upstream], [watchdog] and [[route]]: new connections take the new routes.
        await daemon.streams.routes.reconfigure(new, contexts)
        if (old.access, old.watchdog.home_assistant_bans) != (
            new.access,
            new.watchdog.home_assistant_bans,
        ):
            daemon.access.configure(new)  # pushed to the relay at once
        if (old.ct, old.tls.hostnames) != (new.ct, new.tls.hostnames):
            daemon.ct.configure(new)  # checks at once
        if certs is not daemon.certs:
            daemon.certs = daemon.streams.certs = certs
        if certs_changed:
            daemon.acme.restart(AcmeManager(new, certs, ready=daemon.is_connected).run)
        if _needs_new_session(old, new):
            log.info("opening a new session with the reloaded config")
            daemon.connector.renew()
        daemon.health.recheck()
        log_outcome(new.path, result, new.daemon.log_level)
        return True
    except Exception as exc:  # a reload must never take the daemon down
        log.exception("reload failed unexpectedly")
        log_failure(settings, f"unexpected error: {exc}")
        return False
    finally:
        notify_reloaded(f"{daemon.connector.state.state} (config reloaded)")
