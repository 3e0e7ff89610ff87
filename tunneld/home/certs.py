"""The home's TLS certificate: configured files, or a self-signed bootstrap.

The ACME manager (certificates issue) swaps `current` when it has a real
certificate; new streams pick the new context, open ones keep theirs.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from tunneld.config import HomeConfig
from tunneld.errors import ConfigError
from tunneld.pki import CertificateInfo, certificate_info, ensure_self_signed
from tunneld.wire.clienthello import ClientHello

log = logging.getLogger("tunneld.certs")


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    # The proxy speaks HTTP/1.1 upstream; offer nothing it cannot carry.
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


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
        self.context: ssl.SSLContext | None = None
        self.info: CertificateInfo | None = None

    def context_for(self, hello: ClientHello) -> ssl.SSLContext:
        """The context for one handshake (the ACME issue adds `acme-tls/1` here)."""
        assert self.context is not None, "load() first"
        return self.context

    def load(self) -> None:
        """Load (or first create) the certificate; raises ConfigError with the path."""
        if self.managed:
            self.cert_path.parent.mkdir(parents=True, exist_ok=True)
            ensure_self_signed(self.cert_path, self.key_path, self.hostnames)
        try:
            self.context = server_context(self.cert_path, self.key_path)
            self.info = certificate_info(self.cert_path.read_bytes())
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError(
                f"cannot load the TLS certificate {self.cert_path} / key {self.key_path}: {exc}"
            ) from None
        log.info(
            "certificate for %s, expires %s, sha256 %s",
            ", ".join(self.info.sans),
            self.info.not_after.isoformat(),
            self.info.sha256_colon(),
        )

    def status(self) -> dict[str, object] | None:
        if self.info is None:
            return None
        return {
            "subject": self.info.subject,
            "sans": list(self.info.sans),
            "issuer": self.info.issuer,
            "not_after": self.info.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "sha256": self.info.sha256,
        }
