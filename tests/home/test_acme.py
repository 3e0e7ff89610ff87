"""The certificate store and the ACME manager, without a CA: challenge certificates,
handshakes picking them by ALPN, the order/renew decisions, retries, swaps and status.
(tests/integration/test_acme.py runs the real thing against Pebble.)
"""

from __future__ import annotations

import hashlib
import json
import ssl
import stat
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import requests
import tomli_w
import trio
from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from josepy.jwk import JWKEC

from tunneld.cli import _format_status, main
from tunneld.config import HomeConfig, load_home_config
from tunneld.errors import ConfigError
from tunneld.home.certs.acme import (
    ACME_IDENTIFIER_OID,
    TLSALPN01,
    AcmeManager,
    challenge_certificate,
    challenge_context,
    describe_error,
    load_account_key,
    make_csr,
)
from tunneld.home.certs.store import ACME_TLS_ALPN, CertificateStore
from tunneld.pki import PrivateKey, generate_private_key, issue_certificate, make_ca
from tunneld.wire.clienthello import ClientHello, parse_client_hello

HOST = "home.example.com"
KEY_AUTH = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA.9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"


def home_config(tmp_path: Path, acme: Mapping[str, object] = {}, **tls: object) -> HomeConfig:
    path = tmp_path / "tunneld.toml"
    path.write_text(
        tomli_w.dumps(
            {
                "relay": {"url": "wss://relay.example.com/v1/tunnel", "token": "t0ken"},
                "tls": {"hostnames": [HOST], **tls},
                "acme": {"directory": "https://127.0.0.1:1/dir", "agree_tos": True, **acme},
                "daemon": {"state_directory": str(tmp_path / "state")},
            }
        )
    )
    return load_home_config(path)


def loaded_store(config: HomeConfig) -> CertificateStore:
    store = CertificateStore(config)
    store.load()
    return store


_CA = make_ca("test ACME CA")


def ca_issued(
    hostnames: Sequence[str], kind: str = "ec256", days: int = 90
) -> tuple[bytes, PrivateKey]:
    key = generate_private_key(kind)
    return issue_certificate(_CA[0], _CA[1], key, hostnames, days=days) + _CA[1], key


def install(store: CertificateStore, hostnames: Sequence[str], days: int = 90) -> None:
    pem, key = ca_issued(hostnames, days=days)
    store.activate(store.prepare(pem, key))


# --- handshakes in memory ---------------------------------------------------------------


def handshake(
    store: CertificateStore, sni: str, alpn: list[str]
) -> tuple[x509.Certificate, str | None]:
    """Client hello -> `context_for` (as the stream handler does) -> full handshake.
    Returns the certificate the client saw and the negotiated ALPN protocol.
    """
    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    client_ctx.set_alpn_protocols(alpn)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    first = c_out.read()
    hello = parse_client_hello(first)
    assert isinstance(hello, ClientHello)
    server = store.context_for(hello).wrap_bio(s_in, s_out, server_side=True)
    s_in.write(first)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, obj in (("server", server), ("client", client)):
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
    der = client.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der), client.selected_alpn_protocol()


