"""X.509 helpers: keys, self-signed and CA-issued certificates, fingerprints.

Used for the home's bootstrap certificate (served until ACME succeeds) and for the
relay's test/demo certificates. Files are replaced atomically so a crash never leaves
a half-written key, and key files are never readable by others, not even briefly.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tunneld.errors import KeyFileError
from tunneld.files import atomic_write, read_key_file
from tunneld.hostnames import hostname_key

__all__ = [
    "install_pair",
    "KEY_KINDS",
    "CertificateInfo",
    "PrivateKey",
    "certificate_info",
    "ensure_self_signed",
    "generate_private_key",
    "issue_certificate",
    "make_ca",
    "read_private_key",
    "self_signed_certificate",
    "write_certificate",
    "write_private_key",
]

T = TypeVar("T")

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
KEY_KINDS = ("ec256", "rsa2048")
# Backdate notBefore a little so a peer whose clock is slightly behind still accepts it.
_BACKDATE = dt.timedelta(hours=1)


def generate_private_key(kind: str = "ec256") -> PrivateKey:
    """A new P-256 ("ec256") or RSA-2048 ("rsa2048") private key."""
    if kind == "ec256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key kind {kind!r}; expected one of {', '.join(KEY_KINDS)}")


# --- files --------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    try:
        atomic_write(path, data, mode=mode)
    except OSError as exc:
        raise KeyFileError(f"cannot write {path}: {exc.strerror}") from None


def write_private_key(key: PrivateKey, path: Path) -> None:
    """Atomically write ``key`` as unencrypted PKCS8 PEM, mode 0600."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _atomic_write(path, pem, 0o600)


def write_certificate(cert_pem: bytes, path: Path) -> None:
    """Atomically write a PEM certificate (chain), mode 0644."""
    _atomic_write(path, cert_pem, 0o644)


def install_pair(
    key: PrivateKey,
    fullchain_pem: bytes,
    key_path: Path,
    cert_path: Path,
    load: Callable[[Path, Path], T],
) -> T:
    """Blocking: write a new key and chain to scratch files beside their targets, check
    them with `load(cert, key)` (what it raises leaves the old pair in place), then move
    them into place, key first: a crash in between leaves a mismatched pair, which
    the certificate stores replace by a bootstrap one and order again. `load`'s result.
    """
    new_key = key_path.with_name(f".{key_path.name}.new")
    new_cert = cert_path.with_name(f".{cert_path.name}.new")
    try:
        write_private_key(key, new_key)
        write_certificate(fullchain_pem, new_cert)
        loaded = load(new_cert, new_key)
        os.replace(new_key, key_path)
        os.replace(new_cert, cert_path)
    finally:
        new_key.unlink(missing_ok=True)
        new_cert.unlink(missing_ok=True)
    return loaded


def read_private_key(path: Path) -> PrivateKey:
    """Load an unencrypted PEM EC or RSA private key (KeyFileError otherwise)."""
    data = read_key_file(Path(path), "private key file")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(f"{path} is encrypted; tunneld needs an unencrypted key") from None
    except ValueError:
        raise KeyFileError(f"{path} is not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise KeyFileError(f"{path} holds a private key that is neither EC nor RSA")
    return key


# --- certificates -------------------------------------------------------------------------


def _general_names(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for text in dict.fromkeys(hostname_key(h) for h in hostnames):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(text)))
        except ValueError:
            names.append(x509.DNSName(text))
    if not names:
        raise ValueError("a certificate needs at least one hostname")
    return names


def _name(common_name: str) -> x509.Name:
    # X.509 caps CN at 64 characters; the SAN carries the real names anyway.
    cn = common_name if 0 < len(common_name) <= 64 else "tunneld"
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _leaf_builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: PrivateKey,
    hostnames: Sequence[str],
    days: int,
    cap: dt.datetime | None = None,
) -> x509.CertificateBuilder:
    if days < 1:
        raise ValueError("a certificate must be valid for at least one day")
    now = dt.datetime.now(dt.UTC)
    public = key.public_key()
    not_after = now + dt.timedelta(days=days)
    if cap is not None and cap < not_after:
        not_after = cap
    usage_encipher = isinstance(key, rsa.RSAPrivateKey)  # RSA key exchange needs it
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(_general_names(hostnames)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=usage_encipher,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )


