"""The client CA: issue, list, revoke, and the route context that follows the CRL."""

from __future__ import annotations

import ssl
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from tunneld.config import RouteSection
from tunneld.home.certs.clients import (
    ClientCA,
    ClientCAError,
    RouteContexts,
    client_name,
    is_certificate_failure,
)


def test_issue_writes_a_password_protected_pkcs12_and_revoke_lists_the_serial(
    tmp_path: Path,
) -> None:
    ca = ClientCA(tmp_path)
    p12, entry = ca.issue("phone", "s3cret-pw")
    assert stat.S_IMODE(ca.key_path.stat().st_mode) == 0o600
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates(p12, b"wrong")
    key, cert, extra = pkcs12.load_key_and_certificates(p12, b"s3cret-pw")
    assert key is not None and cert is not None
    assert cert.subject.rfc4514_string() == "CN=phone"
    assert format(cert.serial_number, "x") == entry.serial
    assert [c.subject for c in extra] == [
        x509.load_pem_x509_certificate(ca.ca_path.read_bytes()).subject
    ]
    assert [c.name for c in ca.issued()] == ["phone"]

    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is None
    (revoked,) = ca.revoke("phone")
    assert revoked.revoked_at is not None
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    with pytest.raises(ClientCAError, match="no unrevoked certificate"):
        ca.revoke("phone")


@pytest.mark.parametrize("name", ["", "../x", "a b", "x" * 65])
def test_bad_names_and_short_passwords_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ClientCAError, match="--name"):
        ClientCA(tmp_path).issue(name, "long enough")
    with pytest.raises(ClientCAError, match="password"):
        ClientCA(tmp_path).issue("phone", "abc")


def test_client_name_is_the_common_name() -> None:
    peer = {"subject": ((("organizationName", "x"),), (("commonName", "phone"),))}
    assert client_name(peer) == "phone"
    assert client_name(None) is None and client_name({}) is None
    # Another CA's name goes into a header: nothing that could split or smuggle it.
    evil = {"subject": ((("commonName", "a\r\nX-Admin: 1\u00e9"),),)}
    assert client_name(evil) == "a??X-Admin: 1?"


def _store(tmp_path: Path) -> Any:
    from tunneld.config import DaemonSection, HomeConfig, HomeRelaySection, TlsSection
    from tunneld.home.certs.store import CertificateStore

    config = HomeConfig(
        path=tmp_path / "t.toml",
        relay=HomeRelaySection(url="wss://relay.test/v1/tunnel", token="x"),
        tls=TlsSection(hostnames=("cams.test",)),
        daemon=DaemonSection(state_directory=tmp_path),
    )
    store = CertificateStore(config)
    store.load()
    return store


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> str | None:
    """A real TLS handshake over memory BIOs; None if it succeeded, else the server's error."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client.wrap_bio(c_in, c_out, server_hostname="cams.test")
    done = {"s": False, "c": False}
    for _ in range(20):
        for name, obj in (("c", cli), ("s", srv)):
            if done[name]:
                continue
            try:
                obj.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                if name == "s":
                    return str(exc)
                done[name] = True  # the client's view; the server decides
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done["s"]:
            return None
    raise AssertionError("handshake did not finish")


def _client_context(store: Any, p12: bytes | None, password: bytes) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(store.cert_path))
    if p12 is not None:
        key, cert, extra = pkcs12.load_key_and_certificates(p12, password)
        assert key is not None and cert is not None
        pem = Path(tempfile.mkdtemp()) / "client.pem"
        pem.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        ctx.load_cert_chain(str(pem))
    return ctx


@pytest.mark.parametrize("mode", ["required", "optional"])
def test_route_context_checks_the_certificate_and_follows_revocation(
    tmp_path: Path, mode: str
) -> None:
    store = _store(tmp_path)
    route = RouteSection(hostname="cams.test", upstream="http://a:1", client_certificate=mode)
    contexts = RouteContexts(route, tmp_path)
    contexts.prepare()
    p12, _ = ClientCA(tmp_path).issue("phone", "pw-phone")
    server = contexts.context(store)
    assert contexts.context(store) is server  # cached while nothing changed
    with_cert = _client_context(store, p12, b"pw-phone")
    assert _handshake(server, with_cert) is None
    without = _handshake(server, _client_context(store, None, b""))
    if mode == "required":
        assert without is not None and is_certificate_failure(ssl.SSLError(1, without))
    else:
        assert without is None
    # A certificate from another CA never passes.
    other = ClientCA(tmp_path / "other")
    stranger, _ = other.issue("stranger", "pw-strange")
    refused = _handshake(server, _client_context(store, stranger, b"pw-strange"))
    assert refused is not None and "CERTIFICATE_VERIFY_FAILED" in refused
    # Revoked: the next handshake sees the new CRL.
    ClientCA(tmp_path).revoke("phone")
    server = contexts.context(store)
    refused = _handshake(server, with_cert)
    assert refused is not None and "CERTIFICATE_VERIFY_FAILED" in refused


def test_an_unreadable_ca_fails_closed(tmp_path: Path) -> None:
    store = _store(tmp_path)
    route = RouteSection(hostname="cams.test", upstream="http://a:1", client_certificate="optional")
    contexts = RouteContexts(route, tmp_path)
    contexts.prepare()
    p12, _ = ClientCA(tmp_path).issue("phone", "pw-phone")
    (tmp_path / "clients" / "crl.pem").write_text("garbage\n")
    refused = _handshake(contexts.context(store), _client_context(store, p12, b"pw-phone"))
    assert refused is not None
