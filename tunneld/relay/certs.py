"""The relay's own certificate when `[relay.acme]` manages it.

The files are `[relay] certificate` / `private_key` (by default in the ACME state
directory). Until the first order succeeds the relay serves a self-signed certificate
for its name. The shared ACME manager (tunneld/acmeclient.py) orders and renews;
`activate` hands each new context to the relay, which uses it for new connections
only, so sessions and splices already open are never dropped. Challenges: a TLS
handshake for the relay's own name with ALPN `acme-tls/1` gets the TLS-ALPN-01
certificate (`challenge_context`); `GET /.well-known/acme-challenge/TOKEN` on
`http_listen` gets the HTTP-01 key authorization (`http_answer`).
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from tunneld.acmeclient import ACME_TLS_ALPN, HTTP01_PREFIX, RenewalStatus
from tunneld.config import LETSENCRYPT_TERMS, RelayConfig
from tunneld.hostnames import hostname_key
from tunneld.pki import (
    CertificateInfo,
    PrivateKey,
    certificate_info,
    ensure_self_signed,
    install_pair,
)
from tunneld.wire.clienthello import ClientHello

__all__ = ["LoadedRelayCertificate", "RelayCertificates"]

log = logging.getLogger("tunneld.relay.certs")


@dataclass(frozen=True)
class LoadedRelayCertificate:
    context: ssl.SSLContext
    info: CertificateInfo
    self_signed: bool
    key_kind: str | None


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except Exception:  # noqa: BLE001 - any failure: not self-signed
        return False
    return True


def _key_kind(key: object) -> str | None:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ec256" if key.curve.name == "secp256r1" else None
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa2048" if key.key_size == 2048 else None
    return None


class RelayCertificates:
    """The relay's own certificate under ACME: load, challenges, swap, status."""

    def __init__(
        self,
        config: RelayConfig,
        on_change: Callable[[ssl.SSLContext, CertificateInfo], None] | None = None,
    ) -> None:
        acme = config.relay_acme
        self.cert_path = config.relay.certificate
        self.key_path = config.relay.private_key
        self.hostname = config.relay.hostname
        self.acme = acme
        self.acme_enabled = acme.enabled and acme.agree_tos
        self.acme_waiting_for_consent = acme.enabled and not acme.agree_tos
        self.on_change = on_change
        self.context: ssl.SSLContext | None = None
        self.info: CertificateInfo | None = None
        self.self_signed = False
        self.key_kind: str | None = None
        self.renewal = RenewalStatus(state="idle" if self.acme_enabled else "disabled")
        self._challenges: dict[str, ssl.SSLContext] = {}
        self._http: dict[str, str] = {}

    # -- challenges -------------------------------------------------------------------

    def is_challenge(self, hello: ClientHello) -> bool:
        """A TLS-ALPN-01 validation connection (ALPN `acme-tls/1`)?"""
        return ACME_TLS_ALPN in hello.alpn

    def challenge_context(self, hello: ClientHello) -> ssl.SSLContext | None:
        """The TLS-ALPN-01 context for a handshake offering `acme-tls/1`, if one is pending."""
        if ACME_TLS_ALPN not in hello.alpn:
            return None
        ctx = self._challenges.get(hostname_key(hello.sni or ""))
        if ctx is not None:
            log.info("answering the ACME tls-alpn-01 challenge for %s", hello.sni)
        else:
            log.info("ACME tls-alpn-01 connection for %s, but no order is pending", hello.sni)
        return ctx

    def http_answer(self, target: str) -> str | None:
        """The HTTP-01 key authorization for a request target, if an order awaits it."""
        if not target.startswith(HTTP01_PREFIX):
            return None
        answer = self._http.get(target[len(HTTP01_PREFIX) :])
        if answer is not None:
            log.info("answering the ACME http-01 challenge for %s", self.hostname)
        return answer

    def set_challenges(self, contexts: Mapping[str, ssl.SSLContext]) -> None:
        self._challenges = dict(contexts)

    def set_http_challenges(self, tokens: Mapping[str, str]) -> None:
        self._http = dict(tokens)

    def clear_challenges(self) -> None:
        self._challenges = {}
        self._http = {}

    # -- loading and swapping -------------------------------------------------------------

    def load(self) -> LoadedRelayCertificate:
        """The issued pair if it is usable, else a self-signed one for the relay's name."""
        self.cert_path.parent.mkdir(parents=True, exist_ok=True)
        ensure_self_signed(self.cert_path, self.key_path, [self.hostname])
        loaded = self.read(self.cert_path, self.key_path)
        self._set(loaded)
        return loaded

    @staticmethod
    def read(cert_path: os.PathLike[str], key_path: os.PathLike[str]) -> LoadedRelayCertificate:
        pem = open(cert_path, "rb").read()  # noqa: SIM115 - small, read once
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(os.fspath(cert_path), os.fspath(key_path))
        ctx.set_alpn_protocols(["http/1.1"])
        leaf = x509.load_pem_x509_certificates(pem)[0]
        return LoadedRelayCertificate(
            ctx, certificate_info(pem), _is_self_signed(leaf), _key_kind(leaf.public_key())
        )

    def prepare(self, fullchain_pem: bytes, key: PrivateKey) -> LoadedRelayCertificate:
        """Blocking: check the new pair from scratch files, then move it into place."""
        return install_pair(key, fullchain_pem, self.key_path, self.cert_path, self.read)

    def activate(self, loaded: LoadedRelayCertificate) -> None:
        """New connections to the relay's own name get `loaded` from now on."""
        self._set(loaded)
        log.info(
            "relay certificate for %s from %s, expires %s, sha256 %s",
            ", ".join(loaded.info.sans),
            "self-signed bootstrap" if loaded.self_signed else loaded.info.issuer,
            loaded.info.not_after.isoformat(),
            loaded.info.sha256_colon(),
        )
        if self.on_change is not None:
            self.on_change(loaded.context, loaded.info)

    def _set(self, loaded: LoadedRelayCertificate) -> None:
        self.context = loaded.context
        self.info = loaded.info
        self.self_signed = loaded.self_signed
        self.key_kind = loaded.key_kind

    # -- status -------------------------------------------------------------------------

    def renewal_status(self) -> dict[str, Any]:
        if self.acme_waiting_for_consent:
            return {
                "state": "disabled",
                "reason": (
                    "[relay.acme] agree_tos is false: read the CA's terms (Let's Encrypt: "
                    f"{LETSENCRYPT_TERMS}) and set it to true"
                ),
                "last_error": None,
            }
        r = self.renewal
        iso = "%Y-%m-%dT%H:%M:%SZ"
        return {
            "state": r.state,
            "reason": r.reason,
            "last_error": r.last_error,
            "failures": r.failures,
            "last_success": time.strftime(iso, time.gmtime(r.last_success))
            if r.last_success
            else None,
            "self_signed": self.self_signed,
        }
