"""Config reload on SIGHUP, the parts both roles share.

`Settings` is the one place a running process keeps its config: components that
can change live read `settings.current` (or are handed the new section) when
they use a value, instead of copying values at start. A reload reads and
validates the whole file first; only a config that loads completely replaces
the running one, and keys that need a restart keep their running values (and
are named in the log), so `.current` always describes what really runs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Generic, TypeVar

import trio

from tunneld.config import HomeConfig, RelayConfig, load_config
from tunneld.errors import ConfigError
from tunneld.logs import LEVELS
from tunneld.systemd import notify

__all__ = [
    "ReloadPlan",
    "Settings",
    "Starter",
    "TaskSlot",
    "changed_keys",
    "keep_running_values",
    "load_new",
    "notify_reloaded",
    "notify_reloading",
    "plan",
    "set_log_level",
]

log = logging.getLogger("tunneld.reload")

C = TypeVar("C", HomeConfig, RelayConfig)


class Settings(Generic[C]):
    """The running config and what the last reload came to (shown in status)."""

    def __init__(self, config: C) -> None:
        self.current: C = config
        self.loaded_at = time.time()
        self.reloads = 0
        self.last_error: str | None = None  # the last reload's failure; None once one works
        self.needs_restart: tuple[str, ...] = ()  # "[table] key"s changed but not applied

    def replace(self, config: C, needs_restart: Iterable[str]) -> None:
        self.current = config
        self.loaded_at = time.time()
        self.reloads += 1
        self.last_error = None
        self.needs_restart = tuple(needs_restart)

    def status(self) -> dict[str, Any]:
        return {
            "path": str(self.current.path),
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
            "reloads": self.reloads,
            "last_error": self.last_error,
            "needs_restart": list(self.needs_restart),
        }

    def warnings(self) -> list[str]:
        out = []
        if self.last_error:
            out.append(f"the last reload failed, the previous config still runs: {self.last_error}")
        if self.needs_restart:
            out.append(f"changed but not applied until a restart: {', '.join(self.needs_restart)}")
        return out


@dataclasses.dataclass(frozen=True)
class ReloadPlan(Generic[C]):
    """A validated new config and how it differs from the running one."""

    config: C  # what will run: the new file, with restart-only keys kept at running values
    changed: tuple[str, ...]  # "[table] key" applied live
    needs_restart: tuple[str, ...]  # "[table] key" that keep their running values


def load_new(settings: Settings[C]) -> C:
    """Read the running config's file again; ConfigError if invalid or of the other role."""
    old = settings.current
    new = load_config(old.path)
    if type(new) is not type(old):
        role = "relay" if isinstance(old, RelayConfig) else "home"
        raise ConfigError(f"{old.path}: is no longer a {role} config")
    return new  # type: ignore[return-value]  # same type as `old`, checked above


def changed_keys(old: HomeConfig | RelayConfig, new: HomeConfig | RelayConfig) -> list[str]:
    """`[table] key` for every value that differs between two configs of one role."""
    out: list[str] = []
    for table in dataclasses.fields(old):
        if table.name == "path":
            continue
        a, b = getattr(old, table.name), getattr(new, table.name)
        if not dataclasses.is_dataclass(a):  # a list of tables ([[route]])
            if a != b:
                out.append(f"[[{table.name}]]")
            continue
        for f in dataclasses.fields(a):
            if f.init and getattr(a, f.name) != getattr(b, f.name):
                out.append(f"[{_shown(table.name)}] {f.name}")
    return out


def _shown(table: str) -> str:
    """The TOML name of a config table (RelayConfig.relay_acme is [relay.acme])."""
    return "relay.acme" if table == "relay_acme" else table


def keep_running_values(
    old: C, new: C, restart_only: Iterable[tuple[str, str]]
) -> tuple[C, tuple[str, ...]]:
    """`new` with each (table, key) of `restart_only` set back to its running value.

    Returns it and the `[table] key`s that differed (those need a restart).
    """
    kept: dict[str, dict[str, Any]] = {}
    pending: list[str] = []
    for table, key in restart_only:
        running = getattr(getattr(old, table), key)
        if getattr(getattr(new, table), key) != running:
            kept.setdefault(table, {})[key] = running
            pending.append(f"[{_shown(table)}] {key}")
    sections = {t: dataclasses.replace(getattr(new, t), **values) for t, values in kept.items()}
    return dataclasses.replace(new, **sections), tuple(pending)


def plan(settings: Settings[C], new: C, restart_only: Iterable[tuple[str, str]]) -> ReloadPlan[C]:
    merged, pending = keep_running_values(settings.current, new, restart_only)
    # `current` holds the running values of restart-only keys, so a key changed by an
    # earlier reload is found pending again (and no longer once the file reverts it).
    return ReloadPlan(merged, tuple(changed_keys(settings.current, merged)), pending)


def set_log_level(level: str) -> None:
    logging.getLogger("tunneld").setLevel(LEVELS.get(level, logging.INFO))


def notify_reloading() -> None:
    # systemd wants the CLOCK_MONOTONIC time with RELOADING=1 (Type=notify-reload needs it).
    notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")


def notify_reloaded(status: str) -> None:
    notify("READY=1", f"STATUS={status}")


def log_outcome(path: object, result: ReloadPlan[Any], log_level: str) -> None:
    """Log what the reload did, and switch to the new log level: so the lines are seen
    under the old level when it is quieter, under the new one when that is."""
    quieter = LEVELS.get(log_level, logging.INFO) > logging.getLogger("tunneld").level
    if not quieter:
        set_log_level(log_level)
    if result.changed:
        log.info("reloaded %s: applied %s", path, ", ".join(result.changed))
    else:
        log.info("reloaded %s: nothing changed", path)
    if result.needs_restart:
        log.warning(
            "reload of %s: not applied until a restart: %s",
            path,
            ", ".join(result.needs_restart),
        )
    if quieter:
        set_log_level(log_level)


def log_failure(settings: Settings[Any], error: str) -> None:
    settings.last_error = error
    log.error("reload failed, the running config stays in force: %s", error)


Starter = Callable[..., Awaitable[None]]  # `async def run(*, task_status)`


class TaskSlot:
    """Runs one long-lived task (started with `nursery.start`); `restart` swaps it for
    another, e.g. the certificate manager for one built from the reloaded config."""

    def __init__(self, run: Starter) -> None:
        self._run = run
        self._scope = trio.CancelScope()

    def restart(self, run: Starter) -> None:
        self._run = run
        self._scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        while True:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self._run)
                    if not started:
                        task_status.started()
                        started = True
                await trio.sleep_forever()  # the task ended by itself: wait for a restart
