"""The one signal runner of the long-running processes (`tunneld relay`, `tunneld run`).

SIGHUP reloads the config (a bad one keeps the old running), SIGTERM and SIGINT
stop: `stop()` makes `run()` drain and return. The signal receiver is open before
`run()` starts, so a signal during startup is not lost; the watcher task lives in
the same nursery as `run()` and ends with it.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from tunneld.errors import first_error

__all__ = ["run_until_signalled"]


async def run_until_signalled(
    run: Callable[[], Awaitable[None]],
    *,
    reload: Callable[[], Awaitable[object]],
    stop: Callable[[], None],
    config_path: Callable[[], Path | str | None],
    log: logging.Logger,
) -> int:
    """Run `run()` until it returns, answering signals meanwhile; 0 when it does.

    `config_path()` names the file a reload reads (it may change with a reload).
    A nursery's group of errors is raised as its first real error (`first_error`).
    """
    failure: BaseException | None = None
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("received SIGHUP: reloading %s", config_path())
                        await reload()
                        continue
                    log.info("received %s: shutting down", signal.Signals(signum).name)
                    stop()
                    return

            nursery.start_soon(watch_signals)
            try:
                await run()
            except BaseExceptionGroup as group:
                failure = first_error(group)
                if failure is group:  # nothing but cancellation: let it go on its way
                    raise
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure  # out here, so this nursery does not wrap it in a group again
    return 0
