"""[access] without sockets: the rules, Home Assistant's ban file, the BAN frame's
access key, and that an old relay and an old daemon read the new frames as before."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import trio
import trio.testing

from tests.transport.test_session import session_pair
from tunneld.access import DENIED, NOT_ALLOWED, AccessPolicy
from tunneld.config import load_home_config
from tunneld.errors import RemoteProtocolError
from tunneld.home.access import AccessControl, parse_ip_bans
from tunneld.home.certs import CertificateStore
from tunneld.home.streams import StreamHandler
from tunneld.wire import events as ev
from tunneld.wire import frames

# frames.py as tunneld 0.1.0 shipped it (before the access key), kept as data.
OLD_FRAMES = Path(__file__).parent / "wire" / "data" / "frames_protocol1_v0_1_0.py.txt"


def old_frames() -> ModuleType:
    spec = importlib.util.spec_from_loader("old_frames", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_frames"] = module  # dataclasses and typing look their module up
    exec(compile(OLD_FRAMES.read_text(), str(OLD_FRAMES), "exec"), module.__dict__)
    return module


# -- the rules -----------------------------------------------------------------------
def test_deny_wins_and_an_allow_list_admits_only_its_networks() -> None:
    policy = AccessPolicy(
        [ev.AccessRule("*", allow=("192.0.2.0/24", "2001:db8::/32"), deny=("192.0.2.66/32",))]
    )
    assert policy.refusal("192.0.2.1", "ha.example.test") is None
    assert policy.refusal("2001:db8::5", "ha.example.test") is None
    assert policy.refusal("192.0.2.66", "ha.example.test") == DENIED
    assert policy.refusal("198.51.100.1", "ha.example.test") == NOT_ALLOWED
    assert policy.refusal("::1", "ha.example.test") == NOT_ALLOWED


def test_a_hostnames_own_rule_applies_alone() -> None:
    policy = AccessPolicy(
        [ev.AccessRule("*", deny=("10.0.0.0/8",)), ev.AccessRule("b.test", allow=("10.1.0.0/16",))]
    )
    assert policy.refusal("10.1.2.3", "a.test") == DENIED
    assert policy.refusal("10.1.2.3", "b.test") is None
    assert policy.refusal("10.2.0.1", "b.test") == NOT_ALLOWED
    assert not AccessPolicy() and AccessPolicy().refusal("10.1.2.3", "a.test") is None


# -- Home Assistant's ip_bans.yaml -----------------------------------------------------
HA_BANS = """\
192.0.2.7:
  banned_at: '2026-12-05T12:00:00.000000+00:00'
'198.51.100.4':
  banned_at: '2026-12-05T12:01:00.000000+00:00'
2001:db8::7:
  banned_at: '2026-12-05T12:02:00.000000+00:00'
"::ffff:203.0.113.5": {banned_at: '2026-12-05T12:03:00+00:00'}
not-an-address:
  banned_at: x
192.0.2.7:
  banned_at: again