def test_challenge_certificate_follows_rfc_8737() -> None:
    key, pem = challenge_certificate(HOST, KEY_AUTH)
    cert = x509.load_pem_x509_certificate(pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [HOST]
    ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert ext.critical
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    # DER OCTET STRING (tag 4, length 32) of SHA-256 over the key authorization.
    assert ext.value.value == b"\x04\x20" + hashlib.sha256(KEY_AUTH.encode()).digest()
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()


def test_tls_alpn_01_challenge_parsed_and_answered() -> None:
    account = JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    body = messages.ChallengeBody.from_json(
        {
            "type": "tls-alpn-01",
            "url": "https://ca.example/chall/1",
            "status": "pending",
            "token": "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA",
        }
    )
    chall = body.chall
    assert isinstance(chall, TLSALPN01)
    key_auth = chall.key_authorization(account)
    assert key_auth.startswith("evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA.")
    assert chall.validation(account) == hashlib.sha256(key_auth.encode()).digest()
    # RFC 8555 section 7.5.1: the answer is an empty object.
    assert chall.response(account).to_partial_json() == {}


def test_acme_tls_alpn_gets_the_challenge_certificate_only_while_pending(
    tmp_path: Path,
) -> None:
    store = loaded_store(home_config(tmp_path))
    bootstrap = store.info
    assert bootstrap is not None and store.self_signed

    cert, alpn = handshake(store, HOST, [ACME_TLS_ALPN])
    assert (cert.fingerprint(hashes.SHA256()).hex(), alpn) == (bootstrap.sha256, None)

    store.set_challenges({HOST: challenge_context(HOST, KEY_AUTH, tmp_path)})
    cert, alpn = handshake(store, HOST, [ACME_TLS_ALPN])
    assert alpn == ACME_TLS_ALPN
    assert cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID).critical
    # Ordinary clients, and challenges for other names, still get the instance certificate.
    cert, alpn = handshake(store, HOST, ["h2", "http/1.1"])
    assert (cert.fingerprint(hashes.SHA256()).hex(), alpn) == (bootstrap.sha256, "http/1.1")
    cert, _ = handshake(store, "other.example.com", [ACME_TLS_ALPN])
    assert cert.fingerprint(hashes.SHA256()).hex() == bootstrap.sha256

    store.clear_challenges()
    _, alpn = handshake(store, HOST, [ACME_TLS_ALPN])
    assert alpn is None
    assert not list(tmp_path.glob(".acme-challenge.*")), "scratch files left behind"


