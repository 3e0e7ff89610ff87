"""Reload planning: what changed, what applies live, what waits for a restart."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import trio
import trio.testing

from tunneld.config import DaemonSection, HomeConfig, HomeRelaySection, TlsSection
from tunneld.home.reload import RESTART_ONLY
from tunneld.reload import Settings, Starter, TaskSlot, changed_keys, plan

SECRET = "tunneld1.c2VjcmV0.c2ln"


def home(**daemon: object) -> HomeConfig:
    return HomeConfig(
        path=Path("/etc/tunneld/tunneld.toml"),
        relay=HomeRelaySection(url="wss://relay.example.com/v1/tunnel", token=SECRET),
        tls=TlsSection(hostnames=("home.example.com",)),
        daemon=DaemonSection(**daemon),  # type: ignore[arg-type]
    )


def test_changed_keys_name_table_and_key_never_values() -> None:
    old = home()
    new = dataclasses.replace(
        old,
        relay=dataclasses.replace(old.relay, token="tunneld1.bmV3.c2ln"),
        tls=TlsSection(hostnames=("home.example.com", "ha.example.com")),
    )
    keys = changed_keys(old, new)
    assert keys == ["[relay] token", "[tls] hostnames"]
    assert SECRET not in repr(keys)


def test_restart_only_keys_keep_their_running_value_until_the_file_reverts() -> None:
    settings = Settings(home())
    new = home(control_socket=Path("/tmp/other.sock"), log_level="debug")
    result = plan(settings, new, RESTART_ONLY)
    assert result.changed == ("[daemon] log_level",)
    assert result.needs_restart == ("[daemon] control_socket",)
    assert result.config.daemon.control_socket == Path("/run/tunneld/control.sock")
    assert result.config.daemon.log_level == "debug"
    settings.replace(result.config, result.needs_restart)
    assert settings.reloads == 1
    assert settings.warnings() == [
        "changed but not applied until a restart: [daemon] control_socket"
    ]
    # The same file again: still pending. The file reverted: nothing pending.
    assert plan(settings, new, RESTART_ONLY).needs_restart == ("[daemon] control_socket",)
    again = plan(settings, home(log_level="debug"), RESTART_ONLY)
    assert again.needs_restart == () and again.changed == ()


def test_a_failed_reload_is_remembered_until_one_works() -> None:
    settings = Settings(home())
    settings.last_error = "tunneld.toml: [upstream] url: expected ..."
    assert "the last reload failed" in settings.warnings()[0]
    assert settings.status()["last_error"] == settings.last_error
    settings.replace(home(), ())
    assert settings.warnings() == [] and settings.status()["last_error"] is None


async def test_task_slot_restarts_the_task_with_a_new_one() -> None:
    runs: list[str] = []
    finished: list[str] = []

    def task(name: str, forever: bool) -> Starter:
        async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            runs.append(name)
            task_status.started()
            try:
                if forever:
                    await trio.sleep_forever()
            finally:
                finished.append(name)

        return run

    slot = TaskSlot(task("first", True))
    async with trio.open_nursery() as nursery:
        await nursery.start(slot.run)
        assert runs == ["first"]
        slot.restart(task("second", False))
        await trio.testing.wait_all_tasks_blocked()
        assert runs == ["first", "second"] and finished == ["first", "second"]
        slot.restart(task("third", True))
        await trio.testing.wait_all_tasks_blocked()
        assert runs == ["first", "second", "third"]
        nursery.cancel_scope.cancel()
    assert finished == ["first", "second", "third"]
