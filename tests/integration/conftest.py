"""Fixtures shared by the end-to-end tests: one World of real processes per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import World


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    """Relay, daemon and app files in tmp_path; every process stopped afterwards."""
    w = World(tmp_path / "w")
    try:
        yield w
    finally:
        w.stop_all()


@pytest.fixture
def running(world: World) -> World:
    world.start_all()
    return world
