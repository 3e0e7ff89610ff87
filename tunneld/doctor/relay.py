"""`tunneld doctor -c relay.toml`: the relay's config, keys, certificate, listeners, and
its port as the internet sees it (where this machine can tell).

The checks, in order: config, keys (token public keys load; the signing key too when
set), certificate (a pair, valid for `[relay] hostname`, days left), listeners (the
running relay answers on each `listen` address), public (the hostname resolves, and
TLS to each of its addresses at the public port verifies against the system's CAs).
"""

from __future__ import annotations

import ssl
import time
from pathlib import Path
from typing import Any

from tunneld.checks import relay_tls
from tunneld.config import RelayConfig, format_listen
from tunneld.doctor import Report
from tunneld.doctor.probes import (
    Resolver,
    colon,
    describe,
    http_request,
    is_lan_address,
    open_tcp,
    open_tls,
    running_status,
)
from tunneld.errors import ConfigError, KeyFileError
from tunneld.hostnames import hostname_key
from tunneld.tokens import load_private_key, load_public_keys

__all__ = ["check_relay_setup"]

CERT_SOON = 14 * 86400.0


def check_relay_setup(config: RelayConfig, resolver: Resolver, report: Report) -> None:
    cfg = config.relay
    report.ok("config", f"{config.path} is a valid relay config")
    _keys(config, report)
    sha256 = _certificate(config, report)
    status = running_status(config.relay.control_socket)
    ports = _listeners(config, status, report)
    _public(config, resolver, ports, sha256, report)
    del cfg


def _keys(config: RelayConfig, report: Report) -> None:
    cfg = config.relay
    try:
        keys = load_public_keys(cfg.token_public_key)
    except KeyFileError as exc:
        report.fail(
            "keys",
            f"{config.path}: [relay] token_public_key: {exc}",
            "make a pair with `tunneld keygen --private-key token.key --public-key token.pub`",
        )
        return
    signing = ""
    if cfg.token_private_key is not None:
        try:
            load_private_key(cfg.token_private_key)
            signing = "; the signing key loads"
        except KeyFileError as exc:
            report.fail(
                "keys",
                f"{config.path}: [relay] token_private_key: {exc}",
                'point token_private_key at the key `tunneld keygen` wrote (or set it to "")',
            )
            return
    report.ok("keys", f"{len(keys)} token public key(s) load{signing}")


def _certificate(config: RelayConfig, report: Report) -> str | None:
    cfg = config.relay
    acme = config.relay_acme
    if acme.enabled and not cfg.certificate.exists():
        report.warn(
            "certificate",
            f"{cfg.certificate} does not exist yet ([relay.acme] makes it when the relay starts)",
            "start the relay: `systemctl enable --now tunneld-relay`",
        )
        return None
    try:
        _, info = relay_tls(config)
    except ConfigError as exc:
        report.fail(
            "certificate",
            str(exc),
            f"install a certificate chain for {cfg.hostname} and its key (README: Your first hour)",
        )
        return None
    names = {hostname_key(s) for s in info.sans}
    wildcard = "*." + cfg.hostname.split(".", 1)[-1]
    left = info.not_after.timestamp() - time.time()
    if cfg.hostname not in names and wildcard not in names:
        report.fail(
            "certificate",
            f"{cfg.certificate} is for {', '.join(info.sans) or '(no names)'}, "
            f"not for {cfg.hostname}",
            f"install a certificate whose names include {cfg.hostname}",
        )
    elif acme.enabled and _self_signed(cfg.certificate):
        report.warn(
            "certificate",
            f"{cfg.certificate} is still self-signed: [relay.acme] has no certificate yet"
            + ("" if acme.agree_tos else " (agree_tos is false)"),
            "set [relay.acme] agree_tos = true; the CA must reach this relay on port "
            + ("80 (http_listen)" if acme.challenge == "http-01" else "443")
            + "; `tunneld status -c relay.toml` shows the renewal state and its last error",
        )
    elif left <= 0:
        report.fail(
            "certificate",
            f"{cfg.certificate} expired at {info.not_after:%Y-%m-%dT%H:%M:%SZ}",
            "renew it, then `systemctl reload tunneld-relay` (no session is dropped)",
        )
    elif left < CERT_SOON:
        report.warn(
            "certificate",
            f"{cfg.certificate} for {cfg.hostname} expires in {left / 86400:.1f} days",
            "renew it, then `systemctl reload tunneld-relay` (no session is dropped)",
        )
    else:
        report.ok(
            "certificate",
            f"{cfg.certificate} is valid for {cfg.hostname}, {left / 86400:.0f} days left, "
            f"SHA-256 {colon(info.sha256)[:23]}...",
        )
    return info.sha256


