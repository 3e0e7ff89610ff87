"""The files tunneld keeps: written atomically, read with a bound.

`atomic_write` is the one way tunneld writes a file that must never be seen half
written.
Keys, certificates, tokens' key pairs, the config `init` and `join` write, the ban
list, the CT state and the demo app's port file all go through `atomic_write`: a
scratch file in the same folder (so the rename is atomic), its mode (and owner) set
before anything else can see it, the data fsynced, then renamed over the target
(or linked, when the target must not exist yet), and the folder fsynced so the
rename survives a crash. A crash at any moment leaves the old file or the new one.

`read_key_file` is the one way keys and certificates are read: whole, but never
more than `MAX_KEY_FILE` bytes, with errors that name the file and what it is.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from tunneld.errors import KeyFileError

__all__ = ["MAX_KEY_FILE", "atomic_write", "fsync_dir", "read_key_file"]

MAX_KEY_FILE = 1 << 20  # a PEM key or certificate chain is a few KiB


def atomic_write(
    path: Path | str,
    data: bytes,
    *,
    mode: int | None,
    keep_existing_mode: bool = False,
    group: int | None = None,
    exclusive: bool = False,
    check: Callable[[Path], object] | None = None,
    temp_prefix: str | None = None,
    temp_suffix: str = ".tmp",
) -> None:
    """Replace `path` by `data`, atomically and durably.

    mode: the file's permission bits (None: mkstemp's 0600). keep_existing_mode: a
    file already at `path` keeps its mode and owner (an edit by root, say); `mode`
    applies when there is none. group: a group id to give the file. exclusive: fail
    with FileExistsError if `path` exists, checked at the instant the name appears.
    check: called with the scratch file before it takes the name; what it raises
    propagates and leaves `path` untouched. The scratch file is named
    `temp_prefix`...`temp_suffix` (default `.NAME.`...`.tmp`) and never left behind.

    Raises OSError (with the caller to turn it into its own error) and whatever
    `check` raises.
    """
    path = Path(path)
    directory = path.absolute().parent
    old: os.stat_result | None = None
    if keep_existing_mode:
        with contextlib.suppress(FileNotFoundError):
            old = os.stat(path)
    fd, name = tempfile.mkstemp(
        prefix=temp_prefix or f".{path.name}.", suffix=temp_suffix, dir=directory
    )
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:  # closes fd, also on error
            if old is not None:
                os.fchmod(fh.fileno(), stat.S_IMODE(old.st_mode))
                if (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                    os.fchown(fh.fileno(), old.st_uid, old.st_gid)
            elif mode is not None:
                os.fchmod(fh.fileno(), mode)  # explicit: the umask may have removed bits
            if group is not None:
                os.fchown(fh.fileno(), -1, group)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if check is not None:
            check(tmp)
        if exclusive:
            os.link(tmp, path)  # FileExistsError if the name was taken meanwhile
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()  # after a replace it is gone already
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable; best effort (some filesystems refuse)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_key_file(path: Path | str, what: str) -> bytes:
    """The bytes of a key or certificate file; KeyFileError naming `what` and `path`
    if it is missing, unreadable or larger than `MAX_KEY_FILE`."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"{what} {path} is too large to be a key or certificate file")
    return data
