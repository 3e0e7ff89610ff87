"""Certificates: `store` (the instance certificate and the context per handshake),
`acme` (RFC 8555 orders answered through the tunnel)."""

from tunneld.home.certs.store import CertificateStore

__all__ = ["CertificateStore"]
