"""`tunneld demo`: a relay, a home daemon and a small web app, all on loopback.

Throwaway keys, certificates and configs go to a temporary folder; the relay,
the daemon and the app run as tasks of one nursery here, each exactly as its
own command would run it (the configs are real files read by `load_config`).
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import tomli_w
import trio

from tunneld.config import HomeConfig, RelayConfig, load_config
from tunneld.demoapp import serve_app
from tunneld.home.daemon import Daemon
from tunneld.pki import (
    generate_private_key,
    issue_certificate,
    make_ca,
    write_certificate,
    write_private_key,
)
from tunneld.relay.server import Relay
from tunneld.tokens import generate_keypair, issue_token, load_private_key

log = logging.getLogger("tunneld.demo")

RELAY_NAME = "relay.demo.test"
HOME_NAME = "home.demo.test"


def write_relay_files(root: Path, relay_port: int = 0) -> Path:
    """Keys, certificates and the relay config; returns relay.toml."""
    ca_key, ca_pem = make_ca("tunneld demo CA")
    write_certificate(ca_pem, root / "ca.pem")
    key = generate_private_key()
    write_private_key(key, root / "relay.key")
    write_certificate(issue_certificate(ca_key, ca_pem, key, [RELAY_NAME]), root / "relay.crt")
    generate_keypair(root / "token.key", root / "token.pub")
    relay = {
        "relay": {
            "hostname": RELAY_NAME,
            "listen": [f"127.0.0.1:{relay_port}"],
            "certificate": "relay.crt",
            "private_key": "relay.key",
            "token_public_key": "token.pub",
            "token_private_key": "token.key",
            "control_socket": str(root / "relay.sock"),
        }
    }
    (root / "relay.toml").write_text(tomli_w.dumps(relay))
    return root / "relay.toml"


def write_home_config(root: Path, relay_port: int, app_port: int) -> Path:
    token = issue_token(
        load_private_key(root / "token.key"), hostnames=[HOME_NAME], subject="demo", ttl=90 * 86400
    )
    (root / "token").write_text(token + "\n")
    (root / "token").chmod(0o600)
    home = {
        "relay": {
            "url": f"wss://{RELAY_NAME}:{relay_port}/v1/tunnel",
            "token_file": "token",
            "ca_file": "ca.pem",
            "connect_to": "127.0.0.1",
        },
        "tls": {"hostnames": [HOME_NAME]},
        "acme": {"enabled": False},
        "upstream": {"url": f"http://127.0.0.1:{app_port}"},
        "daemon": {"state_directory": "state", "control_socket": str(root / "home.sock")},
    }
    path = root / "tunneld.toml"
    path.write_text(tomli_w.dumps(home))
    return path


async def run_demo(root: Path, *, check: bool = False, port: int = 0) -> int:
    # Catch Ctrl-C from the first moment, so it always means a clean stop.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        return await _run_demo(root, signals, check=check, port=port)


async def _run_demo(root: Path, signals: AsyncIterator[int], *, check: bool, port: int) -> int:
    relay_cfg = load_config(write_relay_files(root, port))
    assert isinstance(relay_cfg, RelayConfig)
    async with trio.open_nursery() as nursery:
        _, app_port = await nursery.start(serve_app, "127.0.0.1", 0)
        relay = Relay(relay_cfg)
        await nursery.start(relay.run)
        relay_port = relay.listening[0][1]
        home_cfg = load_config(write_home_config(root, relay_port, app_port))
        assert isinstance(home_cfg, HomeConfig)
        daemon = Daemon(home_cfg)
        await nursery.start(daemon.run)
        with trio.fail_after(30):
            await daemon.connector.connected.wait()
        cert = daemon.certs.cert_path
        url = f"https://{HOME_NAME}:{relay_port}/"
        resolve = f"{HOME_NAME}:{relay_port}:127.0.0.1"
        curl = ["curl", "-sS", "--cacert", str(cert), "--resolve", resolve, url + "headers"]
        print(
            f"\ntunneld demo is up (files in {root}).\n"
            f"  relay   {RELAY_NAME} on 127.0.0.1:{relay_port} (routes by SNI, never decrypts)\n"
            f"  home    {HOME_NAME} -> http://127.0.0.1:{app_port} (the demo app)\n"
            f"  sha256  {daemon.certs.info.sha256_colon() if daemon.certs.info else ''}\n\n"
            f"Try it (the app echoes the headers it got, with your forwarded address):\n"
            f"  {' '.join(curl)}\n\n"
            f"In a browser: map {HOME_NAME} to 127.0.0.1 in /etc/hosts, open {url}\n"
            f"and accept the self-signed certificate.\n"
            f"Status: tunneld status -c {root / 'tunneld.toml'}\n"
            + ("Running that curl once:\n" if check else "Press Ctrl-C to stop.\n"),
            flush=True,
        )
        if check:
            result = await trio.run_process(
                curl, capture_stdout=True, capture_stderr=True, check=False
            )
            body = result.stdout.decode(errors="replace")
            sys.stdout.write(body.rstrip("\n") + "\n")
            code, verdict = check_verdict(result.returncode, body, result.stderr)
            print(f"demo check {verdict}; exit status {code}", flush=True)
            nursery.cancel_scope.cancel()
            return code
        async for _ in signals:
            break
        print("stopping", flush=True)
        daemon.stop()
        relay.stop()
        with trio.move_on_after(5):
            await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    return 0


def check_verdict(curl_code: int, body: str, stderr: bytes) -> tuple[int, str]:
    """The exit status of `demo --check` and the one line that says what was checked."""
    what = (
        f"GET https://{HOME_NAME}/headers by curl through the relay, TLS verified against the "
        "daemon's certificate, proxied to the demo app"
    )
    if curl_code != 0:
        error = stderr.decode(errors="replace").strip().splitlines()
        detail = f": {error[-1]}" if error else ""
        return 1, f"FAILED: {what}: curl exited {curl_code}{detail}"
    try:
        echoed = json.loads(body)
        forwarded = [v for k, v in echoed["headers"] if k.lower() == "x-forwarded-for"]
    except (ValueError, KeyError, TypeError):
        return 1, f"FAILED: {what}: the answer is not the app's JSON echo"
    if echoed.get("path") != "/headers" or len(forwarded) != 1:
        return 1, f"FAILED: {what}: the app did not see the request with one X-Forwarded-For"
    return 0, f"passed: {what}, which saw X-Forwarded-For {forwarded[0]}"


def main(check: bool = False, keep: bool = False, port: int = 0) -> int:
    root = Path(tempfile.mkdtemp(prefix="tunneld-demo-"))
    try:
        return trio.run(lambda: run_demo(root, check=check, port=port))
    except subprocess.CalledProcessError:
        return 1
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
