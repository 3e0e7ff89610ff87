"""Every spelling of a hostname normalises to the same name in every place that compares
names: config, tokens, ClientHello routing, certificates (pki) and the relay's ACME
challenge lookup. A name must never match in one place and not in another."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.wire.test_clienthello import body, handshake, parse_ok, records, sni_ext
from tunneld import config, tokens
from tunneld.hostnames import hostname_key, normalize_hostname
from tunneld.pki import (
    certificate_info,
    ensure_self_signed,
    generate_private_key,
    self_signed_certificate,
)
from tunneld.wire.clienthello import ClientHello

# (spelling, normal form): each spelling is one of several ways to write the name.
SPELLINGS = [
    ("home.example.com", "home.example.com"),
    ("Home.Example.COM", "home.example.com"),
    ("home.example.com.", "home.example.com"),
    ("HOME.EXAMPLE.COM.", "home.example.com"),
    (" home.example.com ", "home.example.com"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("Bücher.Example.", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("XN--BCHER-KVA.EXAMPLE.", "xn--bcher-kva.example"),
]

ADDRESSES = [("127.0.0.1", "127.0.0.1"), ("::0001", "::1")]

NOT_NAMES = ["", ".", "a..b", "-a.example", "a_b.example", "a" * 64 + ".example", "a.example.."]


@pytest.mark.parametrize(("spelling", "normal"), SPELLINGS)
def test_config_and_tokens_agree(spelling: str, normal: str) -> None:
    assert hostname_key(spelling) == normal
    assert config.normalize_hostname(spelling) == normal
    assert tokens.normalize_hostname(spelling) == normal


@pytest.mark.parametrize(("spelling", "normal"), SPELLINGS)
def test_a_token_for_one_spelling_allows_every_other(spelling: str, normal: str) -> None:
    key = Ed25519PrivateKey.generate()
    token = tokens.issue_token(key, hostnames=[spelling], subject="home", ttl=60)
    claims = tokens.decode_claims_unverified(token)
    assert claims.hostnames == (normal,)
    for other, _ in (s for s in SPELLINGS if s[1] == normal):
        tokens.check_hostnames(claims, [other], "relay.example.net")


@pytest.mark.parametrize(("spelling", "normal"), [s for s in SPELLINGS if s[0].isascii()])
def test_client_hello_sni_routes_like_config(spelling: str, normal: str) -> None:
    # SNI is ASCII on the wire (RFC 6066): the A-label of a Unicode name.
    sni = spelling.strip().encode("ascii")
    hello = parse_ok(records(handshake(body(sni_ext(sni)))))
    assert hello.sni == normal == config.normalize_hostname(spelling)


@pytest.mark.parametrize(("spelling", "normal"), SPELLINGS)
def test_certificate_sans_match_config(spelling: str, normal: str, tmp_path: Path) -> None:
    key = generate_private_key("ec256")
    info = certificate_info(self_signed_certificate(key, [spelling]))
    assert info.sans == (normal,)
    # A pair made for one spelling is kept for another: the same names.
    cert, key_path = tmp_path / "c.pem", tmp_path / "k.pem"
    ensure_self_signed(cert, key_path, [spelling])
    before = cert.read_bytes()
    for other, _ in (s for s in SPELLINGS if s[1] == normal):
        ensure_self_signed(cert, key_path, [other])
    assert cert.read_bytes() == before


@pytest.mark.parametrize(("spelling", "normal"), [s for s in SPELLINGS if s[0].isascii()])
def test_relay_acme_challenge_lookup(spelling: str, normal: str) -> None:
    from tunneld.relay.certs import RelayCertificates

    certs = RelayCertificates.__new__(RelayCertificates)  # only the challenge table is used here
    certs._challenges = {}
    sentinel = object()
    certs.set_challenges({config.normalize_hostname(spelling): sentinel})  # type: ignore[dict-item]
    hello = ClientHello(spelling.strip(), ("acme-tls/1",), 0, (3, 1))
    assert certs.challenge_context(hello) is sentinel


@pytest.mark.parametrize(("address", "normal"), ADDRESSES)
def test_addresses(address: str, normal: str) -> None:
    # One canonical text everywhere; refused where a name is required (config: SNI
    # needs a name), accepted by tokens (they always took IPv4) and certificates (IP SAN).
    assert hostname_key(address) == normal
    with pytest.raises(ValueError, match="an IP address is not a hostname"):
        config.normalize_hostname(address)
    assert tokens.normalize_hostname(address) == normal
    assert normalize_hostname(address, allow_ip=True) == normal
    info = certificate_info(self_signed_certificate(generate_private_key("ec256"), [address]))
    assert info.sans == (normal,)


@pytest.mark.parametrize("text", NOT_NAMES)
def test_not_names_are_refused_everywhere(text: str) -> None:
    with pytest.raises(ValueError, match="not a valid DNS name"):
        config.normalize_hostname(text)
    with pytest.raises(ValueError, match="not a valid DNS name"):
        tokens.normalize_hostname(text)
    with pytest.raises(tokens.TokenError):
        tokens.issue_token(Ed25519PrivateKey.generate(), hostnames=[text], subject="h", ttl=60)


def test_an_invalid_name_from_the_network_matches_nothing() -> None:
    claims = tokens.Claims("0123456789abcdef", "h", ("home.example.com",), 0, 2**40, ())
    with pytest.raises(tokens.TokenError):
        tokens.check_hostnames(claims, ["home.example.com.."], "relay.example.net")
