"""Issue 17 end to end: the LAN listener, several routes, client certificates.

Real relay, daemon and demo-app processes; curl --resolve as the client, on
several loopback addresses (127.0.0.1 the relay, 127.0.0.2 the LAN listener,
other 127.0.0.x as clients).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import HOME_HOST, World, tunneld, wait_for
from tests.integration.test_operations import control, socket_status

pytestmark = pytest.mark.integration

CURL = shutil.which("curl") or "curl"
CAMS = "cams.test"
LAN_IP = "127.0.0.2"


def curl(
    world: World,
    url_host: str,
    port: int,
    address: str,
    *args: str,
    source: str = "127.0.0.1",
) -> subprocess.CompletedProcess[str]:
    """The same command line whichever address `url_host` resolves to."""
    return subprocess.run(
        [
            CURL,
            "-sS",
            "--resolve",
            f"{url_host}:{port}:{address}",
            "--cacert",
            str(world.home_cert()),
            "--interface",
            source,
            "--max-time",
            "20",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def headers_of(body: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in json.loads(body)["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


def peer_sha256(address: str, port: int, sni: str = HOME_HOST) -> str:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((address, port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=sni) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def start(world: World, **sections: dict[str, Any]) -> int:
    """App, relay, then the daemon with a LAN listener on the relay's port at LAN_IP."""
    world.start_app()
    world.start_relay()
    port = world.relay_port
    token = world.issue_token(HOME_HOST, CAMS)
    world.start_home(token, lan={"listen": [f"{LAN_IP}:{port}"]}, **sections)
    return port


def test_the_same_curl_through_the_relay_and_the_lan_then_with_the_relay_dead(
    world: World,
) -> None:
    port = start(world)
    url = f"https://{HOME_HOST}:{port}/headers"
    via_relay = curl(world, HOME_HOST, port, "127.0.0.1", url, source="127.0.0.3")
    via_lan = curl(world, HOME_HOST, port, LAN_IP, url, source="127.0.0.4")
    assert via_relay.returncode == 0, via_relay.stderr
    assert via_lan.returncode == 0, via_lan.stderr
    # The forwarded address is each path's true client.
    assert headers_of(via_relay.stdout)["x-forwarded-for"] == ["127.0.0.3"]
    assert headers_of(via_lan.stdout)["x-forwarded-for"] == ["127.0.0.4"]
    # One certificate on both paths.
    assert peer_sha256("127.0.0.1", port) == peer_sha256(LAN_IP, port)
    st = world.home_status()
    assert st["paths"]["relay"]["state"] == "connected"
    assert st["paths"]["lan"]["state"] == "listening"
    assert st["paths"]["lan"]["listen"] == [f"{LAN_IP}:{port}"]
    assert st["paths"]["lan"]["total"] >= 2
    code, metrics = control(world.root / "run" / "home.sock", "/metrics")
    assert code == 200
    lan_total = [
        line for line in metrics.decode().splitlines()
        if line.startswith("tunneld_lan_connections_total ")
    ]  # fmt: skip
    assert lan_total and float(lan_total[0].split()[1]) >= 2

    world.relay.stop(signal.SIGKILL)
    wait_for(lambda: world.home_status()["state"] != "connected", what="relay lost")
    again = curl(world, HOME_HOST, port, LAN_IP, url, source="127.0.0.4")
    assert again.returncode == 0, again.stderr
    assert headers_of(again.stdout)["x-forwarded-for"] == ["127.0.0.4"]
    st = world.home_status()
    assert st["paths"]["relay"]["state"] == "connecting"
    assert st["paths"]["lan"]["state"] == "listening"
    # A ban made while the relay is down holds on the LAN too (one watchdog).
    tunneld("bans", "add", "127.0.0.4", "-c", str(world.home_config), check=True)
    banned = curl(world, HOME_HOST, port, LAN_IP, url, source="127.0.0.4")
    assert banned.returncode != 0


