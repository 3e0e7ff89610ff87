"""Ed25519 session tokens: key files, issuing, verifying, hostname and version checks.

Token text: ``tunneld1.<b64url(JSON claims)>.<b64url(Ed25519 signature)>``, both parts
base64url without padding; the signature covers the ASCII bytes ``tunneld1.<payload part>``.
Refusals are TokenError with a fixed machine-readable ``reason``; messages never contain
the token text or key bytes, because they are logged and sent back to the daemon.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import secrets
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from tunneld.errors import ConfigError, KeyFileError, TokenError
from tunneld.files import atomic_write, read_key_file
from tunneld.hostnames import normalize_hostname as _normalize_hostname

__all__ = [
    "MAX_TOKEN_BYTES",
    "TOKEN_PREFIX",
    "Claims",
    "check_hostnames",
    "check_version",
    "decode_claims_unverified",
    "generate_keypair",
    "issue_token",
    "load_private_key",
    "load_public_keys",
    "normalize_hostname",
    "normalize_specifier",
    "verify_token",
]

TOKEN_PREFIX = "tunneld1"
# Far above any real token (a few hundred bytes), small enough that a hostile header
# cannot make us decode megabytes of base64/JSON.
MAX_TOKEN_BYTES = 8192
_SIGNATURE_LEN = 64
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_JTI = re.compile(r"[0-9a-f]{16}")
_PEM_PUBLIC = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)


@dataclass(frozen=True)
class Claims:
    """What a verified (or inspected) token says."""

    token_id: str
    subject: str
    hostnames: tuple[str, ...]
    issued_at: int
    expires_at: int
    allow_insecure: tuple[str, ...]


# --- names and specifiers ---------------------------------------------------------------


def normalize_hostname(name: str) -> str:
    """A token's hostname in the shared normal form (see `tunneld.hostnames`);
    ValueError unless a DNS name. Tokens have always taken an IPv4 address (it passed
    the label check), so an address is accepted rather than break a token in use."""
    return _normalize_hostname(name, allow_ip=True)


def normalize_specifier(spec: str) -> str:
    """Canonical text of a PEP 440 specifier set (``" < 0.2 "`` -> ``"<0.2"``).

    Raises ConfigError for an invalid or empty specifier.
    """
    try:
        parsed = SpecifierSet(spec)
    except InvalidSpecifier:
        raise ConfigError(f"{spec!r} is not a valid PEP 440 version specifier") from None
    if not str(parsed):
        raise ConfigError("an empty version specifier would block every version")
    return str(parsed)


# --- key files ----------------------------------------------------------------------------


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    # exclusive: never overwrite; the name appears only with its mode and all its data.
    try:
        atomic_write(path, data, mode=mode, exclusive=True)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key file") from None
    except OSError as exc:
        raise KeyFileError(f"cannot write {path}: {exc.strerror}") from None


def generate_keypair(private_path: Path, public_path: Path) -> None:
    """Write a new Ed25519 key pair: PKCS8 PEM private key (0600), SPKI PEM public key (0644).

    Refuses (KeyFileError) if either file already exists.
    """
    private_path, public_path = Path(private_path), Path(public_path)
    if private_path.resolve() == public_path.resolve():
        raise KeyFileError("the private and public key paths must differ")
    for p in (private_path, public_path):
        if p.exists() or p.is_symlink():
            raise KeyFileError(f"{p} already exists; refusing to overwrite a key file")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new_file(private_path, private_pem, 0o600)
    try:
        _write_new_file(public_path, public_pem, 0o644)
    except KeyFileError:
        private_path.unlink(missing_ok=True)  # no half pair left behind
        raise


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an unencrypted PEM Ed25519 private key (as written by generate_keypair)."""
    data = read_key_file(Path(path), "private key file")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(f"{path} is encrypted; tunneld needs an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        # The library's message is not shown: it could quote file content.
        raise KeyFileError(f"{path} is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a private key, but not an Ed25519 one")
    return key


def load_public_keys(paths: Sequence[Path]) -> tuple[Ed25519PublicKey, ...]:
    """Load every PEM Ed25519 public key from ``paths``; a file may hold several (rotation)."""
    keys: list[Ed25519PublicKey] = []
    for raw_path in paths:
        path = Path(raw_path)
        data = read_key_file(path, "public key file")
        blocks = _PEM_PUBLIC.findall(data)
        if not blocks:
            raise KeyFileError(f"{path} holds no PEM public key (BEGIN PUBLIC KEY)")
        for n, block in enumerate(blocks, 1):
            try:
                key = serialization.load_pem_public_key(block)
            except (ValueError, UnsupportedAlgorithm):
                raise KeyFileError(f"{path}: public key #{n} is not valid PEM") from None
            if not isinstance(key, Ed25519PublicKey):
                raise KeyFileError(f"{path}: public key #{n} is not an Ed25519 key")
            keys.append(key)
    if not keys:
        raise KeyFileError("no token public key file given")
    return tuple(keys)


# --- encoding -----------------------------------------------------------------------------


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(part: str, what: str) -> bytes:
    # Strict alphabet check: the stdlib decoder silently skips stray characters.
    if not _B64URL.fullmatch(part) or len(part) % 4 == 1:
        raise TokenError("bad_token", f"the token's {what} is not base64url")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("bad_token", f"the token's {what} is not base64url") from None


def _split(token: str) -> tuple[str, str, bytes]:
    """-> (signed text, payload part, signature); TokenError("bad_token") if malformed."""
    if not isinstance(token, str):
        raise TokenError("bad_token", "the token is not text")
    token = token.strip()
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenError("bad_token", f"the token is longer than {MAX_TOKEN_BYTES} bytes")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise TokenError(
            "bad_token", f"not a tunneld token (expected {TOKEN_PREFIX}.<claims>.<sig>)"
        )
    signature = _b64decode(parts[2], "signature")
    if len(signature) != _SIGNATURE_LEN:
        raise TokenError("bad_token", "the token's signature has the wrong length")
    return f"{parts[0]}.{parts[1]}", parts[1], signature


def _int_field(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if type(value) is not int or value < 0:  # bool is not an int here
        raise TokenError("bad_token", f"the token's claim {key!r} is not a unix time")
    return value


def _str_list(obj: dict[str, Any], key: str, default: list[str] | None = None) -> list[str]:
    value = obj.get(key, default)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TokenError("bad_token", f"the token's claim {key!r} is not a list of strings")
    return value


def _parse_claims(payload_part: str) -> Claims:
    raw = _b64decode(payload_part, "claims")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise TokenError("bad_token", "the token's claims are not JSON") from None
    if not isinstance(obj, dict):
        raise TokenError("bad_token", "the token's claims are not a JSON object")
    jti, sub = obj.get("jti"), obj.get("sub")
    if not isinstance(jti, str) or not _JTI.fullmatch(jti):
        raise TokenError("bad_token", "the token's id is not 16 hex digits")
    if not isinstance(sub, str):
        raise TokenError("bad_token", "the token's subject is not a string")
    try:
        hostnames = tuple(dict.fromkeys(normalize_hostname(h) for h in _str_list(obj, "hostnames")))
        allow = tuple(normalize_specifier(s) for s in _str_list(obj, "allow_insecure", []))
    except (ValueError, ConfigError) as exc:
        raise TokenError("bad_token", f"the token's claims are invalid: {exc}") from None
    return Claims(
        token_id=jti,
        subject=sub,
        hostnames=hostnames,
        issued_at=_int_field(obj, "iat"),
        expires_at=_int_field(obj, "exp"),
        allow_insecure=allow,
    )


# --- issue / verify -----------------------------------------------------------------------


def issue_token(
    private_key: Ed25519PrivateKey,
    *,
    hostnames: Sequence[str],
    subject: str,
    ttl: float,
    allow_insecure: Sequence[str] = (),
    now: float | None = None,
) -> str:
    """Sign a token for ``subject`` allowing ``hostnames`` for ``ttl`` seconds.

    TokenError("bad_request") for no/invalid hostnames, a non-positive ttl or an invalid
    ``allow_insecure`` specifier.
    """
    if isinstance(hostnames, str):
        raise TokenError("bad_request", "hostnames must be a list, not one string")
    try:
        names = list(dict.fromkeys(normalize_hostname(h) for h in hostnames))
        allow = list(dict.fromkeys(normalize_specifier(s) for s in allow_insecure))
    except (ValueError, ConfigError) as exc:
        raise TokenError("bad_request", str(exc)) from None
    if not names:
        raise TokenError("bad_request", "a token needs at least one hostname")
    if not math.isfinite(ttl) or ttl < 1:
        raise TokenError("bad_request", "the token lifetime must be at least one second")
    issued = time.time() if now is None else now
    claims = {
        "jti": secrets.token_hex(8),
        "sub": subject,
        "hostnames": names,
        "iat": int(issued),
        "exp": int(issued + ttl),
        "allow_insecure": allow,
    }
    payload = _b64encode(json.dumps(claims, separators=(",", ":")).encode("utf-8"))
    signed = f"{TOKEN_PREFIX}.{payload}"
    return f"{signed}.{_b64encode(private_key.sign(signed.encode('ascii')))}"


def decode_claims_unverified(token: str) -> Claims:
    """The claims of ``token`` WITHOUT checking its signature (for `token inspect`)."""
    _, payload_part, _ = _split(token)
    return _parse_claims(payload_part)


def verify_token(
    token: str,
    public_keys: Sequence[Ed25519PublicKey],
    *,
    now: float | None = None,
    revoked: Collection[str] = (),
) -> Claims:
    """Verified claims of ``token``, or TokenError with reason, checked in this order:
    ``bad_token`` (malformed), ``bad_signature`` (no key verifies it), ``expired``, ``revoked``.
    """
    signed, payload_part, signature = _split(token)
    claims = _parse_claims(payload_part)
    if not _signed_by_any(signed.encode("ascii"), signature, public_keys):
        raise TokenError("bad_signature", "the token's signature does not match any relay key")
    at = time.time() if now is None else now
    if claims.expires_at <= at:
        raise TokenError("expired", f"the token {claims.token_id} has expired")
    if claims.token_id in {r.strip().lower() for r in revoked}:
        raise TokenError("revoked", f"the token {claims.token_id} has been revoked")
    return claims


def _signed_by_any(data: bytes, signature: bytes, keys: Sequence[Ed25519PublicKey]) -> bool:
    for key in keys:
        try:
            key.verify(signature, data)
        except InvalidSignature:
            continue
        return True
    return False


# --- authorization ------------------------------------------------------------------------


def check_hostnames(claims: Claims, requested: Sequence[str], relay_hostname: str) -> None:
    """TokenError("hostname_not_allowed") naming the first requested hostname the token does
    not allow. The relay's own hostname is never allowed, whatever the token lists.
    """
    relay = _loose_normalize(relay_hostname)
    allowed = set(claims.hostnames)
    for name in requested:
        host = _loose_normalize(name)
        if host == relay:
            raise TokenError(
                "hostname_not_allowed",
                f"the token does not allow {host}: it is the relay's own hostname",
            )
        if host not in allowed:
            raise TokenError("hostname_not_allowed", f"the token does not allow {host}")


def _loose_normalize(name: str) -> str:
    # Requested names come from the network: compare them normalized when valid, and
    # never let an invalid one match (the claims only hold valid names).
    try:
        return normalize_hostname(name)
    except ValueError:
        return repr(name[:100])  # quoted: it may hold anything a peer sent


def check_version(version: str, blocked_versions: Sequence[str], claims: Claims) -> None:
    """TokenError("version_blocked") if ``version`` matches a blocked specifier that the
    token's ``allow_insecure`` does not carry; TokenError("bad_request") for an invalid
    version. A blocked entry added after the token was issued still blocks.
    """
    try:
        parsed = Version(version)
    except InvalidVersion:
        raise TokenError("bad_request", f"{version[:64]!r} is not a valid version") from None
    waived = set(claims.allow_insecure)
    for entry in blocked_versions:
        spec = normalize_specifier(entry)
        if spec in waived:
            continue
        # prereleases=True: "<0.2" must also block 0.1.5rc1 and 0.1.0.dev3.
        if SpecifierSet(spec).contains(parsed, prereleases=True):
            raise TokenError(
                "version_blocked",
                f"tunneld {parsed} is blocked by the relay ({spec}): update tunneld, or ask "
                "the relay operator for a token issued with --allow-insecure",
            )
