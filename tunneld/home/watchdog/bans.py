"""The ban list at home: in memory for the daemon, persisted as `bans.json` in the state directory.

A ban names a client address (`198.51.100.4`, `2001:db8::7`) or a whole IPv6
/64 (`2001:db8:1:2::/64`, with `[watchdog] ipv6_prefix = 64`) and an expiry
(Unix time, None = until removed).

Durability: the file is only ever replaced whole (temp file in the same folder,
fsync, rename, fsync the folder), so a crash at any moment leaves either the
old or the new list, never a torn one. Writers (the daemon, and `tunneld bans`
while the daemon is stopped) hold `fcntl.flock` on `bans.json.lock`; the file
keeps its owner and mode across rewrites. The daemon writes from one task, off
the event loop, coalescing bursts of changes into one write; `flush()` waits
until a change is on disk (what "committed" means for the control socket).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from tunneld.config import IPNetwork
from tunneld.errors import TunneldError
from tunneld.files import atomic_write
from tunneld.netaddr import normalize_ip
from tunneld.wire.events import BanEntry

__all__ = [
    "BANS_FILE",
    "BanFile",
    "BanList",
    "BanRecord",
    "CorruptBanFile",
    "ban_key",
    "covering_keys",
    "iso",
    "never_banned",
    "parse_target",
]

log = logging.getLogger("tunneld.bans")

BANS_FILE = "bans.json"
FORMAT = 1
LOCK_TIMEOUT = 10.0
_TEMP_PREFIX = ".bans."
_TEMP_SUFFIX = ".tmp"
RETRY_DELAY = 5.0  # after a failed write
LIFTED = 0.0  # `until` of a BAN entry that lifts a ban (any past time does)

Listener = Callable[[tuple[BanEntry, ...], bool], None]  # (entries, replace)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# ---------------------------------------------------------------- ban keys


def ban_key(ip: str, ipv6_prefix: int = 128) -> str:
    """The key a client address is banned under: itself, or its /64 when ipv6_prefix is 64."""
    addr = ipaddress.ip_address(normalize_ip(ip))
    if addr.version == 6 and ipv6_prefix == 64:
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)


def covering_keys(ip: str) -> tuple[str, ...]:
    """Every key whose ban covers client `ip` (normalized): the address, and for IPv6 its /64."""
    if ":" not in ip:
        return (ip,)
    return ip, str(ipaddress.ip_network(f"{ip}/64", strict=False))


def parse_target(text: str, ipv6_prefix: int = 128) -> str:
    """A user-given address or IPv6 /64 network as a ban key; ValueError with a clear message."""
    text = text.strip()
    if "/" not in text:
        try:
            return ban_key(text, ipv6_prefix)
        except ValueError:
            raise ValueError(f"not an IP address: {text!r}") from None
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"not an IP address or network: {text!r}") from None
    if net.prefixlen == net.max_prefixlen:
        return ban_key(str(net.network_address), ipv6_prefix)
    if net.version == 6 and net.prefixlen == 64:
        return str(net)
    raise ValueError(f"only single addresses and IPv6 /64 networks can be banned, got {text!r}")


def wire_ip(key: str) -> str:
    # A /64 travels as its network address (interface id zero): PROTOCOL.md, BAN.
    return key.split("/", 1)[0]


def never_banned(key: str, never_ban: Sequence[IPNetwork]) -> IPNetwork | None:
    """The `never_ban` network that protects `key` (address or /64), if any."""
    if not never_ban:
        return None
    net = ipaddress.ip_network(key, strict=False)
    for protected in never_ban:
        if protected.version == net.version and net.overlaps(protected):  # type: ignore[arg-type]
            return protected
    return None


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class BanRecord:
    ip: str  # a ban key: address or IPv6 /64 network
    until: float | None  # Unix time; None = until removed
    reason: str = ""
    since: float = 0.0

    def active(self, now: float) -> bool:
        return self.until is None or self.until > now

    def entry(self) -> BanEntry:
        return BanEntry(wire_ip(self.ip), self.until)

    def to_json(self) -> dict[str, Any]:
        """The control socket's and `bans list --json`'s form (times in ISO 8601 UTC)."""
        return {
            "ip": self.ip,
            "until": iso(self.until),
            "reason": self.reason,
            "since": iso(self.since),
        }

    def to_file(self) -> dict[str, Any]:
        return {"ip": self.ip, "until": self.until, "reason": self.reason, "since": self.since}

    @classmethod
    def from_file(cls, obj: object) -> BanRecord:
        if not isinstance(obj, dict):
            raise ValueError("a ban must be an object")
        ip = obj.get("ip")
        if not isinstance(ip, str):
            raise ValueError('a ban needs an "ip" string')
        key = parse_target(ip)
        until = _number(obj.get("until"), "until", optional=True)
        reason = obj.get("reason", "")
        if not isinstance(reason, str):
            raise ValueError(f'{ip}: "reason" must be a string')
        since = _number(obj.get("since", 0.0), "since", optional=False)
        assert since is not None
        return cls(key, until, reason, since)


def _number(value: object, what: str, *, optional: bool) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f'"{what}" must be a number (Unix time)' + " or null" * optional)
    return float(value)


# ---------------------------------------------------------------- the file


class CorruptBanFile(TunneldError):
    """`bans.json` exists but does not hold a ban list (edited by hand, say)."""


class BanFile:
    """`bans.json` and its lock file; every method is blocking (call from a thread in trio)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    @contextlib.contextmanager
    def locked(self, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        """Hold the exclusive lock; TunneldError if another writer keeps it past `timeout`."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Read-only is enough for flock, and lets a lock file created by root stay usable.
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise TunneldError(f"cannot open {self.lock_path}: {exc.strerror or exc}") from None
        try:
            _match_owner(fd, self.path.parent)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise TunneldError(f"cannot lock {self.lock_path}: {exc}") from None
                if time.monotonic() > deadline:
                    raise TunneldError(f"{self.lock_path} stayed locked for {timeout:g}s")
                time.sleep(0.02)
            yield
        finally:
            os.close(fd)  # releases the lock

    def read(self) -> list[BanRecord]:
        """The stored bans (expired ones too); [] without a file. TunneldError if unreadable."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise TunneldError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or not isinstance(data.get("bans"), list):
                raise ValueError('expected an object with a "bans" list')
            if data.get("format", FORMAT) != FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
            return [BanRecord.from_file(item) for item in data["bans"]]
        except ValueError as exc:
            raise CorruptBanFile(f"{self.path}: not a valid ban list: {exc}") from None

    def write(self, records: Iterable[BanRecord]) -> None:
        """Replace the file atomically (the caller holds the lock)."""
        body = {"format": FORMAT, "bans": [r.to_file() for r in records]}
        data = json.dumps(body, indent=1).encode() + b"\n"
        try:
            # A file already there keeps its owner and mode (an offline edit by root, say).
            atomic_write(
                self.path,
                data,
                mode=None,
                keep_existing_mode=True,
                temp_prefix=_TEMP_PREFIX,
                temp_suffix=_TEMP_SUFFIX,
            )
        except OSError as exc:
            raise TunneldError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def remove_stale_temps(self) -> None:
        """Temp files left by a crash mid-write (the caller holds the lock)."""
        with contextlib.suppress(OSError):
            for entry in self.path.parent.iterdir():
                name = entry.name
                if name.startswith(_TEMP_PREFIX) and name.endswith(_TEMP_SUFFIX):
                    entry.unlink(missing_ok=True)

    def load(self) -> list[BanRecord]:
        with self.locked():
            self.remove_stale_temps()
            return self.read()

    def save(self, records: Iterable[BanRecord]) -> None:
        with self.locked():
            self.write(records)


def _match_owner(fd: int, directory: Path) -> None:
    # root running `tunneld bans` must not leave a lock file the daemon's user cannot open.
    if os.geteuid() != 0:
        return
    with contextlib.suppress(OSError):
        st = os.stat(directory)
        if os.fstat(fd).st_uid != st.st_uid:
            os.fchown(fd, st.st_uid, st.st_gid)


# ---------------------------------------------------------------- the daemon's list


class BanList:
    """The daemon's bans: lookups on the hot path, one writer task, one expiry task.

    Without a file (tests, a bare StreamHandler) it only lives in memory.
    Listeners hear every change as BAN entries (the connector forwards them).
    """

    def __init__(self, file: BanFile | None = None, *, clock: Callable[[], float] = time.time):
        self.file = file
        self.clock = clock
        self._bans: dict[str, BanRecord] = {}
        self.listeners: list[Listener] = []
        self.ready = trio.Event()
        self.write_error: str | None = None
        self._version = 0
        self._saved = 0
        self._dirty = trio.Event()
        self._written = trio.Event()
        self._changed = trio.Event()  # wakes the expiry task

    # -- lookups ------------------------------------------------------------------
    def covering(self, ip: str) -> BanRecord | None:
        """The active ban covering normalized client address `ip`, if any."""
        if not self._bans:
            return None
        now = self.clock()
        for key in covering_keys(ip):
            record = self._bans.get(key)
            if record is not None and record.active(now):
                return record
        return None

    def active(self) -> list[BanRecord]:
        now = self.clock()
        return sorted((r for r in self._bans.values() if r.active(now)), key=_order)

    def __len__(self) -> int:
        return len(self._bans)

    # -- changes ------------------------------------------------------------------
    def add(self, key: str, duration: float | None, reason: str) -> BanRecord:
        """Ban `key` for `duration` seconds (None = until removed), replacing any ban on it."""
        now = self.clock()
        record = BanRecord(key, None if duration is None else now + duration, reason, now)
        self._bans[key] = record
        log.warning("banned %s (%s): %s", key, _expiry(record), reason)
        self._commit((record.entry(),))
        return record

    def remove(self, ip: str, reason: str) -> list[BanRecord]:
        """Lift every ban covering `ip` (an address or a /64 key); returns the lifted ones."""
        keys = covering_keys(ip) if "/" not in ip else (ip,)
        lifted = [self._bans.pop(k) for k in keys if k in self._bans]
        for record in lifted:
            log.warning("unbanned %s (was %s): %s", record.ip, _expiry(record), reason)
        if lifted:
            self._commit(tuple(BanEntry(wire_ip(r.ip), LIFTED) for r in lifted))
        return lifted

    def expire(self) -> list[BanRecord]:
        """Drop expired bans (the relay expires its copies on its own clock)."""
        now = self.clock()
        gone = [r for r in self._bans.values() if not r.active(now)]
        for record in gone:
            del self._bans[record.ip]
            log.warning("unbanned %s (was %s): expired", record.ip, _expiry(record))
        if gone:
            self._commit(())
        return gone

    def _commit(self, entries: tuple[BanEntry, ...]) -> None:
        self._version += 1
        self._dirty.set()
        self._changed.set()
        if entries:
            for listener in list(self.listeners):
                listener(entries, False)

    # -- persistence ----------------------------------------------------------------
    def _load_records(self, records: Iterable[BanRecord]) -> None:
        now = self.clock()
        for record in records:
            if record.active(now):
                self._bans[record.ip] = record

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the file, then write changes and expire bans until cancelled."""
        file = self.file
        if file is not None:
            try:
                records = await trio.to_thread.run_sync(file.load)
            except CorruptBanFile as exc:
                records = await trio.to_thread.run_sync(_set_aside, file, str(exc))
            self._load_records(records)
            log.info("loaded %d ban(s) from %s", len(self._bans), file.path)
        self.ready.set()
        self._changed.set()
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                if file is not None:
                    nursery.start_soon(self._writer, file)
                nursery.start_soon(self._expirer)
        finally:
            if file is not None and self._saved < self._version:
                with trio.CancelScope(shield=True), trio.move_on_after(LOCK_TIMEOUT):
                    await self._write_once(file)

    async def flush(self) -> None:
        """Wait until every change made so far is on disk; TunneldError if the write fails."""
        if self.file is None:
            return
        target = self._version
        while self._saved < target:
            written = self._written
            await written.wait()
            if self._saved < target and self.write_error is not None:
                raise TunneldError(f"the ban list could not be saved: {self.write_error}")

    async def _writer(self, file: BanFile) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            while self._saved < self._version:
                if not await self._write_once(file):
                    await trio.sleep(RETRY_DELAY)

    async def _write_once(self, file: BanFile) -> bool:
        version = self._version
        snapshot = sorted(self._bans.values(), key=_order)
        try:
            # Not cancellable: a started write always completes (or fails) as a whole.
            await trio.to_thread.run_sync(file.save, snapshot)
        except TunneldError as exc:
            if self.write_error != str(exc):
                log.error("%s", exc)
            self.write_error = str(exc)
            ok = False
        else:
            self._saved = max(self._saved, version)
            self.write_error = None
            ok = True
        self._written.set()
        self._written = trio.Event()
        return ok

    async def _expirer(self) -> None:
        while True:
            self._changed = trio.Event()
            self.expire()
            now = self.clock()
            ends = [r.until for r in self._bans.values() if r.until is not None]
            wait = max(0.0, min(ends) - now) if ends else math.inf
            with trio.move_on_after(wait):
                await self._changed.wait()


def _order(record: BanRecord) -> tuple[float, str]:
    return (record.since, record.ip)


def _expiry(record: BanRecord) -> str:
    return f"until {iso(record.until)}" if record.until is not None else "permanent"


def _set_aside(file: BanFile, problem: str) -> list[BanRecord]:
    """An unreadable ban list is kept for the user to inspect; the daemon starts empty."""
    aside = file.path.with_name(f"{file.path.name}.bad-{int(time.time())}")
    with file.locked():
        try:
            return file.read()  # fixed meanwhile?
        except CorruptBanFile:
            pass
        try:
            os.replace(file.path, aside)
        except OSError as exc:
            raise TunneldError(f"{problem}; and cannot move it aside: {exc}") from None
    log.error("%s; moved it to %s and started with an empty ban list", problem, aside)
    return []
