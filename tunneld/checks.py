"""What `run` and `relay` will open, opened now: the files a config names and the token.

`config.py` checks the shape of a config without touching the files it names, so a
config can be written before its key files exist. These checks open and parse every
file the daemon or the relay reads when it starts (certificates, keys, CA files, token
keys) and decode the token, so `check-config` says "valid" only when `run` or `relay`
would start, and every failure names `file: [table] key`. `run` and `relay` run the
same checks first, so a missing file is one line and exit 2, never a traceback or a
retry loop. Messages never show a file's content or the token.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from tunneld.config import LETSENCRYPT_TERMS, HomeConfig, RelayConfig, RelaySection
from tunneld.errors import ConfigError, KeyFileError, TokenError
from tunneld.hostnames import hostname_key
from tunneld.pki import CertificateInfo, certificate_info
from tunneld.tokens import decode_claims_unverified, load_private_key, load_public_keys

__all__ = [
    "Findings",
    "PLACEHOLDER_TOKEN",
    "check_config",
    "check_home",
    "check_relay",
    "client_context",
    "relay_tls",
]

PLACEHOLDER_TOKEN = "REPLACE-WITH-TOKEN"  # what `tunneld init` writes without --token
_MAX_PEM = 1 << 20


@dataclass
class Findings:
    """Errors stop `run`/`relay` (and fail `check-config`); warnings are only said."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _label(path: Path, table: str, key: str) -> str:
    return f"{path}: [{table}] {key}"


def _read(label: str, path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_PEM + 1)
    except FileNotFoundError:
        raise ConfigError(f"{label}: no such file: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{label}: {path} is a directory, not a file") from None
    except PermissionError:
        raise ConfigError(f"{label}: permission denied: {path}") from None
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_PEM:
        raise ConfigError(f"{label}: {path} is too large to be a PEM file")
    return data


def _certificates(label: str, path: Path) -> None:
    data = _read(label, path)
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(f"{label}: {path} holds no PEM certificate") from None


def _private_key(label: str, path: Path) -> None:
    data = _read(label, path)
    try:
        serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            f"{label}: {path} is encrypted; tunneld needs an unencrypted key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        # The library's message is not shown: it could quote the file.
        raise ConfigError(f"{label}: {path} is not a PEM private key") from None


