"""The home's TLS certificate: configured files, a self-signed bootstrap, or ACME-issued.

`context_for` picks the context for each handshake: ALPN `acme-tls/1` gets the
TLS-ALPN-01 challenge certificate while an order is pending (RFC 8737), everything
else the instance certificate. The ACME manager (home/certs/acme.py) swaps the instance
context with `activate`; new streams pick the new context, open ones keep theirs.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from tunneld.acmeclient import ACME_TLS_ALPN, RenewalStatus
from tunneld.config import LETSENCRYPT_TERMS, HomeConfig
from tunneld.errors import ConfigError, KeyFileError
from tunneld.pki import (
    CertificateInfo,
    PrivateKey,
    certificate_info,
    ensure_self_signed,
    install_pair,
    read_private_key,
)
from tunneld.wire.clienthello import ClientHello

log = logging.getLogger("tunneld.certs")


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    # The proxy speaks HTTP/1.1 upstream; offer nothing it cannot carry.
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def key_kind(key: object) -> str | None:
    """The `[acme] key_type` name ("ec256", "rsa2048") of a key, or None for others."""
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return "ec256" if key.curve.name == "secp256r1" else None
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return "rsa2048" if key.key_size == 2048 else None
    return None


def is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _iso(when: dt.datetime | float | None) -> str | None:
    if when is None:
        return None
    if isinstance(when, float | int):
        when = dt.datetime.fromtimestamp(when, dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def certificate_facts(info: CertificateInfo, self_signed: bool, now: float) -> dict[str, object]:
    """The JSON shape shared by `status` and `cert show`."""
    return {
        "subject": info.subject,
        "sans": list(info.sans),
        "issuer": info.issuer,
        "self_signed": self_signed,
        "not_before": _iso(info.not_before),
        "not_after": _iso(info.not_after),
        "days_left": round((info.not_after.timestamp() - now) / 86400, 1),
        "sha256": info.sha256,
    }


@dataclass(frozen=True)
class LoadedCertificate:
    """A certificate read from disk and its ready-to-use server context."""

    context: ssl.SSLContext
    info: CertificateInfo
    self_signed: bool
    key_kind: str | None


class CertificateStore:
    def __init__(self, config: HomeConfig) -> None:
        tls = config.tls
        if tls.certificate is not None and tls.private_key is not None:
            self.cert_path, self.key_path = tls.certificate, tls.private_key
            self.managed = False
        else:
            state = config.daemon.state_directory
            self.cert_path = state / "certificate.pem"
            self.key_path = state / "private_key.pem"
            self.managed = True
        self.hostnames = tls.hostnames
        # ACME runs only once the CA's terms are agreed to; until then, status says why.
        self.acme_enabled = self.managed and config.acme.enabled and config.acme.agree_tos
        self.acme_waiting_for_consent = (
            self.managed and config.acme.enabled and not config.acme.agree_tos
        )
        self.acme_directory = config.acme.directory
        self.renew_before = config.acme.renew_before
        self.context: ssl.SSLContext | None = None
        self.info: CertificateInfo | None = None
        self.self_signed = False
        self.key_kind: str | None = None
        self.renewal = RenewalStatus(
            state="idle" if self.acme_enabled else "disabled",
            reason=self.consent_warning() if self.acme_waiting_for_consent else None,
        )
        self._challenges: dict[str, ssl.SSLContext] = {}

    def consent_warning(self) -> str:
        return (
            f"ACME is off: [acme] agree_tos is false, so no certificate is ordered from "
            f"{self.acme_directory} and clients see the self-signed one. Read the CA's terms "
            f"(Let's Encrypt: {LETSENCRYPT_TERMS}), then set [acme] agree_tos = true "
            "(or write the config with `tunneld init --agree-tos`) and reload"
        )

    # -- per handshake ----------------------------------------------------------------

    def context_for(self, hello: ClientHello) -> ssl.SSLContext:
        """The context for one handshake: the challenge one for `acme-tls/1`, else ours."""
        assert self.context is not None, "load() first"
        if ACME_TLS_ALPN in hello.alpn:
            challenge = self._challenges.get(hello.sni or "")
            if challenge is not None:
                log.info("answering the ACME tls-alpn-01 challenge for %s", hello.sni)
                return challenge
            log.info("ACME tls-alpn-01 connection for %s, but no order is pending", hello.sni)
        return self.context

    def set_challenges(self, contexts: Mapping[str, ssl.SSLContext]) -> None:
        self._challenges = dict(contexts)

    def clear_challenges(self) -> None:
        self._challenges = {}

    # -- loading and swapping ---------------------------------------------------------

    def load(self) -> None:
        """Load (or first create) the certificate; raises ConfigError with the path."""
        try:
            if self.managed:
                self.cert_path.parent.mkdir(parents=True, exist_ok=True)
                if not self._issued_pair_usable():
                    ensure_self_signed(self.cert_path, self.key_path, self.hostnames)
            loaded = self.read(self.cert_path, self.key_path)
        except (OSError, ssl.SSLError, ValueError, KeyFileError) as exc:
            raise ConfigError(
                f"cannot load the TLS certificate {self.cert_path} / key {self.key_path}: {exc}"
            ) from None
        self.activate(loaded)

    def _issued_pair_usable(self) -> bool:
        """An unexpired CA-issued certificate whose key matches is kept, even when the
        hostnames changed: it still serves the old names while a new order runs.
        (A self-signed pair is ensure_self_signed's business: it follows the names.)
        """
        try:
            cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            key = read_private_key(self.key_path)
        except (OSError, ValueError, KeyFileError):
            return False
        if is_self_signed(cert) or cert.not_valid_after_utc <= dt.datetime.now(dt.UTC):
            return False
        return _spki(key.public_key()) == _spki(cert.public_key())

    @staticmethod
    def read(cert_path: Path, key_path: Path) -> LoadedCertificate:
        """Blocking: build the context and facts for a certificate chain and key on disk."""
        pem = cert_path.read_bytes()
        context = server_context(cert_path, key_path)
        leaf = x509.load_pem_x509_certificates(pem)[0]
        return LoadedCertificate(
            context, certificate_info(pem), is_self_signed(leaf), key_kind(leaf.public_key())
        )

    def prepare(self, fullchain_pem: bytes, key: PrivateKey) -> LoadedCertificate:
        """Blocking (run it in a thread): check the new chain and key by loading them from
        scratch files, then move them into place (key first: a crash in between leaves a
        mismatched pair, which `load` replaces by the bootstrap and the manager reorders).
        """
        return install_pair(key, fullchain_pem, self.key_path, self.cert_path, self.read)

    def activate(self, loaded: LoadedCertificate) -> None:
        """Serve `loaded` to every new stream from now on."""
        self.context = loaded.context
        self.info = loaded.info
        self.self_signed = loaded.self_signed
        self.key_kind = loaded.key_kind
        log.info(
            "certificate for %s from %s, expires %s, sha256 %s",
            ", ".join(loaded.info.sans),
            "self-signed bootstrap" if loaded.self_signed else loaded.info.issuer,
            loaded.info.not_after.isoformat(),
            loaded.info.sha256_colon(),
        )

    # -- status -----------------------------------------------------------------------

    def status(self) -> dict[str, object] | None:
        if self.info is None:
            return None
        out = certificate_facts(self.info, self.self_signed, time.time())
        out["managed"] = "acme" if self.acme_enabled else "bootstrap" if self.managed else "files"
        if self.acme_waiting_for_consent:
            out["renewal"] = {
                "state": "disabled",
                "reason": self.consent_warning(),
                "last_error": None,
            }
        if self.acme_enabled:
            r = self.renewal
            out["renewal"] = {
                "state": r.state,
                "reason": r.reason,
                "last_error": r.last_error,
                "failures": r.failures,
                "last_attempt": _iso(r.last_attempt),
                "last_success": _iso(r.last_success),
                "next_check": _iso(r.next_check),
            }
        return out

    def warnings(self, now: float | None = None) -> list[str]:
        """Loud problems for status: an expired certificate, or one expiring (or still the
        bootstrap) while renewal fails.
        """
        if self.info is None:
            return []
        now = time.time() if now is None else now
        left = self.info.not_after.timestamp() - now
        names = ", ".join(self.info.sans)
        out: list[str] = []
        if self.acme_waiting_for_consent:
            out.append(self.consent_warning())
        if left <= 0:
            out.append(f"the certificate for {names} expired at {_iso(self.info.not_after)}")
        r = self.renewal
        if self.acme_enabled and r.failures > 0:
            when = f"; next attempt at {_iso(r.next_check)}" if r.next_check else ""
            failing = f"renewal is failing ({r.failures} attempts, last: {r.last_error}){when}"
            if self.self_signed:
                out.append(f"no ACME certificate yet, clients see the bootstrap one: {failing}")
            elif left > 0:
                out.append(
                    f"the certificate for {names} expires in {left / 86400:.1f} days "
                    f"({_iso(self.info.not_after)}) and {failing}"
                )
            else:
                out.append(failing)
        elif not self.acme_enabled and 0 < left < self.renew_before:
            out.append(
                f"the certificate for {names} expires in {left / 86400:.1f} days "
                f"({_iso(self.info.not_after)}) and [acme] does not manage it"
            )
        return out


def _spki(public: CertificatePublicKeyTypes) -> bytes:
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
