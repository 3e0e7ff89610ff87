"""[access] end to end: real relay, daemon and demo app; clients on 127.0.0.0/8.

The rules go to the relay over the session and are enforced there before a
byte crosses: a refused client never shows in the daemon's stream count, and
the relay counts it by reason. Home Assistant's ip_bans.yaml is followed live,
and reloads (SIGHUP) apply at once; a bad CIDR keeps the running rules.
"""

from __future__ import annotations

import signal
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.integration.harness import World, split_response, tunneld, wait_for
from tunneld.control import get_json

pytestmark = pytest.mark.integration

DENIED = "127.0.0.41"
OTHER = "127.0.0.42"
HA_BANNED = "127.0.0.43"


def ha_bans_file(world: World) -> Path:
    return world.root / "ha-config" / "ip_bans.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("access") / "w")
    ha_bans_file(w).parent.mkdir(parents=True)
    w.home_overrides = {
        "access": {"deny": [f"{DENIED}/32"]},
        "watchdog": {"home_assistant_bans": str(ha_bans_file(w))},
    }
    try:
        w.start_app()
        w.start_relay()
        w.start_home()
        yield w
    finally:
        w.stop_all()


def status(world: World, which: str) -> dict[str, Any]:
    answer = trio.run(get_json, world.root / "run" / f"{which}.sock", "/v1/status")
    assert isinstance(answer, dict)
    return answer


def refusals(world: World, reason: str) -> int:
    return int(status(world, "relay")["connections"]["refused"].get(reason, 0))


def home_streams(world: World) -> int:
    return int(status(world, "home")["streams"]["total"])


def get(world: World, source: str) -> int:
    """The status of GET /small from `source`, 0 when the connection is cut first."""
    try:
        return split_response(world.http_get("/small", source, timeout=10))[0]
    except (OSError, ssl.SSLError):
        return 0


def refused_at_the_relay(world: World, source: str, reason: str) -> bool:
    """True once `source` is cut at the relay, counted under `reason`, unseen by the
    daemon; False while the relay does not refuse it yet (until the rules reach the
    relay, the daemon resets such a stream itself)."""
    streams, before = home_streams(world), refusals(world, reason)
    if get(world, source) != 0:
        return False
    try:  # the client may see its reset before the relay's task has counted it
        wait_for(lambda: refusals(world, reason) > before, timeout=2, what=f"{reason}")
    except AssertionError:
        return False  # cut by the daemon, not yet by the relay
    assert refusals(world, reason) == before + 1
    assert home_streams(world) == streams  # the daemon never saw the client
    return True


def relay_rules(world: World) -> int:
    sessions = status(world, "relay")["sessions"]
    return int(sessions[0]["access_rules"]) if len(sessions) == 1 else -1


def reload_home(world: World, **access: Any) -> dict[str, Any]:
    before = status(world, "home")["config"]["reloads"]
    world.write_home_config(access=access)
    world.home.popen.send_signal(signal.SIGHUP)
    return wait_for(
        lambda: (st := status(world, "home"))["config"]["reloads"] > before and st,
        what="the reload",
    )


def test_a_denied_client_is_refused_at_the_relay_and_the_home_never_sees_it(
    world: World,
) -> None:
    wait_for(lambda: relay_rules(world) == 1, what="the rules at the relay")
    assert status(world, "home")["access"]["relay_enforces"] is True
    assert refused_at_the_relay(world, DENIED, "access_denied")
    assert get(world, OTHER) == 200
    human = tunneld("status", "-c", str(world.home_config)).stdout
    assert "  access      allow 0, deny 1, Home Assistant bans 0 (" in human
    assert "; enforced at the relay" in human
    assert f"refused {DENIED} for " in world.relay.log()
    assert "access_denied by the home's [access] rules" in world.relay.log()


def test_home_assistant_bans_are_followed_within_seconds(world: World) -> None:
    path = ha_bans_file(world)
    assert get(world, HA_BANNED) == 200
    path.write_text(
        f"{OTHER}x:\n  banned_at: 'not an address: ignored'\n"
        f"{HA_BANNED}:\n  banned_at: '2026-12-05T12:00:00.000000+00:00'\n"
    )
    wait_for(
        lambda: refused_at_the_relay(world, HA_BANNED, "access_denied"),
        timeout=10,
        what="Home Assistant's ban at the relay",
    )
    assert status(world, "home")["access"]["home_assistant_bans"]["addresses"] == 1
    assert f"denied {HA_BANNED} at the relay: banned by Home Assistant" in world.home.log()
    assert get(world, OTHER) == 200
    path.write_text("")  # Home Assistant lifted it
    wait_for(lambda: get(world, HA_BANNED) == 200, timeout=10, what="the ban lifted")
    assert f"admitted {HA_BANNED} again: Home Assistant lifted its ban" in world.home.log()


def test_an_allow_list_admits_only_its_networks_and_reloads_apply_live(world: World) -> None:
    inside, outside = "127.0.0.50", "127.0.0.60"
    st = reload_home(world, allow=["127.0.0.48/29"], deny=[])
    assert st["access"]["allow"] == ["127.0.0.48/29"]
    wait_for(
        lambda: refused_at_the_relay(world, outside, "access_not_allowed"),
        what="the allow list at the relay",
    )
    assert get(world, inside) == 200
    assert get(world, DENIED) == 0  # outside the allow list too

    # A bad CIDR: the reload fails naming the key, the running rules stay.
    world.write_home_config(access={"allow": ["127.0.0.300/29"]})
    world.home.popen.send_signal(signal.SIGHUP)
    error = wait_for(
        lambda: status(world, "home")["config"]["last_error"], what="the failed reload"
    )
    assert f"{world.home_config}: [access] allow: " in error
    assert refused_at_the_relay(world, outside, "access_not_allowed")
    assert get(world, inside) == 200

    st = reload_home(world, allow=[], deny=[f"{DENIED}/32"])  # back as the module began
    wait_for(lambda: get(world, outside) == 200, what="the allow list lifted")
    assert refused_at_the_relay(world, DENIED, "access_denied")
