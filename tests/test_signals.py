"""The signal runner of `tunneld relay` and `tunneld run`, with real signals."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest
import trio

from tunneld.errors import ConfigError
from tunneld.signals import run_until_signalled


async def test_sighup_reloads_and_sigterm_stops(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    stopped = trio.Event()
    reloaded = trio.Event()
    order: list[str] = []

    async def run() -> None:
        order.append("run")
        os.kill(os.getpid(), signal.SIGHUP)
        await reloaded.wait()
        os.kill(os.getpid(), signal.SIGTERM)
        await stopped.wait()  # stop() makes run() return, as a drain would
        order.append("drained")

    async def reload() -> bool:
        order.append("reload")
        reloaded.set()
        return True

    def stop() -> None:
        order.append("stop")
        stopped.set()

    with trio.fail_after(5):
        code = await run_until_signalled(
            run,
            reload=reload,
            stop=stop,
            config_path=lambda: Path("/etc/tunneld/x.toml"),
            log=logging.getLogger("tunneld.test"),
        )
    assert code == 0
    assert order == ["run", "reload", "stop", "drained"]
    assert "received SIGHUP: reloading /etc/tunneld/x.toml" in caplog.text
    assert "received SIGTERM: shutting down" in caplog.text


async def test_a_failure_in_run_is_one_error_not_a_group() -> None:
    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            raise ConfigError("x.toml: [relay] listen: cannot listen")

    async def reload() -> None:
        raise AssertionError("no signal was sent")

    with trio.fail_after(5), pytest.raises(ConfigError, match="cannot listen"):
        await run_until_signalled(
            run,
            reload=reload,
            stop=lambda: None,
            config_path=lambda: None,
            log=logging.getLogger("tunneld.test"),
        )
