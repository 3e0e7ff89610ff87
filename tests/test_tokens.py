"""Ed25519 tokens: key files, issue/verify, every refusal reason, hostname and version checks."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tunneld.errors import KeyFileError, TokenError
from tunneld.tokens import (
    Claims,
    check_hostnames,
    check_version,
    decode_claims_unverified,
    generate_keypair,
    issue_token,
    load_private_key,
    load_public_keys,
    verify_token,
)

NOW = 1_700_000_000.0
DAY = 86400.0


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    priv, pub = tmp_path / "token.key", tmp_path / "token.pub"
    generate_keypair(priv, pub)
    return priv, pub


def _issue(priv: Path, **kw: object) -> str:
    args: dict[str, object] = {
        "hostnames": ["home.example.com"],
        "subject": "home",
        "ttl": 30 * DAY,
        "now": NOW,
    }
    args.update(kw)
    return issue_token(load_private_key(priv), **args)  # type: ignore[arg-type]


def _refusal(token: str, pub: Path, **kw: object) -> TokenError:
    with pytest.raises(TokenError) as info:
        verify_token(token, load_public_keys([pub]), **kw)  # type: ignore[arg-type]
    # Error text goes to logs and to the daemon: it must never carry the credential.
    for part in [token, *token.split(".")[1:]]:
        if len(part) > 8:
            assert part not in str(info.value)
    return info.value


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


# --- key files ------------------------------------------------------------------------------


def test_keygen_modes_and_formats(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert b"PRIVATE" not in pub.read_bytes()


def test_keygen_mode_ignores_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        generate_keypair(tmp_path / "k", tmp_path / "k.pub")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600


def test_keygen_refuses_to_overwrite(keys: tuple[Path, Path], tmp_path: Path) -> None:
    priv, pub = keys
    before = priv.read_bytes(), pub.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        generate_keypair(priv, tmp_path / "other.pub")
    with pytest.raises(KeyFileError, match="already exists"):
        generate_keypair(tmp_path / "other.key", pub)
    assert (priv.read_bytes(), pub.read_bytes()) == before
    assert not (tmp_path / "other.key").exists()  # no half pair left behind
    assert not (tmp_path / "other.pub").exists()


def test_load_private_key_errors_are_clear(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        load_private_key(tmp_path / "missing.key")
    garbage = tmp_path / "garbage.key"
    garbage.write_text("hello")
    with pytest.raises(KeyFileError, match="not a PEM private key"):
        load_private_key(garbage)
    with pytest.raises(KeyFileError, match="not a PEM private key"):
        load_private_key(keys[1])  # the public key by mistake


def test_load_private_key_refuses_other_key_types(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    path = tmp_path / "ec.key"
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    with pytest.raises(KeyFileError, match="not an Ed25519") as info:
        load_private_key(path)
    assert "BEGIN" not in str(info.value)


def test_load_public_keys_errors(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    empty = tmp_path / "empty.pub"
    empty.write_text("")
    with pytest.raises(KeyFileError, match="no PEM public key"):
        load_public_keys([empty])
    with pytest.raises(KeyFileError, match="does not exist"):
        load_public_keys([tmp_path / "nope.pub"])
    with pytest.raises(KeyFileError):
        load_public_keys([])


# --- issue / verify -----------------------------------------------------------------------


def test_roundtrip(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    token = _issue(
        priv,
        hostnames=["Home.Example.com.", "ha.mydomain.org", "home.example.com"],
        allow_insecure=[" < 0.2 "],
    )
    assert token.startswith("tunneld1.") and token.count(".") == 2
    claims = verify_token(token, load_public_keys([pub]), now=NOW + 10)
    assert claims == Claims(
        token_id=claims.token_id,
        subject="home",
        hostnames=("home.example.com", "ha.mydomain.org"),
        issued_at=int(NOW),
        expires_at=int(NOW + 30 * DAY),
        allow_insecure=("<0.2",),
    )
    assert len(claims.token_id) == 16 and int(claims.token_id, 16) >= 0
    assert decode_claims_unverified(token) == claims
    # Tokens are unique even with identical claims.
    assert decode_claims_unverified(_issue(priv)).token_id != claims.token_id


def test_claims_json_format(keys: tuple[Path, Path]) -> None:
    token = _issue(keys[0])
    obj = json.loads(_unb64(token.split(".")[1]))
    assert set(obj) == {"jti", "sub", "hostnames", "iat", "exp", "allow_insecure"}
    assert obj["hostnames"] == ["home.example.com"] and obj["allow_insecure"] == []


def test_allow_insecure_is_optional_in_claims(keys: tuple[Path, Path]) -> None:
    """A token whose JSON has no allow_insecure (e.g. another issuer) still verifies."""
    key = load_private_key(keys[0])
    payload = _b64(
        json.dumps(
            {"jti": "0123456789abcdef", "sub": "x", "hostnames": ["a.b"], "iat": 1, "exp": 2**40}
        ).encode()
    )
    token = f"tunneld1.{payload}.{_b64(key.sign(f'tunneld1.{payload}'.encode()))}"
    assert verify_token(token, load_public_keys([keys[1]])).allow_insecure == ()


def test_issue_rejects_bad_input(keys: tuple[Path, Path]) -> None:
    bad_inputs: list[dict[str, object]] = [
        {"hostnames": []},
        {"hostnames": ["not a host"]},
        {"hostnames": "home.example.com"},
        {"ttl": 0},
        {"ttl": float("nan")},
        {"allow_insecure": ["lol<<"]},
    ]
    for kw in bad_inputs:
        with pytest.raises(TokenError) as info:
            _issue(keys[0], **kw)
        assert info.value.reason == "bad_request"


def test_tampered_claims_bad_signature(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    token = _issue(priv)
    prefix, payload, sig = token.split(".")
    claims = json.loads(_unb64(payload))
    claims["hostnames"].append("evil.example.com")
    forged = f"{prefix}.{_b64(json.dumps(claims).encode())}.{sig}"
    assert _refusal(forged, pub).reason == "bad_signature"


def test_resigned_with_another_key_bad_signature(keys: tuple[Path, Path]) -> None:
    token = issue_token(
        Ed25519PrivateKey.generate(), hostnames=["home.example.com"], subject="x", ttl=DAY
    )
    assert _refusal(token, keys[1]).reason == "bad_signature"


def test_flipped_signature_bad_signature(keys: tuple[Path, Path]) -> None:
    token = _issue(keys[0])
    prefix, payload, sig = token.split(".")
    raw = bytearray(_unb64(sig))
    raw[0] ^= 1
    assert _refusal(f"{prefix}.{payload}.{_b64(bytes(raw))}", keys[1]).reason == "bad_signature"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[: len(t) // 2],  # truncated in the payload
        lambda t: t[:-10],  # truncated signature
        lambda t: t.replace("tunneld1.", "tunneld2."),
        lambda t: t + ".extra",
        lambda t: t.replace(".", "", 1),
        lambda t: "tunneld1.!!!!." + t.split(".")[2],
        lambda t: "tunneld1." + _b64(b"[1,2]") + "." + t.split(".")[2],
        lambda t: "tunneld1." + _b64(b"\xff\xfe") + "." + t.split(".")[2],
        lambda t: "",
        lambda t: "tunneld1." + "A" * 9000 + "." + t.split(".")[2],
    ],
)
def test_malformed_bad_token(keys: tuple[Path, Path], mangle: object) -> None:
    token = mangle(_issue(keys[0]))  # type: ignore[operator]
    assert _refusal(token, keys[1]).reason == "bad_token"
    with pytest.raises(TokenError) as info:
        decode_claims_unverified(token)
    assert info.value.reason == "bad_token"


def test_malformed_claims_bad_token(keys: tuple[Path, Path]) -> None:
    key = load_private_key(keys[0])
    good = {"jti": "0123456789abcdef", "sub": "x", "hostnames": ["a.b"], "iat": 1, "exp": 2**40}
    for bad in (
        {"jti": "short"},
        {"jti": None},
        {"hostnames": "a.b"},
        {"hostnames": ["no spaces allowed"]},
        {"exp": "tomorrow"},
        {"exp": True},
        {"allow_insecure": ["<<nope"]},
    ):
        payload = _b64(json.dumps({**good, **bad}).encode())
        # Signed with the right key: only the claims themselves are wrong.
        token = f"tunneld1.{payload}.{_b64(key.sign(f'tunneld1.{payload}'.encode()))}"
        assert _refusal(token, keys[1]).reason == "bad_token", bad


def test_expired(keys: tuple[Path, Path]) -> None:
    token = _issue(keys[0], ttl=DAY)
    assert verify_token(token, load_public_keys([keys[1]]), now=NOW + DAY - 1)
    error = _refusal(token, keys[1], now=NOW + DAY)
    assert error.reason == "expired"


def test_signature_checked_before_expiry(keys: tuple[Path, Path]) -> None:
    token = issue_token(
        Ed25519PrivateKey.generate(), hostnames=["a.b"], subject="x", ttl=1, now=NOW
    )
    assert _refusal(token, keys[1], now=NOW + DAY).reason == "bad_signature"


def test_revoked(keys: tuple[Path, Path]) -> None:
    token = _issue(keys[0])
    jti = decode_claims_unverified(token).token_id
    pubs = load_public_keys([keys[1]])
    assert verify_token(token, pubs, now=NOW, revoked={"ffffffffffffffff"})
    assert _refusal(token, keys[1], now=NOW, revoked=[jti]).reason == "revoked"
    assert _refusal(token, keys[1], now=NOW, revoked=[jti.upper()]).reason == "revoked"
    # Expiry is reported before revocation.
    assert _refusal(token, keys[1], now=NOW + 365 * DAY, revoked=[jti]).reason == "expired"


def test_rotation_several_keys_in_files(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    old_priv, old_pub = keys
    new_priv, new_pub = tmp_path / "new.key", tmp_path / "new.pub"
    generate_keypair(new_priv, new_pub)
    both = tmp_path / "both.pub"
    both.write_bytes(old_pub.read_bytes() + b"\n# comment between keys\n" + new_pub.read_bytes())
    assert len(load_public_keys([both])) == 2
    for priv in (old_priv, new_priv):
        token = _issue(priv)
        assert verify_token(token, load_public_keys([both]), now=NOW).subject == "home"
        assert verify_token(token, load_public_keys([old_pub, new_pub]), now=NOW)
    # After rotation the old key is dropped: its tokens stop working.
    assert _refusal(_issue(old_priv), new_pub, now=NOW).reason == "bad_signature"


def test_load_public_keys_rejects_non_ed25519(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    path = tmp_path / "ec.pub"
    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(KeyFileError, match="not an Ed25519"):
        load_public_keys([path])


# --- hostnames --------------------------------------------------------------------------------


def _claims(**kw: object) -> Claims:
    base: dict[str, object] = {
        "token_id": "0123456789abcdef",
        "subject": "home",
        "hostnames": ("home.example.com", "ha.mydomain.org"),
        "issued_at": 0,
        "expires_at": 2**40,
        "allow_insecure": (),
    }
    base.update(kw)
    return Claims(**base)  # type: ignore[arg-type]


def test_hostnames_allowed() -> None:
    check_hostnames(_claims(), ["home.example.com"], "relay.example.com")
    check_hostnames(_claims(), ["HA.MyDomain.org.", "home.example.com"], "relay.example.com")


def test_hostname_not_allowed_names_the_first_bad_one() -> None:
    with pytest.raises(TokenError) as info:
        check_hostnames(
            _claims(),
            ["home.example.com", "home2.example.com", "home3.example.com"],
            "relay.example.com",
        )
    assert info.value.reason == "hostname_not_allowed"
    assert str(info.value) == "the token does not allow home2.example.com"


def test_relay_hostname_never_allowed() -> None:
    claims = _claims(hostnames=("home.example.com", "relay.example.com"))
    with pytest.raises(TokenError) as info:
        check_hostnames(claims, ["Relay.Example.com."], "relay.example.com")
    assert info.value.reason == "hostname_not_allowed"
    assert "relay.example.com" in str(info.value)


def test_invalid_requested_hostname_is_refused_quoted() -> None:
    with pytest.raises(TokenError) as info:
        check_hostnames(_claims(), ["home.example.com\r\nX: y"], "relay.example.com")
    assert info.value.reason == "hostname_not_allowed"
    assert "\r\n" not in str(info.value)


# --- versions -----------------------------------------------------------------------------------


def test_version_not_blocked() -> None:
    check_version("0.3.0", ["<0.2", "==0.2.5"], _claims())
    check_version("0.1.0", [], _claims())


def test_version_blocked_message() -> None:
    with pytest.raises(TokenError) as info:
        check_version("0.1.0", ["==0.2.5", "<0.2"], _claims())
    assert info.value.reason == "version_blocked"
    assert str(info.value).startswith("tunneld 0.1.0 is blocked by the relay (<0.2): update")


def test_prereleases_are_blocked_too() -> None:
    for version in ("0.1.5rc1", "0.1.0.dev3"):
        with pytest.raises(TokenError):
            check_version(version, ["<0.2"], _claims())


def test_allow_insecure_waives_only_its_entries() -> None:
    # Issued while the relay blocked "<0.2" only; normalized comparison ignores spacing.
    claims = _claims(allow_insecure=("<0.2",))
    check_version("0.1.0", [" < 0.2"], claims)
    # The operator later blocks 0.1.x specifically: the old waiver does not cover it.
    with pytest.raises(TokenError) as info:
        check_version("0.1.0", ["<0.2", "~=0.1.0"], claims)
    assert info.value.reason == "version_blocked"
    assert "~=0.1.0" in str(info.value)


def test_invalid_version_bad_request() -> None:
    with pytest.raises(TokenError) as info:
        check_version("not-a-version", ["<0.2"], _claims())
    assert info.value.reason == "bad_request"