"""


def test_ip_bans_yaml_top_level_keys_are_the_addresses() -> None:
    assert parse_ip_bans(HA_BANS) == ["192.0.2.7", "198.51.100.4", "2001:db8::7", "203.0.113.5"]
    assert parse_ip_bans("") == []
    assert parse_ip_bans("{}\n") == []


def _home(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "tunneld.toml"
    path.write_text(
        '[relay]\nurl = "wss://relay.example.test/v1/tunnel"\n'
        'token = "tunneld1.e30.c2lnbmF0dXJl"\n'
        '[tls]\nhostnames = ["ha.example.test", "cam.example.test"]\n' + extra
    )
    return path


def test_rules_from_config_and_ha_bans_and_their_changes(tmp_path: Path) -> None:
    bans = tmp_path / "ip_bans.yaml"
    config = load_home_config(
        _home(
            tmp_path,
            f'[watchdog]\nhome_assistant_bans = "{bans}"\n'
            '[access]\nallow = ["192.0.2.0/24"]\n'
            '[access.hostnames."cam.example.test"]\nallow = ["198.51.100.0/24"]\n'
            'deny = ["198.51.100.9"]\n',
        )
    )
    access = AccessControl(config)
    pushed: list[tuple[ev.AccessRule, ...]] = []
    access.listeners.append(pushed.append)
    assert access.ha_bans == () and access.ha_error is None  # no file yet: nobody banned
    assert access.rules() == (
        ev.AccessRule("*", ("192.0.2.0/24",), ()),
        ev.AccessRule("cam.example.test", ("198.51.100.0/24",), ("198.51.100.9/32",)),
    )
    bans.write_text("192.0.2.7:\n  banned_at: '2026-12-05T12:00:00+00:00'\n")
    assert access._read_ha_bans()
    access._changed()
    assert access.refusal("192.0.2.7", "ha.example.test") == DENIED
    assert access.refusal("192.0.2.7", "cam.example.test") == DENIED  # everywhere
    assert pushed[-1][0].deny == ("192.0.2.7/32",)
    bans.write_text("")
    assert access._read_ha_bans() and access.ha_bans == ()
    assert not access._read_ha_bans()  # unchanged: not read again
    assert access.status(True)["home_assistant_bans"] == {
        "file": str(bans),
        "addresses": 0,
        "error": None,
    }


# -- the wire ------------------------------------------------------------------------------
RULES = (ev.AccessRule("*", ("192.0.2.0/24",), ("192.0.2.66/32", "2001:db8::/32")),)


def test_access_rules_round_trip_in_a_ban_frame() -> None:
    event = ev.Ban((), replace=False, access=RULES)
    assert frames.decode(frames.encode(event)) == [event]
    plain = ev.Ban((ev.BanEntry("192.0.2.1", None),))
    assert frames.decode(frames.encode(plain)) == [plain]  # no key: the policy is kept
    cleared = ev.Ban((), replace=False, access=())
    assert frames.decode(frames.encode(cleared)) == [cleared]


def test_a_bad_network_in_a_received_rule_is_a_protocol_error() -> None:
    bad = frames.encode(ev.Ban((), replace=False, access=RULES)).replace(b"192.0.2.0/24", b"1.2")
    bad = bad[:6] + len(bad[10:]).to_bytes(4, "big") + bad[10:]
    with pytest.raises(RemoteProtocolError, match="bad network"):
        frames.decode(bad)


def test_an_old_relay_reads_the_access_frame_as_an_empty_addition() -> None:
    old = old_frames()
    (event,) = old.decode(frames.encode(ev.Ban((), replace=False, access=RULES)))
    assert type(event).__name__ == "Ban" and event.entries == () and event.replace is False
    assert event.access is None  # ignored, as protocol 1 ignores unknown keys


def test_an_old_daemon_reads_a_new_welcome() -> None:
    welcome = ev.Welcome("s1", ("ha.example.test",), 262144, 20.0, access=True)
    (event,) = old_frames().decode(frames.encode(welcome))
    assert event.session_id == "s1" and event.access is False  # the key ignored
    assert frames.decode(frames.encode(welcome)) == [welcome]
    older = ev.Welcome("s1", ("ha.example.test",), 262144, 20.0)
    assert frames.decode(old_frames().encode(older)) == [older]  # an old relay: access False


# -- at home, for a relay that predates the rules ----------------------------------------
async def test_the_home_refuses_a_denied_stream_itself_before_tls(tmp_path: Path) -> None:
    """A relay that ignores the rules opens the stream anyway: the daemon resets it
    before reading a byte (no TLS), and counts it; another client is served."""
    config = load_home_config(
        _home(
            tmp_path,
            f'[daemon]\nstate_directory = "{tmp_path / "state"}"\n'
            '[access]\ndeny = ["192.0.2.66"]\n'
            '[access.hostnames."cam.example.test"]\nallow = ["198.51.100.0/24"]\n',
        )
    )
    certs = CertificateStore(config)
    certs.load()
    handler = StreamHandler(config, certs)
    handler.access = AccessControl(config)
    with trio.fail_after(10):
        async with session_pair(handler) as pair:
            for ip, sni in [("192.0.2.66", "HA.example.test"), ("192.0.2.1", "cam.example.test.")]:
                stream = pair.relay.open_stream(ip, 1, sni)
                with pytest.raises(trio.BrokenResourceError, match="reset"):
                    await stream.receive_some()
            assert handler.access.refused == 2 and handler.refused == 2
            allowed = pair.relay.open_stream("198.51.100.7", 1, "cam.example.test")
            await allowed.send_all(b"\x16\x03\x01\x00\x05hello")  # not refused: TLS is read
            await trio.testing.wait_all_tasks_blocked()  # the handler has its bytes
            assert handler.total == 3 and handler.refused == 2  # admitted: on to its TLS
            await allowed.aclose()
