"""The certificate-transparency watch end to end: a real daemon (relay and app too)
against a local fake of crt.sh in its own process (tests/fakect.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.integration.harness import HOME_HOST, PY, World, tunneld, wait_for
from tunneld.control import request
from tunneld.pki import generate_private_key, issue_certificate, make_ca

pytestmark = pytest.mark.integration


def certs_file(world: World) -> Path:
    return world.root / "fakect" / "certs.json"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("ct") / "w")
    port_file = w.root / "fakect" / "port"
    port_file.parent.mkdir(parents=True)
    try:
        w.spawn(
            "fakect",
            [
                PY,
                "-m",
                "tests.fakect",
                "--certs",
                str(certs_file(w)),
                "--port-file",
                str(port_file),
            ],
        )
        wait_for(port_file.exists, what="the fake CT API")
        url = f"http://127.0.0.1:{int(port_file.read_text())}/"
        w.home_overrides = {"ct": {"enabled": True, "interval": "1s", "url": url}}
        w.start_app()
        w.start_relay()
        w.start_home()
        yield w
    finally:
        w.stop_all()


def metrics(world: World) -> str:
    status, body = trio.run(lambda: request(world.root / "run" / "home.sock", "GET", "/metrics"))
    assert status == 200
    return body.decode()


def test_a_foreign_certificate_is_warned_about_until_acknowledged(world: World) -> None:
    ours = world.home_cert().read_bytes()
    ca_key, ca_pem = make_ca("Someone Else's CA")
    foreign = issue_certificate(ca_key, ca_pem, generate_private_key("ec256"), [HOME_HOST])
    digest = sha256(x509.load_pem_x509_certificate(foreign).public_bytes(Encoding.DER)).hexdigest()
    certs_file(world).write_text(json.dumps([{"id": 7, "pem": ours.decode()}]))
    wait_for(lambda: world.home_status()["ct"]["checks"] >= 2, what="clean checks")
    assert world.home_status()["ct"]["unknown"] == []
    assert "tunneld_ct_unknown_certificates 0.0" in metrics(world)

    certs_file(world).write_text(
        json.dumps([{"id": 7, "pem": ours.decode()}, {"id": 8, "pem": foreign.decode()}])
    )
    st = wait_for(
        lambda: (s := world.home_status())["ct"]["unknown"] and s,
        timeout=10,
        what="the foreign certificate within an interval",
    )
    (found,) = st["ct"]["unknown"]
    assert found["sha256"] == digest and found["hostname"] == HOME_HOST
    assert found["issuer"] == "CN=Someone Else's CA" and found["serial"] and found["not_before"]
    assert any(digest in w for w in st["warnings"])
    assert "tunneld_ct_unknown_certificates 1.0" in metrics(world)
    log = world.home.log()
    assert "WARNING" in log and "did not obtain, in CT logs: issuer CN=Someone Else's CA" in log
    human = tunneld("status", "-c", str(world.home_config)).stdout
    assert digest in human

    wrong = tunneld("cert", "acknowledge", "ab" * 32, "-c", str(world.home_config))
    assert wrong.returncode != 0 and "not among the unknown certificates" in wrong.stderr
    done = tunneld("cert", "acknowledge", digest.upper(), "-c", str(world.home_config))
    assert done.returncode == 0 and done.stdout.startswith(f"acknowledged {digest}: ")
    st = world.home_status()
    assert st["ct"]["unknown"] == [] and not any(digest in w for w in st["warnings"])
    checks = st["ct"]["checks"]
    wait_for(lambda: world.home_status()["ct"]["checks"] >= checks + 2, what="more checks")
    assert world.home_status()["ct"]["unknown"] == []  # stays accepted
    assert "tunneld_ct_unknown_certificates 0.0" in metrics(world)