def test_two_routes_reach_two_apps_and_a_wrong_host_gets_421(world: World) -> None:
    world.start_app()
    first_app, first_port = world.app, world.app_port
    world.start_app()  # the second app: the route's upstream
    cams_port = world.app_port
    world.app, world.app_port = first_app, first_port  # [upstream] is the first
    world.start_relay()
    port = world.relay_port
    token = world.issue_token(HOME_HOST, CAMS)
    world.write_home_config(token)
    _add_routes(
        world.home_config,
        [{"hostname": CAMS, "upstream": f"http://127.0.0.1:{cams_port}", "preset": "generic"}],
    )
    world.home = world.spawn("home", _run_args(world))
    wait_for(
        lambda: (world.status(world.home_config, world.home) or {}).get("state") == "connected",
        what="home connected",
    )
    home_url = f"https://{HOME_HOST}:{port}/small"
    cams_url = f"https://{CAMS}:{port}/small"
    assert curl(world, HOME_HOST, port, "127.0.0.1", home_url).stdout == "hello tunnel\n"
    assert curl(world, CAMS, port, "127.0.0.1", cams_url).stdout == "hello tunnel\n"
    st = world.home_status()
    assert st["hostnames"] == [HOME_HOST, CAMS]
    routes = {r["name"]: r for r in st["routes"]}
    assert routes[CAMS]["upstream"] == f"http://127.0.0.1:{cams_port}"
    assert routes[CAMS]["preset"] == "generic"
    assert routes[CAMS]["requests"] == 1 and routes["default"]["requests"] == 1
    # Stop the first app: home.test fails (502), cams.test still works: two upstreams.
    first_app.stop()
    assert (
        "502"
        in curl(
            world, HOME_HOST, port, "127.0.0.1", "-o", "/dev/null", "-w", "%{http_code}", home_url
        ).stdout
    )
    assert curl(world, CAMS, port, "127.0.0.1", cams_url).stdout == "hello tunnel\n"
    # A Host that disagrees with the SNI, or names no route: 421.
    for host in (CAMS, "other.test", "127.0.0.1"):
        wrong = curl(
            world,
            HOME_HOST,
            port,
            "127.0.0.1",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            f"Host: {host}",
            home_url,
        )
        assert wrong.stdout == "421", (host, wrong.stdout, wrong.stderr)
    assert world.home_status()["routes"][0]["misdirected"] == 3


def test_client_certificates_required_issue_use_and_revoke(world: World, tmp_path: Path) -> None:
    world.start_app()
    world.start_relay()
    port = world.relay_port
    token = world.issue_token(HOME_HOST, CAMS)
    world.write_home_config(token, watchdog={"ban_threshold": 3})
    # First use creates the CA; the config may then name the route.
    password = tmp_path / "pw"
    password.write_text("correct horse\n")
    p12 = tmp_path / "phone.p12"
    issued = tunneld(
        "client",
        "issue",
        "--name",
        "phone",
        "-c",
        str(world.home_config),
        "--password-file",
        str(password),
        "-o",
        str(p12),
    )
    assert issued.returncode == 0, issued.stderr
    assert p12.stat().st_mode & 0o777 == 0o600
    assert "correct horse" not in issued.stdout + issued.stderr
    _add_routes(
        world.home_config,
        [
            {
                "hostname": CAMS,
                "upstream": f"http://127.0.0.1:{world.app_port}",
                "client_certificate": "required",
            }
        ],
    )
    world.home = world.spawn("home", _run_args(world))
    wait_for(
        lambda: (world.status(world.home_config, world.home) or {}).get("state") == "connected",
        what="home connected",
    )
    url = f"https://{CAMS}:{port}/headers"
    cert = ["--cert-type", "P12", "--cert", f"{p12}:correct horse"]

    # Without a certificate: refused in the handshake, counted by the watchdog.
    for _ in range(3):
        bare = curl(world, CAMS, port, "127.0.0.1", url, source="127.0.0.5")
        assert bare.returncode != 0 and '"headers"' not in bare.stdout
    st = wait_for(
        lambda: (s := world.home_status())["streams"]["certificate_refused"] >= 3 and s,
        what="refusals counted",
    )
    assert "127.0.0.5" in [b["ip"] for b in st["bans"]]  # 3 failures = ban_threshold

    # With one: it passes, and the upstream sees the name, never the client's own copy.
    ok = curl(world, CAMS, port, "127.0.0.1", *cert, "-H", "X-Tunneld-Client: admin", url)
    assert ok.returncode == 0, ok.stderr
    assert headers_of(ok.stdout)["x-tunneld-client"] == ["phone"]
    # The default route asks for no certificate, and strips a client's copy too.
    plain = curl(
        world,
        HOME_HOST,
        port,
        "127.0.0.1",
        "-H",
        "X-Tunneld-Client: admin",
        f"https://{HOME_HOST}:{port}/headers",
    )
    assert plain.returncode == 0, plain.stderr
    assert "x-tunneld-client" not in headers_of(plain.stdout)

    listed = json.loads(
        tunneld("client", "list", "-c", str(world.home_config), "--json", check=True).stdout
    )
    assert [c["name"] for c in listed["clients"]] == ["phone"]

    # Revoked: refused on the next handshake, no restart.
    tunneld("client", "revoke", "phone", "-c", str(world.home_config), check=True)
    after = curl(world, CAMS, port, "127.0.0.1", *cert, url)
    assert after.returncode != 0 and '"headers"' not in after.stdout
    assert world.home.alive()


# -- helpers --------------------------------------------------------------------------


def _run_args(world: World) -> list[str]:
    import sys

    return [sys.executable, "-m", "tunneld", "run", "-c", str(world.home_config)]


