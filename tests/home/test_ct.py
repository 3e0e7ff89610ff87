"""The certificate-transparency watch against a local fake of crt.sh (tests/fakect.py):
real HTTP on loopback, real certificates; no test reaches out."""

from __future__ import annotations

import json
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests import fakect
from tunneld.config import load_home_config
from tunneld.home.ct import CT_FILE, CtWatch, normalize_sha256, read_state
from tunneld.pki import generate_private_key, issue_certificate, make_ca, self_signed_certificate

HOST = "ha.example.test"


def fingerprint(pem: bytes) -> str:
    return sha256(x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)).hexdigest()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    certs = tmp_path / "api" / "certs.json"
    certs.parent.mkdir()
    server = fakect.serve(certs)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", certs
    finally:
        server.shutdown()


def watch_for(tmp_path: Path, url: str) -> tuple[CtWatch, Path]:
    state = tmp_path / "state"
    config_path = tmp_path / "tunneld.toml"
    config_path.write_text(
        '[relay]\nurl = "wss://relay.example.test/v1/tunnel"\n'
        'token = "tunneld1.e30.c2lnbmF0dXJl"\n'
        f'[tls]\nhostnames = ["{HOST}"]\n'
        f'[daemon]\nstate_directory = "{state}"\n'
        f'[ct]\nenabled = true\ninterval = "1s"\nurl = "{url}"\n'
    )
    cert = state / "certificate.pem"
    return CtWatch(load_home_config(config_path), lambda: cert), cert


async def test_a_foreign_certificate_is_reported_until_acknowledged(
    tmp_path: Path, api: tuple[str, Path]
) -> None:
    url, certs = api
    watch, cert_path = watch_for(tmp_path, url)
    ours = self_signed_certificate(generate_private_key("ec256"), [HOST])
    cert_path.parent.mkdir(parents=True)
    cert_path.write_bytes(ours)
    watch.record_own()
    ca_key, ca_pem = make_ca("Someone Else's CA")
    foreign = issue_certificate(ca_key, ca_pem, generate_private_key("ec256"), [HOST])
    other_name = issue_certificate(ca_key, ca_pem, generate_private_key("ec256"), ["x.test"])
    certs.write_text(
        json.dumps(
            [
                {"id": 1, "pem": ours.decode()},
                {"id": 2, "pem": foreign.decode()},
                {"id": 3, "pem": other_name.decode()},
            ]
        )
    )
    await watch.check()
    assert watch.last_error is None and watch.checks == 1
    (found,) = watch.status()["unknown"]
    assert found["sha256"] == fingerprint(foreign)
    assert found["issuer"] == "CN=Someone Else's CA" and found["hostname"] == HOST
    serial = x509.load_pem_x509_certificate(foreign).serial_number
    assert found["serial"] == format(serial, "x") and found["not_before"]
    assert any(fingerprint(foreign) in w for w in watch.warnings())
    requests = (certs.parent / "requests.log").read_text().splitlines()
    assert "d=1" not in " ".join(requests)  # ours is known by serial: never fetched
    assert any("q=%2A.example.test" in r for r in requests)  # the wildcard one level up

    colon = ":".join(fingerprint(foreign)[i : i + 2].upper() for i in range(0, 64, 2))
    assert watch.acknowledge(colon) is not None
    assert watch.acknowledge(colon) is None  # not unknown any more
    await watch.check()
    assert watch.status()["unknown"] == [] and watch.warnings() == []
    state = read_state(tmp_path / "state" / CT_FILE)
    assert [k["sha256"] for k in state["known"]] == [fingerprint(ours)]
    assert (tmp_path / "state" / CT_FILE).stat().st_mode & 0o777 == 0o600


async def test_an_api_that_fails_is_a_warning_and_keeps_what_was_found(
    tmp_path: Path, api: tuple[str, Path]
) -> None:
    url, certs = api
    watch, _ = watch_for(tmp_path, url + "nothing-here/")
    certs.write_text("not json")
    await watch.check()
    assert watch.last_error is not None and url in watch.last_error
    assert watch.checks == 0
    assert any("certificate-transparency check failed" in w for w in watch.warnings())


def test_fingerprints_are_read_in_either_form() -> None:
    hexa = "ab" * 32
    assert normalize_sha256(":".join(["AB"] * 32)) == hexa
    with pytest.raises(ValueError, match="64 hex digits"):
        normalize_sha256("abc")
