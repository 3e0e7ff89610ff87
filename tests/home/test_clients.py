"""The client CA: issue, list, revoke, and the route context that follows the CRL."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12

from tunneld.home.certs.clients import ClientCA, ClientCAError, client_name


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