def _add_routes(config: Path, routes: list[dict[str, Any]]) -> None:
    import tomllib

    import tomli_w

    data = tomllib.loads(config.read_text())
    data["route"] = routes
    config.write_text(tomli_w.dumps(data))


def test_a_reload_that_breaks_routes_keeps_the_running_ones(world: World) -> None:
    world.start_app()
    world.start_relay()
    port = world.relay_port
    token = world.issue_token(HOME_HOST, CAMS)
    world.write_home_config(token)
    good = [{"hostname": CAMS, "upstream": f"http://127.0.0.1:{world.app_port}"}]
    _add_routes(world.home_config, good)
    world.home = world.spawn("home", _run_args(world))
    wait_for(
        lambda: (world.status(world.home_config, world.home) or {}).get("state") == "connected",
        what="home connected",
    )
    cams_url = f"https://{CAMS}:{port}/small"
    bad_routes: list[list[dict[str, Any]]] = [
        [*good, {"hostname": "nvr.test", "upstream": "http://127.0.0.1:1"}],  # not in token
        [*good, {**good[0], "upstream": "http://127.0.0.1:2"}],  # overlapping
        [{**good[0], "client_certificate": "required", "client_ca": "/nonexistent/ca.pem"}],
    ]
    for reloads, routes in enumerate(bad_routes, 1):
        _add_routes(world.home_config, routes)
        check = tunneld("check-config", "-c", str(world.home_config))
        assert check.returncode == 2 and "[route " in check.stderr, check.stderr
        assert "Traceback" not in check.stderr
        world.home.popen.send_signal(signal.SIGHUP)
        st = wait_for(
            lambda n=reloads: _failed(world) >= n and socket_status(world, "home.sock"),
            what="reload refused",
        )
        assert "[route " in st["config"]["last_error"]
        ok = curl(world, CAMS, port, "127.0.0.1", cams_url)
        assert ok.stdout == "hello tunnel\n", ok.stderr
    assert world.home.alive()


def _failed(world: World) -> int:
    """Reloads refused so far, counted from the daemon's log."""
    return world.home.log().count("reload failed")


def test_a_route_added_by_reload_with_an_optional_client_certificate(
    world: World, tmp_path: Path
) -> None:
    world.start_app()
    world.start_relay()
    port = world.relay_port
    token = world.issue_token(HOME_HOST, CAMS)
    world.start_home(token)
    url = f"https://{CAMS}:{port}/headers"
    before = curl(world, CAMS, port, "127.0.0.1", url)
    assert before.returncode != 0  # not claimed yet: the relay knows no such name

    _add_routes(
        world.home_config,
        [
            {
                "hostname": CAMS,
                "upstream": f"http://127.0.0.1:{world.app_port}",
                "client_certificate": "optional",
                "client_name_header": "X-Device",
            }
        ],
    )
    world.home.popen.send_signal(signal.SIGHUP)
    wait_for(
        lambda: (
            CAMS in world.home_status()["hostnames"] and world.home_status()["state"] == "connected"
        ),
        what="route claimed",
    )
    # The bootstrap certificate follows the names: fetch the new one once it is served.
    wait_for(
        lambda: curl(world, CAMS, port, "127.0.0.1", url).returncode == 0,
        what="cams served",
    )
    anonymous = curl(world, CAMS, port, "127.0.0.1", "-H", "X-Device: admin", url)
    assert anonymous.returncode == 0, anonymous.stderr
    assert "x-device" not in headers_of(anonymous.stdout)

    password = tmp_path / "pw"
    password.write_text("tablet-pw\n")
    p12 = tmp_path / "tablet.p12"
    tunneld(
        "client", "issue", "--name", "tablet", "-c", str(world.home_config),
        "--password-file", str(password), "-o", str(p12), check=True,
    )  # fmt: skip
    named = curl(world, CAMS, port, "127.0.0.1", "--cert-type", "P12", "--cert",
                 f"{p12}:tablet-pw", url)  # fmt: skip
    assert named.returncode == 0, named.stderr
    assert headers_of(named.stdout)["x-device"] == ["tablet"]


def test_a_lan_address_in_use_is_a_clear_error(world: World) -> None:
    world.start_app()
    world.start_relay()
    with socket.socket() as busy:
        busy.bind((LAN_IP, 0))
        busy.listen()
        port = busy.getsockname()[1]
        world.write_home_config(lan={"listen": [f"{LAN_IP}:{port}"]})
        proc = world.spawn("home", _run_args(world))
        code = proc.popen.wait(timeout=30)
    assert code == 2
    log = proc.log()
    assert f"tunneld.toml: [lan] listen: cannot listen on {LAN_IP}:{port}" in log
    assert "Traceback" not in log
