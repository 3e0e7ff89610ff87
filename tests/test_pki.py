"""X.509 helpers: SANs, fingerprints against openssl, real TLS handshakes, atomic key files."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tunneld.errors import KeyFileError
from tunneld.pki import (
    certificate_info,
    ensure_self_signed,
    generate_private_key,
    issue_certificate,
    make_ca,
    read_private_key,
    self_signed_certificate,
    write_certificate,
    write_private_key,
)

HOSTS = ["home.example.com", "ha.mydomain.org", "192.0.2.7", "::1"]


def _handshake(server_cert: Path, server_key: Path, trust_pem: bytes, server_hostname: str) -> None:
    """A real TLS handshake in memory; raises ssl.SSLCertVerificationError on a bad cert."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server_cert, server_key)
    client_ctx = ssl.create_default_context(cadata=trust_pem.decode())
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):  # a TLS 1.3 handshake needs 2-3 flights
        for name, obj in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values()), "handshake did not finish"
    client.write(b"ping")
    s_in.write(c_out.read())
    assert server.read(4) == b"ping"


def test_self_signed_sans_cn_and_constraints() -> None:
    key = generate_private_key()
    pem = self_signed_certificate(key, ["Home.Example.com.", *HOSTS[1:]], days=30)
    info = certificate_info(pem)
    assert info.sans == tuple(HOSTS)
    assert info.subject == "CN=home.example.com" and info.issuer == info.subject
    assert dt.timedelta(days=29) < info.not_after - dt.datetime.now(dt.UTC) <= dt.timedelta(days=30)
    cert = x509.load_pem_x509_certificate(pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["home.example.com", "ha.mydomain.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.7", "::1"]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert certificate_info(self_signed_certificate(key, HOSTS, common_name="x")).subject == "CN=x"


def test_key_kinds() -> None:
    assert isinstance(generate_private_key("ec256"), ec.EllipticCurvePrivateKey)
    rsa_key = generate_private_key("rsa2048")
    assert isinstance(rsa_key, rsa.RSAPrivateKey) and rsa_key.key_size == 2048
    assert certificate_info(self_signed_certificate(rsa_key, ["a.example"])).sans == ("a.example",)
    with pytest.raises(ValueError, match="ec256"):
        generate_private_key("dsa")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl binary")
def test_fingerprint_matches_openssl(tmp_path: Path) -> None:
    key = generate_private_key()
    pem = self_signed_certificate(key, ["home.example.com"])
    # A chain: the first certificate is the one described.
    chain = pem + make_ca("Other CA")[1]
    path = tmp_path / "cert.pem"
    path.write_bytes(chain)
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout.strip()
    info = certificate_info(chain)
    assert out.split("=", 1)[1] == info.sha256_colon()
    assert info.sha256 == info.sha256_colon().replace(":", "").lower()
    assert len(info.sha256) == 64


def test_ca_issued_leaf_verifies_in_tls_handshake(tmp_path: Path) -> None:
    ca_key, ca_pem = make_ca("tunneld test CA")
    ca_info = certificate_info(ca_pem)
    leaf_key = generate_private_key()
    leaf_pem = issue_certificate(ca_key, ca_pem, leaf_key, ["home.example.com", "127.0.0.1"])
    leaf_info = certificate_info(leaf_pem)
    assert leaf_info.issuer == ca_info.subject == "CN=tunneld test CA"
    assert leaf_info.sans == ("home.example.com", "127.0.0.1")
    cert_path, key_path = tmp_path / "leaf.pem", tmp_path / "leaf.key"
    write_certificate(leaf_pem, cert_path)
    write_private_key(leaf_key, key_path)
    _handshake(cert_path, key_path, ca_pem, "home.example.com")
    _handshake(cert_path, key_path, ca_pem, "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(cert_path, key_path, ca_pem, "other.example.com")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(cert_path, key_path, make_ca("another CA")[1], "home.example.com")


def test_leaf_never_outlives_its_ca() -> None:
    ca_key, ca_pem = make_ca("short CA", days=10)
    leaf = issue_certificate(ca_key, ca_pem, generate_private_key(), ["a.example"], days=90)
    assert certificate_info(leaf).not_after <= certificate_info(ca_pem).not_after


def test_self_signed_pinned_handshake(tmp_path: Path) -> None:
    """The bootstrap certificate works for a client that trusts exactly it."""
    cert_path, key_path = tmp_path / "c.pem", tmp_path / "c.key"
    ensure_self_signed(cert_path, key_path, ["home.example.com"])
    _handshake(cert_path, key_path, cert_path.read_bytes(), "home.example.com")


def test_write_private_key_mode_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "tls.key"
    path.write_text("old")
    os.chmod(path, 0o644)
    old = os.umask(0)
    try:
        key = generate_private_key()
        write_private_key(key, path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = read_private_key(path)
    assert loaded.private_numbers() == key.private_numbers()  # type: ignore[comparison-overlap]
    assert [p.name for p in tmp_path.iterdir()] == ["tls.key"]  # no temp files left
    write_certificate(self_signed_certificate(key, ["a.example"]), tmp_path / "c.pem")
    assert stat.S_IMODE((tmp_path / "c.pem").stat().st_mode) == 0o644


def test_write_into_missing_dir_is_clear(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot write"):
        write_private_key(generate_private_key(), tmp_path / "nope" / "k.pem")


def test_certificate_info_rejects_garbage() -> None:
    with pytest.raises(KeyFileError):
        certificate_info(b"not a certificate")


def test_ensure_self_signed_creates_keeps_and_replaces(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    ensure_self_signed(cert, key, ["home.example.com", "ha.mydomain.org"])
    first = certificate_info(cert.read_bytes())
    first_key = key.read_bytes()
    assert first.sans == ("home.example.com", "ha.mydomain.org")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600

    # Same names (other order, other case): the pair is kept as is.
    ensure_self_signed(cert, key, ["HA.mydomain.org", "home.example.com."])
    assert certificate_info(cert.read_bytes()).sha256 == first.sha256
    assert key.read_bytes() == first_key

    # A hostname added: new certificate covering it.
    ensure_self_signed(cert, key, ["home.example.com", "ha.mydomain.org", "new.example.org"])
    second = certificate_info(cert.read_bytes())
    assert second.sha256 != first.sha256
    assert set(second.sans) == {"home.example.com", "ha.mydomain.org", "new.example.org"}
    _handshake(cert, key, cert.read_bytes(), "new.example.org")  # key matches the cert


def test_ensure_self_signed_replaces_mismatched_or_broken_pair(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    ensure_self_signed(cert, key, ["home.example.com"])
    # A key that does not belong to the certificate (e.g. a crash between the writes).
    write_private_key(generate_private_key(), key)
    before = certificate_info(cert.read_bytes()).sha256
    ensure_self_signed(cert, key, ["home.example.com"])
    assert certificate_info(cert.read_bytes()).sha256 != before
    _handshake(cert, key, cert.read_bytes(), "home.example.com")

    cert.write_text("garbage")
    ensure_self_signed(cert, key, ["home.example.com"])
    assert certificate_info(cert.read_bytes()).sans == ("home.example.com",)

    key.unlink()
    ensure_self_signed(cert, key, ["home.example.com"])
    _handshake(cert, key, cert.read_bytes(), "home.example.com")
