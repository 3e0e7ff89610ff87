"""Client certificates: the daemon's small private CA, `tunneld client issue|list|revoke`,
and the TLS context of a route that asks for a certificate.

The CA lives in `<state_directory>/clients/`: `ca.pem`, `ca.key` (0600), `crl.pem`
(the revocation list, always present once the CA exists, re-signed on every revoke)
and `issued.json` (name, serial, validity, revoked_at per certificate). A route with
`client_certificate` set and no `client_ca` trusts this CA and checks the CRL on
every handshake: `RouteContexts` rebuilds the route's context when `crl.pem` changes,
so a revoke takes effect on the next handshake without a restart. Route contexts
send no session tickets, so a revoked client cannot resume an older session.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tunneld.config import RouteSection
from tunneld.errors import ConfigError, TunneldError
from tunneld.home.certs.store import CertificateStore
from tunneld.pki import (
    PrivateKey,
    generate_private_key,
    make_ca,
    read_private_key,
    write_certificate,
    write_private_key,
)

__all__ = ["ClientCA", "IssuedClient", "RouteContexts", "client_name"]

log = logging.getLogger("tunneld.clients")

CLIENTS_DIR = "clients"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Handshake failures that mean "no valid client certificate" (OpenSSL reason names).
CERTIFICATE_FAILURES = (
    "PEER_DID_NOT_RETURN_A_CERTIFICATE",
    "CERTIFICATE_VERIFY_FAILED",
    "CERTIFICATE_REQUIRED",
    "NO_CERTIFICATE_RETURNED",
)


class ClientCAError(TunneldError):
    """A client-certificate command could not do its work (message names the file)."""


@dataclass(frozen=True)
class IssuedClient:
    name: str
    serial: str  # hex
    not_after: str  # ISO 8601 UTC
    revoked_at: str | None = None

    def json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "serial": self.serial,
            "not_after": self.not_after,
            "revoked_at": self.revoked_at,
        }


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ClientCA:
    """The daemon's own client CA in `<state_directory>/clients/`."""

    def __init__(self, state_directory: Path) -> None:
        self.directory = state_directory / CLIENTS_DIR
        self.ca_path = self.directory / "ca.pem"
        self.key_path = self.directory / "ca.key"
        self.crl_path = self.directory / "crl.pem"
        self.index_path = self.directory / "issued.json"

    def exists(self) -> bool:
        return self.ca_path.exists() and self.key_path.exists() and self.crl_path.exists()

    def ensure(self) -> None:
        """Create the CA (and an empty CRL) on first use."""
        if self.exists():
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        except OSError as exc:
            raise ClientCAError(f"cannot create {self.directory}: {exc.strerror}") from None
        key, pem = make_ca("tunneld client CA")
        write_private_key(key, self.key_path)
        write_certificate(pem, self.ca_path)
        self._write_index([])
        self._write_crl(key, x509.load_pem_x509_certificate(pem), [])
        log.info("created the client CA in %s", self.directory)

    # -- issued.json ------------------------------------------------------------
    def issued(self) -> list[IssuedClient]:
        try:
            raw = json.loads(self.index_path.read_text(encoding="utf-8"))
            return [IssuedClient(**entry) for entry in raw["clients"]]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ClientCAError(f"{self.index_path}: unreadable ({exc})") from None

    def _write_index(self, clients: list[IssuedClient]) -> None:
        data = json.dumps({"clients": [c.json() for c in clients]}, indent=2).encode() + b"\n"
        write_certificate(data, self.index_path)  # atomic, 0644: no secrets in it

    def _load(self) -> tuple[PrivateKey, x509.Certificate]:
        try:
            key = read_private_key(self.key_path)
            cert = x509.load_pem_x509_certificate(self.ca_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ClientCAError(f"cannot read the client CA in {self.directory}: {exc}") from None
        return key, cert

    # -- commands ---------------------------------------------------------------
    def issue(self, name: str, password: str, *, days: int = 825) -> tuple[bytes, IssuedClient]:
        """A new client certificate for `name`: (PKCS#12 bytes protected by `password`, entry)."""
        if not NAME.fullmatch(name):
            raise ClientCAError(
                f"--name: expected letters, digits, '.', '_' or '-' (up to 64), got {name!r}"
            )
        if len(password) < 4:
            raise ClientCAError("the password must have at least 4 characters")
        self.ensure()
        ca_key, ca_cert = self._load()
        key = generate_private_key("ec256")
        now = dt.datetime.now(dt.UTC)
        not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        # SHA1/3DES PBE: the one PKCS#12 encryption every phone's importer accepts
        # (older Android and iOS refuse AES-encrypted files).
        encryption = (
            serialization.PrivateFormat.PKCS12.encryption_builder()
            .kdf_rounds(50000)
            .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
            .hmac_hash(hashes.SHA1())
            .build(password.encode())
        )
        p12 = pkcs12.serialize_key_and_certificates(name.encode(), key, cert, [ca_cert], encryption)
        entry = IssuedClient(name, format(cert.serial_number, "x"), _iso(not_after))
        self._write_index([*self.issued(), entry])
        return p12, entry

    def revoke(self, name: str) -> list[IssuedClient]:
        """Revoke every unrevoked certificate issued to `name`; returns them."""
        if not self.exists():
            raise ClientCAError(f"no client CA in {self.directory}: nothing was issued")
        clients = self.issued()
        now = _iso(dt.datetime.now(dt.UTC))
        hit = [c for c in clients if c.name == name and c.revoked_at is None]
        if not hit:
            raise ClientCAError(f"no unrevoked certificate named {name!r}")
        updated = [
            IssuedClient(c.name, c.serial, c.not_after, now) if c in hit else c for c in clients
        ]
        ca_key, ca_cert = self._load()
        self._write_crl(ca_key, ca_cert, [int(c.serial, 16) for c in updated if c.revoked_at])
        self._write_index(updated)
        return [IssuedClient(c.name, c.serial, c.not_after, now) for c in hit]

    def _write_crl(self, key: PrivateKey, ca: x509.Certificate, serials: list[int]) -> None:
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=3650))
        )
        for serial in serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(now - dt.timedelta(seconds=1))
                .build()
            )
        crl = builder.sign(key, hashes.SHA256())
        write_certificate(crl.public_bytes(serialization.Encoding.PEM), self.crl_path)


