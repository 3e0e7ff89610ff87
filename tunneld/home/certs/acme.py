"""The home's ACME manager: the shared client (tunneld/acmeclient.py) bound to the home
config, answering TLS-ALPN-01 through the tunnel (see acmeclient's docstring)."""

from __future__ import annotations

from collections.abc import Callable

from tunneld.acmeclient import (
    ACME_IDENTIFIER_OID,
    READY_WAIT,
    TLSALPN01,
    AcmeSettings,
    Issuer,
    challenge_certificate,
    challenge_context,
    describe_error,
    issue_certificate,
    load_account_key,
    make_csr,
)
from tunneld.acmeclient import AcmeManager as _Manager
from tunneld.config import HomeConfig
from tunneld.home.certs.store import CertificateStore

__all__ = [
    "ACME_IDENTIFIER_OID",
    "TLSALPN01",
    "AcmeManager",
    "AcmeSettings",
    "challenge_certificate",
    "challenge_context",
    "describe_error",
    "issue_certificate",
    "load_account_key",
    "make_csr",
]


class AcmeManager(_Manager):
    """Keeps the home certificate issued and fresh; started with `nursery.start`."""

    def __init__(
        self,
        config: HomeConfig,
        certs: CertificateStore,
        *,
        ready: Callable[[], bool] | None = None,
        ready_wait: float = READY_WAIT,
        issuer: Issuer | None = None,
    ) -> None:
        super().__init__(
            config.acme,
            certs,
            config.tls.hostnames,
            AcmeSettings.from_section(config.acme, config.daemon.state_directory),
            ready=ready,
            ready_wait=ready_wait,
            issuer=issuer,
        )
