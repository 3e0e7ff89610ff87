"""errors.first_error: the one error a boundary reports for a nursery's group."""

from __future__ import annotations

import subprocess
import sys

import trio

from tunneld.errors import ConfigError, first_error


class Cancelled(Exception):  # noqa: N818 - named like trio's on purpose
    """Not trio's: an error that happens to share the name must not be dropped."""


async def a_cancellation() -> trio.Cancelled:
    """A real trio.Cancelled (it has no public constructor)."""
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled as exc:
            return exc
    raise AssertionError("not cancelled")


async def test_cancellations_are_echoes_and_are_dropped_by_type() -> None:
    error = ConfigError("x.toml: [relay] listen: bad")
    group = BaseExceptionGroup("g", [await a_cancellation(), error, await a_cancellation()])
    assert first_error(group) is error
    assert not getattr(error, "__notes__", None)


async def test_an_error_named_cancelled_is_not_a_cancellation() -> None:
    error = Cancelled("a real failure")
    group = BaseExceptionGroup("g", [error, ConfigError("second")])
    assert first_error(group) is error


async def test_nested_groups_are_split_and_no_error_is_lost() -> None:
    first, second = ConfigError("first"), OSError(98, "Address already in use")
    inner = BaseExceptionGroup("inner", [await a_cancellation(), second])
    group = BaseExceptionGroup("outer", [await a_cancellation(), first, inner])
    assert first_error(group) is first
    assert first.__notes__ == [
        "also raised in the same task group: OSError: [Errno 98] Address already in use"
    ]


async def test_a_group_of_only_cancellations_is_returned_whole() -> None:
    group = BaseExceptionGroup("all cancelled", [await a_cancellation()])
    assert first_error(group) is group


def test_errors_imports_no_io() -> None:
    # tunneld.wire imports tunneld.errors and must stay sans-IO.
    code = "import sys, tunneld.errors, tunneld.wire.mux; print('trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