def self_signed_certificate(
    key: PrivateKey, hostnames: Sequence[str], *, days: int = 90, common_name: str | None = None
) -> bytes:
    """PEM of a self-signed server certificate: SAN = every hostname (IP entries for IPs),
    CN = ``common_name`` or the first hostname, CA=False, serverAuth.
    """
    names = _general_names(hostnames)
    subject = _name(common_name if common_name is not None else str(names[0].value))
    cert = _leaf_builder(subject, subject, key, hostnames, days).sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(common_name: str, *, days: int = 3650) -> tuple[PrivateKey, bytes]:
    """A test/demo CA: (its key, its self-signed PEM certificate with CA=True, keyCertSign)."""
    key = generate_private_key("ec256")
    name = _name(common_name)
    now = dt.datetime.now(dt.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert.public_bytes(serialization.Encoding.PEM)


def issue_certificate(
    ca_key: PrivateKey,
    ca_cert_pem: bytes,
    key: PrivateKey,
    hostnames: Sequence[str],
    *,
    days: int = 90,
) -> bytes:
    """PEM of a server certificate for ``key`` and ``hostnames``, signed by the CA."""
    ca_cert = _load_first(ca_cert_pem)
    subject = _name(str(_general_names(hostnames)[0].value))
    # Never outlive the CA: verifiers reject the chain once the CA has expired anyway.
    builder = _leaf_builder(
        subject, ca_cert.subject, key, hostnames, days, cap=ca_cert.not_valid_after_utc
    )
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    cert = builder.add_extension(aki, critical=False).sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM)


# --- inspection ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CertificateInfo:
    """What `status` and `cert show` print about a certificate."""

    subject: str
    sans: tuple[str, ...]
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime
    sha256: str  # lower-case hex of the DER, no colons

    def sha256_colon(self) -> str:
        """The fingerprint as browsers and `openssl x509 -fingerprint` show it."""
        upper = self.sha256.upper()
        return ":".join(upper[i : i + 2] for i in range(0, len(upper), 2))


def _load_first(pem: bytes) -> x509.Certificate:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise KeyFileError("not a PEM certificate") from None
    return certs[0]


def certificate_info(pem: bytes) -> CertificateInfo:
    """Facts about the first certificate of a PEM chain (KeyFileError if there is none)."""
    cert = _load_first(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = tuple(str(n.value) for n in san if isinstance(n, x509.DNSName | x509.IPAddress))
    except x509.ExtensionNotFound:
        sans = ()
    return CertificateInfo(
        subject=cert.subject.rfc4514_string(),
        sans=sans,
        issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        sha256=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
    )


def ensure_self_signed(cert_path: Path, key_path: Path, hostnames: Sequence[str]) -> None:
    """Keep an existing, unexpired cert+key pair whose SANs are exactly ``hostnames``;
    otherwise write a new key and a self-signed certificate for them.
    """
    wanted = {hostname_key(h) for h in hostnames}
    if not wanted:
        raise ValueError("a certificate needs at least one hostname")
    if _pair_is_usable(Path(cert_path), Path(key_path), wanted):
        return
    key = generate_private_key("ec256")
    # Key first: if we crash in between, the pair mismatches and is replaced next time.
    write_private_key(key, key_path)
    write_certificate(self_signed_certificate(key, hostnames), cert_path)


def _pair_is_usable(cert_path: Path, key_path: Path, wanted: set[str]) -> bool:
    if not cert_path.exists() or not key_path.exists():
        return False
    try:
        cert = _load_first(read_key_file(cert_path, "certificate file"))
        key = read_private_key(key_path)
    except KeyFileError:
        return False  # unreadable or garbage: replaced, as if missing
    info = certificate_info(cert.public_bytes(serialization.Encoding.PEM))
    if {hostname_key(s) for s in info.sans} != wanted:
        return False
    if info.not_after <= dt.datetime.now(dt.UTC):
        return False
    return _spki(key.public_key()) == _spki(cert.public_key())


def _spki(public: CertificatePublicKeyTypes) -> bytes:
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