def _mtime(path: Path) -> tuple[int, int, int]:
    """Changes whenever the file is replaced (atomic writes make a new inode)."""
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, 0)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class RouteContexts:
    """Per route with a client certificate: its SSL context, rebuilt when the instance
    certificate is swapped (ACME) or the CA / CRL files change."""

    def __init__(self, route: RouteSection, state_directory: Path) -> None:
        self.route = route
        self.own_ca = route.client_ca is None
        self.ca = ClientCA(state_directory)
        self.ca_path = self.ca.ca_path if route.client_ca is None else route.client_ca
        self._base: ssl.SSLContext | None = None  # the instance context it was built on
        self._mtimes: tuple[tuple[int, int, int], ...] | None = None
        self._context: ssl.SSLContext | None = None

    def prepare(self) -> None:
        """At start: the own CA exists (created on first use) and its files load."""
        if self.own_ca:
            try:
                self.ca.ensure()
            except (ClientCAError, OSError) as exc:
                raise ConfigError(f"client CA for {self.route.hostname}: {exc}") from None

    def context(self, certs: CertificateStore) -> ssl.SSLContext:
        crl = self.ca.crl_path if self.own_ca else None
        mtimes = (_mtime(self.ca_path), _mtime(crl) if crl else (0, 0, 0))
        if self._context is None or self._base is not certs.context or mtimes != self._mtimes:
            self._context = self._build(certs, crl)
            self._base, self._mtimes = certs.context, mtimes
        return self._context

    def _build(self, certs: CertificateStore, crl: Path | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(certs.cert_path), str(certs.key_path))
        ctx.set_alpn_protocols(["http/1.1"])
        required = self.route.client_certificate == "required"
        ctx.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
        ctx.num_tickets = 0  # no resumption past a revoke
        try:
            ctx.load_verify_locations(cafile=str(self.ca_path))
            if crl is not None:
                ctx.load_verify_locations(cafile=str(crl))
        except (OSError, ssl.SSLError) as exc:
            # Fail closed: with no CA (or no CRL) loaded, no client certificate verifies.
            log.error(
                "route %s: cannot load the client CA %s or its CRL (%s); "
                "every client certificate is refused until it is fixed",
                self.route.hostname,
                self.ca_path,
                exc,
            )
        if crl is not None:
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        return ctx


def client_name(peer: dict[str, Any] | None) -> str | None:
    """The verified client's name: its certificate's common name, printable ASCII only
    (a CN from another CA may hold anything; it goes into a header)."""
    if not peer:
        return None
    for rdn in peer.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return "".join(c if " " <= c <= "~" else "?" for c in str(value))
    return None


def is_certificate_failure(exc: BaseException) -> bool:
    """A handshake that failed for want of a valid client certificate."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            text = f"{getattr(seen, 'reason', None) or ''} {seen}".upper()
            if any(r in text for r in CERTIFICATE_FAILURES):
                return True
        seen = seen.__cause__ or seen.__context__
    return False


# -- `tunneld client issue|list|revoke` ------------------------------------------------


def _password(password_file: Path | None) -> str:
    if password_file is not None:
        try:
            text = password_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ClientCAError(
                f"--password-file: cannot read {password_file}: {exc.strerror}"
            ) from None
        return text[0] if text else ""
    import getpass
    import sys

    if not sys.stdin.isatty():
        raise ClientCAError("give --password-file, or run in a terminal to be asked")
    first = getpass.getpass("password for the PKCS#12 file: ")
    if getpass.getpass("again: ") != first:
        raise ClientCAError("the passwords differ")
    return first


def client_command(
    config_path: str,
    action: str,
    *,
    name: str | None = None,
    out: Path | None = None,
    password_file: Path | None = None,
    days: int = 825,
    force: bool = False,
    as_json: bool = False,
) -> int:
    from tunneld.config import load_home_config

    config = load_home_config(config_path)
    ca = ClientCA(config.daemon.state_directory)
    if action == "list":
        clients = ca.issued()
        if as_json:
            print(json.dumps({"clients": [c.json() for c in clients]}, indent=2))
        elif not clients:
            print("no client certificates issued")
        else:
            for c in clients:
                state = f"revoked {c.revoked_at}" if c.revoked_at else f"valid until {c.not_after}"
                print(f"{c.name}  serial {c.serial}  {state}")
        return 0
    assert name is not None
    if action == "revoke":
        revoked = ca.revoke(name)
        for c in revoked:
            print(f"revoked {c.name} (serial {c.serial}); refused from the next handshake")
        return 0
    target = out if out is not None else Path(f"{name}.p12")
    if target.exists() and not force:
        raise ClientCAError(f"{target} exists; give --force to overwrite it")
    password = _password(password_file)
    p12, entry = ca.issue(name, password, days=days)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(p12)
        os.chmod(target, 0o600)
    except OSError as exc:
        raise ClientCAError(f"cannot write {target}: {exc.strerror}") from None
    print(
        f"wrote {target} for {entry.name} (serial {entry.serial}, valid until "
        f"{entry.not_after}); import it on the device with its password. "
        f"CA: {ca.ca_path}"
    )
    return 0
