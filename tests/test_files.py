"""The one atomic write: the file appears whole, with its mode, or not at all."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tunneld.files import atomic_write


@pytest.fixture
def wide_umask() -> Iterator[None]:
    old = os.umask(0o077)  # would strip the group/other bits a certificate wants
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _only(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.usefixtures("wide_umask")
@pytest.mark.parametrize("mode", [0o600, 0o644, 0o640])
def test_mode_is_set_whatever_the_umask(tmp_path: Path, mode: int) -> None:
    target = tmp_path / "f"
    atomic_write(target, b"one", mode=mode)
    assert (target.read_bytes(), _mode(target)) == (b"one", mode)
    atomic_write(target, b"two", mode=mode)
    assert (target.read_bytes(), _mode(target)) == (b"two", mode)
    assert _only(tmp_path) == ["f"]  # no scratch file left


def test_default_mode_is_owner_only(tmp_path: Path) -> None:
    atomic_write(tmp_path / "f", b"x", mode=None)
    assert _mode(tmp_path / "f") == 0o600


def test_keep_existing_mode(tmp_path: Path) -> None:
    target = tmp_path / "bans.json"
    target.write_bytes(b"old")
    target.chmod(0o640)
    atomic_write(target, b"new", mode=None, keep_existing_mode=True)
    assert (target.read_bytes(), _mode(target)) == (b"new", 0o640)


def test_exclusive_never_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "key"
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        atomic_write(target, b"new", mode=0o600, exclusive=True)
    assert target.read_bytes() == b"precious"
    assert _only(tmp_path) == ["key"]
    atomic_write(tmp_path / "other", b"new", mode=0o600, exclusive=True)
    assert (tmp_path / "other").read_bytes() == b"new"


def test_a_failed_check_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "c.toml"
    target.write_bytes(b"good")
    seen: list[bytes] = []

    def check(scratch: Path) -> None:
        seen.append(scratch.read_bytes())
        assert _mode(scratch) == 0o600  # already private while being checked
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        atomic_write(target, b"bad", mode=0o600, check=check)
    assert seen == [b"bad"]
    assert target.read_bytes() == b"good"
    assert _only(tmp_path) == ["c.toml"]


def test_a_failed_rename_leaves_no_scratch_file(tmp_path: Path) -> None:
    target = tmp_path / "dir"
    target.mkdir()
    (target / "inside").write_bytes(b"")
    with pytest.raises(OSError):
        atomic_write(target, b"x", mode=0o600)  # a non-empty folder cannot be replaced
    assert _only(tmp_path) == ["dir"]


def test_temp_names(tmp_path: Path) -> None:
    names: list[str] = []
    atomic_write(
        tmp_path / "f",
        b"x",
        mode=None,
        temp_prefix=".bans.",
        temp_suffix=".tmp",
        check=lambda p: names.append(p.name),
    )
    assert names[0].startswith(".bans.") and names[0].endswith(".tmp")
