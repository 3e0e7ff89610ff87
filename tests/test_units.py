"""The systemd units: `systemd-analyze verify` accepts them and they keep their promises."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
HOME_UNIT = UNITS / "tunneld.service"
RELAY_UNIT = UNITS / "tunneld-relay.service"


def directives(path: Path) -> dict[str, list[str]]:
    """`Key=value` lines of the [Service] section, every value of a repeated key."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def tunneld_binary() -> Path:
    # The console script of the running interpreter's environment (the venv's tunneld).
    found = Path(sys.executable).parent / "tunneld"
    if found.exists():
        return found
    which = shutil.which("tunneld")
    if which is None:
        pytest.fail("no tunneld console script next to the interpreter or on PATH")
    return Path(which)


@pytest.mark.parametrize("unit", [HOME_UNIT, RELAY_UNIT], ids=lambda p: p.name)
def test_systemd_analyze_verify_accepts_the_unit(unit: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing in CI (Debian package `systemd`)")
        pytest.skip("systemd-analyze not installed (Debian package `systemd`)")
    # verify insists that ExecStart's binary exists: point it at this checkout's tunneld.
    text = unit.read_text().replace("/opt/tunneld/bin/tunneld", str(tunneld_binary()))
    copy = tmp_path / unit.name
    copy.write_text(text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    # Unknown or misspelt keys are only warnings on stderr, exit status 0: both must be clean.
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.parametrize("unit", [HOME_UNIT, RELAY_UNIT], ids=lambda p: p.name)
def test_units_are_notify_services_with_watchdog_reload_and_hardening(unit: Path) -> None:
    d = directives(unit)
    one = {k: v[-1] for k, v in d.items()}
    assert one["Type"] == "notify"
    assert one["Restart"] == "on-failure"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"  # SIGHUP = reload
    assert one["WatchdogSec"].endswith("s") and int(one["WatchdogSec"][:-1]) >= 10
    assert one["User"] and one["User"] != "root"
    for key in ("RuntimeDirectory", "ConfigurationDirectory"):
        assert one[key], key
    assert one["ProtectSystem"] == "strict"
    for key in ("ProtectHome", "PrivateTmp", "NoNewPrivileges", "PrivateDevices"):
        assert one[key] == "yes", key
    families = set(one["RestrictAddressFamilies"].split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6"}
    # The ExecStart config lives in the unit's ConfigurationDirectory (/etc/NAME).
    assert f"/etc/{one['ConfigurationDirectory']}/" in one["ExecStart"]


def test_only_the_relay_may_bind_privileged_ports() -> None:
    home, relay = directives(HOME_UNIT), directives(RELAY_UNIT)
    assert home["CapabilityBoundingSet"] == [""]
    assert home["AmbientCapabilities"] == [""]
    assert relay["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert relay["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]


def test_home_keeps_state_and_relay_has_room_for_many_connections() -> None:
    home, relay = directives(HOME_UNIT), directives(RELAY_UNIT)
    assert home["StateDirectory"] == ["tunneld"]  # bans, ACME account, certificates
    assert home["StateDirectoryMode"] == ["0700"]
    assert int(relay["LimitNOFILE"][-1]) >= 65536


def test_units_match_the_example_configs_paths() -> None:
    # The conf/ examples' sockets and state folder are the units' directories.
    conf = UNITS.parent / "conf"
    assert '"/run/tunneld/control.sock"' in (conf / "tunneld.toml").read_text()
    assert '"/var/lib/tunneld"' in (conf / "tunneld.toml").read_text()
    assert '"/run/tunneld-relay/control.sock"' in (conf / "relay.toml").read_text()
    assert directives(HOME_UNIT)["RuntimeDirectory"] == ["tunneld"]
    assert directives(RELAY_UNIT)["RuntimeDirectory"] == ["tunneld-relay"]


@pytest.mark.parametrize("unit", [HOME_UNIT, RELAY_UNIT], ids=lambda p: p.name)
def test_units_run_on_a_32_bit_userland_under_a_64_bit_kernel(unit: Path) -> None:
    # Raspberry Pi OS armhf on a Pi 4/5: `native` is arm64 there, python3 is arm (issue 22).
    archs = directives(unit).get("SystemCallArchitectures")
    assert archs is None or "arm" in archs[-1].split(), archs
    assert "32-bit" in unit.read_text() and "SystemCallArchitectures" in unit.read_text()
    assert directives(unit)["SystemCallFilter"] == ["@system-service"]