def _self_signed(path: Path) -> bool:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificates(path.read_bytes())[0]
    except (OSError, ValueError):
        return False
    return cert.issuer == cert.subject


def _local(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _listeners(
    config: RelayConfig, status: dict[str, Any] | None | str, report: Report
) -> list[int]:
    """The ports the relay listens on (from its status when it runs), for `public`."""
    configured = [port for _, port in config.relay.listen]
    if status is None:
        report.fail(
            "listeners",
            f"the relay is not running (nothing answers on {config.relay.control_socket})",
            "start it: `systemctl enable --now tunneld-relay`; `journalctl -u tunneld-relay` "
            "says why it stopped",
        )
        return configured
    if isinstance(status, str):
        report.fail(
            "listeners",
            f"cannot ask the relay: {status}",
            "run doctor as root or in the relay's group",
        )
        return configured
    bound = [str(a) for a in status.get("listen") or []]
    problems = []
    for entry in bound:
        host, _, port = entry.rpartition(":")
        try:
            open_tcp(_local(host.strip("[]")), int(port)).close()
        except OSError as exc:
            problems.append(f"{entry}: {describe(exc)}")
    if problems or not bound:
        report.fail(
            "listeners",
            "the relay does not answer on " + ("; ".join(problems) or "any listen address"),
            "restart it (`systemctl restart tunneld-relay`) and read its log",
        )
    else:
        extra = ""
        if config.relay.http_listen:
            extra = "; http_listen " + ", ".join(format_listen(a) for a in config.relay.http_listen)
        report.ok("listeners", f"the relay is {status.get('state')} on {', '.join(bound)}{extra}")
    ports = sorted({int(b.rsplit(":", 1)[1]) for b in bound})
    return ports or configured


def _public(
    config: RelayConfig,
    resolver: Resolver,
    ports: list[int],
    sha256: str | None,
    report: Report,
) -> None:
    host = config.relay.hostname
    try:
        addresses = resolver.resolve(host)
    except OSError as exc:
        report.fail(
            "public",
            f"{host} {describe(exc)}",
            f"give {host} an A (and AAAA) record with this machine's public address",
        )
        return
    port = ports[0] if ports else 443
    lan = [a for a in addresses if is_lan_address(a)]
    ctx = ssl.create_default_context()  # the system's CAs: what a home trusts by default
    ctx.set_alpn_protocols(["http/1.1"])
    for address in addresses:
        where = f"{host} ({address}) port {port}"
        try:
            peer = open_tls(address, port, host, ctx)
            with peer.sock as sock:
                answer = http_request(sock, host, "/healthz")
        except ssl.SSLCertVerificationError as exc:
            report.fail(
                "public",
                f"{where}: {describe(exc)}",
                f"serve a certificate for {host} from a public CA with its full chain "
                "(README: Your first hour); homes with a private CA need [relay] ca_file",
            )
            continue
        except (OSError, ValueError) as exc:
            report.fail(
                "public",
                f"{where} is not reachable: {describe(exc)}",
                f"open TCP port {port} in this machine's firewall (e.g. `ufw allow {port}/tcp`) "
                "and in the VPS provider's, and check that the relay listens on that address",
            )
            continue
        if sha256 is not None and peer.sha256 != sha256:
            report.warn(
                "public",
                f"{where} serves certificate {colon(peer.sha256)[:23]}..., not "
                f"{config.relay.certificate}",
                "reload the relay after changing its certificate "
                "(`systemctl reload tunneld-relay`), or check what else answers on that address",
            )
            continue
        report.ok(
            "public",
            f"https://{host}:{port}/healthz at {address} answers {answer.status}, certificate "
            "verified (a firewall in front of this machine may still block others)",
        )
    if lan:
        report.warn(
            "public",
            f"{host} resolves to {', '.join(lan)}, a private address the internet cannot reach",
            f"give {host} a record with this machine's public address",
        )