def test_swap_serves_new_handshakes_and_is_kept_across_restarts(tmp_path: Path) -> None:
    config = home_config(tmp_path)
    store = loaded_store(config)
    install(store, [HOST])
    assert not store.self_signed and store.info is not None
    issued = store.info.sha256
    cert, _ = handshake(store, HOST, ["http/1.1"])
    assert cert.fingerprint(hashes.SHA256()).hex() == issued
    assert stat.S_IMODE(store.key_path.stat().st_mode) == 0o600
    assert not list(store.cert_path.parent.glob(".*.new")), "scratch files left behind"

    # A restart keeps the issued certificate, even with a hostname added: it still serves
    # the old name while the manager orders the new one.
    again = loaded_store(home_config(tmp_path, hostnames=[HOST, "new.example.com"]))
    assert again.info is not None and again.info.sha256 == issued

    # A key that no longer matches (a crash between the two renames) means the bootstrap.
    store.key_path.write_bytes(
        generate_private_key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    broken = loaded_store(config)
    assert broken.self_signed and broken.info is not None and broken.info.sha256 != issued


def test_prepare_refuses_a_chain_that_does_not_match_the_key(tmp_path: Path) -> None:
    store = loaded_store(home_config(tmp_path))
    before = store.cert_path.read_bytes(), store.key_path.read_bytes()
    pem, _ = ca_issued([HOST])
    with pytest.raises(ssl.SSLError):
        store.prepare(pem, generate_private_key())
    assert (store.cert_path.read_bytes(), store.key_path.read_bytes()) == before


# --- keys, CSRs, errors -----------------------------------------------------------------


def test_account_key_created_once_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "acme_account.key"
    first = load_account_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = load_account_key(path)
    assert first.private_numbers() == second.private_numbers()


@pytest.mark.parametrize(
    ("kind", "cls"), [("ec256", ec.EllipticCurvePublicKey), ("rsa2048", rsa.RSAPublicKey)]
)
def test_csr_lists_every_hostname(kind: str, cls: type) -> None:
    key = generate_private_key(kind)
    csr = x509.load_pem_x509_csr(make_csr(key, [HOST, "b.example.com"]))
    assert csr.is_signature_valid and isinstance(csr.public_key(), cls)
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [HOST, "b.example.com"]


def test_errors_are_one_readable_line() -> None:
    problem = messages.Error.with_code("rateLimited", detail="too many certificates")
    assert describe_error(problem) == "the ACME server refused: rateLimited: too many certificates"
    assert describe_error(requests.ConnectionError("connection refused")).startswith(
        "cannot reach the ACME server: connection refused"
    )
    assert len(describe_error(RuntimeError("x" * 5000))) <= 400


# --- the manager ------------------------------------------------------------------------


def fast_acme(**overrides: object) -> dict[str, object]:
    return {"retry_initial": "50ms", "retry_max": "200ms", "jitter": "0s", **overrides}


def test_order_reasons(tmp_path: Path) -> None:
    store = loaded_store(home_config(tmp_path, acme=fast_acme()))
    manager = AcmeManager(home_config(tmp_path, acme=fast_acme()), store)
    now = time.time()
    assert "bootstrap" in (manager.order_reason(now) or "")

    install(store, [HOST])
    assert manager.order_reason(now) is None
    # Due 30 days before expiry (renew_before): a 90-day certificate in about 60 days;
    # until then the manager looks again every check_interval.
    assert manager._until_due(now) == 12 * 3600
    assert manager.order_reason(now + 59 * 86400) is None
    assert "expires in" in (manager.order_reason(now + 61 * 86400) or "")

    install(store, [HOST], days=20)
    assert "expires in 20.0 days" in (manager.order_reason(now) or "")

    grown = AcmeManager(
        home_config(tmp_path, acme=fast_acme(), hostnames=[HOST, "b.example.com"]), store
    )
    install(store, [HOST])
    assert "hostnames changed" in (grown.order_reason(now) or "")
    rsa_wanted = AcmeManager(home_config(tmp_path, acme=fast_acme(key_type="rsa2048")), store)
    assert "key_type" in (rsa_wanted.order_reason(now) or "")


async def test_failed_orders_retry_with_backoff_and_recover(tmp_path: Path) -> None:
    config = home_config(tmp_path, acme=fast_acme())
    store = loaded_store(config)
    bootstrap = store.info
    assert bootstrap is not None
    failures: list[BaseException] = [
        requests.ConnectionError("name resolution failed"),
        OSError("disk full"),
        RuntimeError("surprise"),
        messages.Error.with_code("connection", detail="could not connect"),
    ]
    calls: list[float] = []
    warned: list[list[str]] = []

    def issuer(names: Sequence[str], publish: object) -> tuple[bytes, PrivateKey]:
        calls.append(time.monotonic())
        warned.append(store.warnings())
        if failures:
            raise failures.pop(0)
        assert list(names) == [HOST]
        return ca_issued(names)

    manager = AcmeManager(config, store, issuer=issuer)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        for _ in range(1000):  # 10 s at most
            if not store.self_signed:
                break
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()

    assert len(calls) == 5
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    # 50ms, 100ms, 200ms, 200ms (capped), each drawn from [half, full].
    for gap, full in zip(gaps, [0.05, 0.1, 0.2, 0.2], strict=True):
        assert full / 2 - 0.01 <= gap <= full + 0.2, gaps
    assert warned[0] == []
    assert all("no ACME certificate yet" in w[0] for w in warned[1:]), warned
    assert "could not connect" in warned[-1][0]
    assert store.info is not None and store.info.sha256 != bootstrap.sha256
    assert store.warnings() == []
    assert store.renewal.failures == 0 and store.renewal.last_success is not None


async def test_renewal_failing_near_expiry_is_a_loud_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = home_config(tmp_path, acme=fast_acme())
    store = loaded_store(config)
    install(store, [HOST], days=5)

    def issuer(names: Sequence[str], publish: object) -> tuple[bytes, PrivateKey]:
        raise requests.ConnectionError("Temporary failure in name resolution")

    manager = AcmeManager(config, store, issuer=issuer)
    delay = await manager.step()
    assert 0.025 <= delay <= 0.05
    (warning,) = store.warnings()
    assert "expires in 5.0 days" in warning and "renewal is failing" in warning
    assert "name resolution" in warning
    assert any(r.levelname == "ERROR" and "expires in" in r.getMessage() for r in caplog.records)
    status = store.status()
    assert status is not None and isinstance(status["renewal"], dict)
    assert status["renewal"]["state"] == "failing"
    text = _format_status(_status_doc(status, [warning]))
    assert "WARNING: the certificate" in text and "renewal  failing" in text


async def test_orders_wait_for_the_relay_session(tmp_path: Path) -> None:
    config = home_config(tmp_path, acme=fast_acme())
    store = loaded_store(config)
    issued: list[str] = []

    def issuer(names: Sequence[str], publish: object) -> tuple[bytes, PrivateKey]:
        issued.append("x")
        return ca_issued(names)

    manager = AcmeManager(config, store, ready=lambda: False, ready_wait=0.3, issuer=issuer)
    await manager.step()
    assert issued == [] and "not connected to the relay" in (store.renewal.last_error or "")


def test_disabled_or_unmanaged_certificates_are_not_ordered(tmp_path: Path) -> None:
    assert not CertificateStore(home_config(tmp_path, acme={"enabled": False})).acme_enabled
    # Enabled but the CA's terms not agreed to: off, and status says why (issue 22).
    waiting = loaded_store(home_config(tmp_path, acme={"agree_tos": False}))
    assert not waiting.acme_enabled
    (warning,) = waiting.warnings()
    assert "agree_tos" in warning and "https://letsencrypt.org/repository/" in warning
    status = waiting.status()
    assert status is not None and status["managed"] == "bootstrap"
    assert status["renewal"] == {"state": "disabled", "reason": warning, "last_error": None}
    pem, key = ca_issued([HOST], days=10)
    (tmp_path / "own.crt").write_bytes(pem)
    (tmp_path / "own.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    store = loaded_store(home_config(tmp_path, certificate="own.crt", private_key="own.key"))
    assert not store.acme_enabled and not store.self_signed
    (warning,) = store.warnings()
    assert "[acme] does not manage it" in warning


def _status_doc(cert: Mapping[str, object], warnings: list[str]) -> dict[str, object]:
    return {
        "role": "home",
        "state": "connected",
        "connected_since": "2030-01-01T00:00:00Z",
        "session_id": "abc",
        "version": "0",
        "relay": "wss://relay.example.com/v1/tunnel",
        "hostnames": [HOST],
        "streams": {"active": 0, "total": 0},
        "bytes": {"in": 0, "out": 0},
        "certificate": dict(cert),
        "warnings": warnings,
    }


# --- `tunneld cert show` ----------------------------------------------------------------


def test_cert_show_reads_the_file_without_a_daemon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = home_config(tmp_path)
    assert main(["cert", "show", "-c", str(config.path)]) == 2
    assert "no certificate at" in capsys.readouterr().err

    store = loaded_store(config)
    install(store, [HOST, "b.example.com"])
    assert store.info is not None
    assert main(["cert", "show", "-c", str(config.path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["sha256"] == store.info.sha256
    assert len(shown["sha256"]) == 64 and shown["sha256"] == shown["sha256"].lower()
    assert shown["sans"] == [HOST, "b.example.com"]
    assert shown["issuer"] == "CN=test ACME CA" and not shown["self_signed"]
    assert 89 < shown["days_left"] <= 90

    assert main(["cert", "show", "-c", str(config.path)]) == 0
    human = capsys.readouterr().out
    assert store.info.sha256_colon() in human
    assert "90.0 days left" in human or "89.9 days left" in human


# --- the [acme] timing keys -------------------------------------------------------------


def test_acme_timing_keys_parse_with_defaults(tmp_path: Path) -> None:
    acme = home_config(tmp_path).acme
    assert (acme.retry_initial, acme.retry_max) == (60, 6 * 3600)
    assert (acme.check_interval, acme.jitter) == (12 * 3600, 3600)
    acme = home_config(
        tmp_path,
        acme={"retry_initial": "1s", "retry_max": "2s", "check_interval": "3s", "jitter": "0"},
    ).acme
    assert (acme.retry_initial, acme.retry_max, acme.check_interval, acme.jitter) == (1, 2, 3, 0)


@pytest.mark.parametrize(
    ("acme", "message"),
    [
        ({"retry_initial": "1h", "retry_max": "1m"}, "[acme] retry_max: must not be shorter"),
        ({"check_interval": "0"}, "[acme] check_interval: expected a duration longer than 0"),
        ({"retry_initial": "soon"}, "[acme] retry_initial: expected a duration"),
        ({"jitter": -1}, "[acme] jitter: expected a duration"),
    ],
)
def test_acme_timing_keys_refuse_bad_values(
    tmp_path: Path, acme: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        home_config(tmp_path, acme=acme)
    assert message in str(info.value) and "tunneld.toml" in str(info.value)