def _pair(config_path: Path, table: str, cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for `cert` and `key`, blaming the key that is wrong."""
    _certificates(_label(config_path, table, "certificate"), cert)
    _private_key(_label(config_path, table, "private_key"), key)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"{config_path}: [{table}] certificate / private_key: {cert} and {key} "
            f"do not make a pair ({getattr(exc, 'reason', None) or exc})"
        ) from None
    return ctx


def client_context(label: str, ca_file: Path | None) -> ssl.SSLContext:
    """A verifying client context trusting the system CAs and `ca_file` (named by `label`)."""
    ctx = ssl.create_default_context()
    if ca_file is not None:
        _certificates(label, ca_file)
        try:
            ctx.load_verify_locations(cafile=str(ca_file))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{label}: cannot load {ca_file}: {exc}") from None
    return ctx


def relay_tls(config: RelayConfig) -> tuple[ssl.SSLContext, CertificateInfo]:
    """The relay's own server context and certificate facts; ConfigError naming
    `[relay] certificate` or `[relay] private_key` if either cannot be used."""
    cfg = config.relay
    ctx = _pair(config.path, "relay", cfg.certificate, cfg.private_key)
    ctx.set_alpn_protocols(["http/1.1"])
    label = _label(config.path, "relay", "certificate")
    try:
        info = certificate_info(_read(label, cfg.certificate))
    except KeyFileError as exc:
        raise ConfigError(f"{label}: {exc}") from None
    return ctx, info


def _attempt(findings: Findings, check: object, *args: object) -> None:
    try:
        check(*args)  # type: ignore[operator]
    except ConfigError as exc:
        findings.errors.append(str(exc))


def check_relay(config: RelayConfig, *, starting: bool = False) -> Findings:
    """`starting`: only what the relay process opens; the signing key, used by
    `tunneld token issue` alone (often as root, while the relay runs as its own user),
    is checked by check-config."""
    findings = Findings()
    cfg: RelaySection = config.relay
    acme = config.relay_acme
    if not (acme.enabled and not cfg.certificate.exists() and not cfg.private_key.exists()):
        _attempt(findings, relay_tls, config)  # [relay.acme] creates missing files itself
    if acme.enabled and not acme.agree_tos:
        findings.warnings.append(
            f"{_label(config.path, 'relay.acme', 'agree_tos')}: false, so ACME stays off and "
            f"the relay keeps serving {cfg.certificate.name} (self-signed until ordered); "
            f"read the CA's terms (Let's Encrypt: {LETSENCRYPT_TERMS}) and set agree_tos = true"
        )
    if acme.enabled and acme.ca_file is not None:
        _attempt(
            findings, client_context, _label(config.path, "relay.acme", "ca_file"), acme.ca_file
        )
    label = _label(config.path, "relay", "token_public_key")
    try:
        load_public_keys(cfg.token_public_key)
    except KeyFileError as exc:
        findings.errors.append(f"{label}: {exc}")
    if cfg.token_private_key is not None and not starting:
        label = _label(config.path, "relay", "token_private_key")
        try:
            load_private_key(cfg.token_private_key)
        except KeyFileError as exc:
            findings.errors.append(f"{label}: {exc}")
    return findings


def check_home(config: HomeConfig, now: float | None = None) -> Findings:
    findings = Findings()
    path = config.path
    if config.relay.url.startswith("wss:"):
        _attempt(findings, client_context, _label(path, "relay", "ca_file"), config.relay.ca_file)
    if config.tls.certificate is not None and config.tls.private_key is not None:
        _attempt(findings, _pair, path, "tls", config.tls.certificate, config.tls.private_key)
    if config.acme.enabled and config.acme.ca_file is not None:
        _attempt(findings, client_context, _label(path, "acme", "ca_file"), config.acme.ca_file)
    if config.upstream.scheme == "https" and config.upstream.ca_file is not None:
        label = _label(path, "upstream", "ca_file")
        _attempt(findings, client_context, label, config.upstream.ca_file)
    for i, route in enumerate(config.route, 1):
        if route.upstream.startswith("https:") and route.ca_file is not None:
            label = _label(path, f"route {i}", "ca_file")
            _attempt(findings, client_context, label, route.ca_file)
        own_ca = config.daemon.state_directory / "clients" / "ca.pem"
        if route.client_certificate and route.client_ca is None and not own_ca.exists():
            findings.warnings.append(
                f"{_label(path, f'route {i}', 'client_certificate')}: no client certificate "
                f"issued yet ({own_ca} does not exist); the daemon creates the CA when it "
                f"starts, then `tunneld client issue --name NAME -c {path}` makes one"
            )
    _check_token(config, findings, time.time() if now is None else now)
    if config.acme.enabled and not config.acme.agree_tos and config.tls.certificate is None:
        findings.warnings.append(
            f"{_label(path, 'acme', 'agree_tos')}: false, so ACME stays off and clients see a "
            f"self-signed certificate; read the CA's terms (Let's Encrypt: {LETSENCRYPT_TERMS}) "
            "and set agree_tos = true to let the daemon order one"
        )
    return findings


def _check_token(config: HomeConfig, findings: Findings, now: float) -> None:
    relay = config.relay
    if relay.token_file is not None:
        label = _label(config.path, "relay", "token_file")
        where = f"the token in {relay.token_file}"
    else:
        label = _label(config.path, "relay", "token")
        where = "the token"
    issue = "paste the line `tunneld token issue -c relay.toml --hostname ...` printed"
    if relay.token == PLACEHOLDER_TOKEN:
        findings.errors.append(
            f"{label}: {where} is still the placeholder {PLACEHOLDER_TOKEN}; {issue}"
        )
        return
    try:
        claims = decode_claims_unverified(relay.token)
    except TokenError as exc:
        # The reason never quotes the token.
        findings.errors.append(f"{label}: {where} is not a tunneld token ({exc}); {issue}")
        return
    if claims.expires_at <= now:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(claims.expires_at))
        findings.warnings.append(
            f"{label}: {where} ({claims.token_id}) expired at {when}; the relay will refuse it "
            "(issue a new one with `tunneld token issue`)"
        )
    allowed = {hostname_key(name) for name in claims.hostnames}
    wanted = set(config.tls.hostnames)
    if allowed != wanted:
        parts = []
        if wanted - allowed:
            parts.append(
                f"it does not allow {', '.join(sorted(wanted - allowed))} "
                "(the relay will refuse the session)"
            )
        if allowed - wanted:
            parts.append(f"it also allows {', '.join(sorted(allowed - wanted))}, not served here")
        findings.warnings.append(
            f"{_label(config.path, 'tls', 'hostnames')}: differ from {where}'s hostnames "
            f"({', '.join(sorted(allowed))}): {'; '.join(parts)}"
        )


def check_config(config: HomeConfig | RelayConfig, *, starting: bool = False) -> Findings:
    """Every check for the config's role (`starting`: only what the process opens)."""
    if isinstance(config, HomeConfig):
        return check_home(config)
    return check_relay(config, starting=starting)
