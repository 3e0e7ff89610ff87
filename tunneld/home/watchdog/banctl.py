"""`tunneld bans list|add|remove`, and the daemon's ban endpoints on its control socket.

Online, the daemon answers (the change takes effect at once, reaches the relay,
and is on disk before the answer):

* `GET /v1/bans` -> `{"bans": [{"ip", "until", "reason", "since"}]}`
* `POST /v1/bans` with `{"ip": "198.51.100.4", "duration": "24h", "reason": "..."}`
  (`duration` and `reason` optional; `"0"` = until removed) -> `{"ban": {...}}`
* `DELETE /v1/bans?ip=198.51.100.4` -> `{"removed": [...]}`, 404 if not banned

Offline (nothing answers on the socket), the commands edit `bans.json` under
its lock. A starting daemon loads the file under the same lock, and only once
its control socket listens; so holding the lock and still finding no daemon
means no daemon can miss the edit.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import trio

from tunneld.config import HomeConfig, load_home_config, parse_duration
from tunneld.control import ControlRequest, ControlResponse, Router, get_json, request
from tunneld.errors import ConfigError, ControlError, NotRunningError, TunneldError
from tunneld.home.watchdog.bans import (
    BANS_FILE,
    BanFile,
    BanRecord,
    covering_keys,
    never_banned,
    parse_target,
)
from tunneld.home.watchdog.core import Watchdog

__all__ = ["add_ban_routes", "bans_command", "format_bans"]

FLUSH_TIMEOUT = 10.0
ADDED = "added with tunneld bans add"
REMOVED = "removed with tunneld bans remove"


# ---------------------------------------------------------------- daemon side


def add_ban_routes(router: Router, watchdog: Watchdog) -> None:
    """GET, POST and DELETE /v1/bans on the daemon's control router."""

    async def list_bans(_: ControlRequest) -> ControlResponse:
        await watchdog.bans.ready.wait()
        return ControlResponse.json({"bans": [r.to_json() for r in watchdog.ban_list()]})

    async def add_ban(req: ControlRequest) -> ControlResponse:
        await watchdog.bans.ready.wait()
        try:
            body = json.loads(req.body or b"{}")
            if not isinstance(body, dict) or not isinstance(body.get("ip"), str):
                raise ValueError('expected a JSON object with an "ip" string')
            duration = _duration(body.get("duration"), watchdog.config.ban_duration)
            reason = body.get("reason") or ADDED
            if not isinstance(reason, str):
                raise ValueError('"reason" must be a string')
            record = watchdog.ban(body["ip"], duration, reason)
        except ValueError as exc:
            return ControlResponse.error(400, str(exc))
        return await _committed(watchdog, {"ban": record.to_json()})

    async def remove_ban(req: ControlRequest) -> ControlResponse:
        await watchdog.bans.ready.wait()
        target = req.query.get("ip", "")
        try:
            lifted = watchdog.unban(target, req.query.get("reason") or REMOVED)
        except ValueError as exc:
            return ControlResponse.error(400, str(exc))
        if not lifted:
            return ControlResponse.error(404, f"{target} is not banned")
        return await _committed(watchdog, {"removed": [r.to_json() for r in lifted]})

    router.add("GET", "/v1/bans", list_bans)
    router.add("POST", "/v1/bans", add_ban)
    router.add("DELETE", "/v1/bans", remove_ban)


async def _committed(watchdog: Watchdog, answer: dict[str, Any]) -> ControlResponse:
    """Answer only once the change is on disk (it is in effect already)."""
    try:
        with trio.fail_after(FLUSH_TIMEOUT):
            await watchdog.bans.flush()
    except trio.TooSlowError:
        return ControlResponse.error(503, f"in effect, but not saved within {FLUSH_TIMEOUT:g}s")
    except TunneldError as exc:
        return ControlResponse.error(500, f"in effect, but {exc}")
    return ControlResponse.json(answer)


def _duration(value: object, default: float) -> float | None:
    """A request's duration (string like "24h", seconds, or absent) -> seconds, None = forever."""
    if value is None:
        seconds = default
    else:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError(f'"duration" must be like "24h" or "0", got {value!r}')
        seconds = parse_duration(value)  # ValueError names the value
    return seconds or None


# ---------------------------------------------------------------- the command


def bans_command(
    config_path: str,
    action: str,
    target: str | None = None,
    *,
    duration: str | None = None,
    reason: str | None = None,
    as_json: bool = False,
) -> int:
    """`tunneld bans ACTION`: against the running daemon, else against the state file."""
    config = load_home_config(config_path)
    if duration is not None:
        try:
            parse_duration(duration)
        except ValueError:
            raise ConfigError(
                f'--duration: expected a duration like "24h", got {duration!r}'
            ) from None
    socket_path = config.daemon.control_socket
    for _ in range(3):  # the daemon may start or stop between our looks
        try:
            return trio.run(_online, config, action, target, duration, reason, as_json)
        except NotRunningError:
            pass
        try:
            return _offline(config, action, target, duration, reason, as_json)
        except _DaemonStarted:
            continue
    raise TunneldError(f"the daemon keeps starting and stopping ({socket_path}); try again")


class _DaemonStarted(Exception):
    pass


async def _online(
    config: HomeConfig,
    action: str,
    target: str | None,
    duration: str | None,
    reason: str | None,
    as_json: bool,
) -> int:
    sock = config.daemon.control_socket
    if action == "list":
        answer = await get_json(sock, "/v1/bans")
        assert isinstance(answer, dict)
        _print_list(answer["bans"], as_json)
        return 0
    assert target is not None
    if action == "add":
        body: dict[str, Any] = {"ip": target}
        if duration is not None:
            body["duration"] = duration
        if reason:
            body["reason"] = reason
        status, data = await request(sock, "POST", "/v1/bans", body=json.dumps(body).encode())
        ban = _answer(status, data, "POST /v1/bans")["ban"]
        _print_change("banned", [ban], as_json)
        return 0
    path = f"/v1/bans?ip={quote(target, safe='')}"
    if reason:
        path += f"&reason={quote(reason, safe='')}"
    status, data = await request(sock, "DELETE", path)
    if status == 404:
        print(f"tunneld: {target} is not banned", file=sys.stderr)
        return 1
    _print_change("unbanned", _answer(status, data, "DELETE /v1/bans")["removed"], as_json)
    return 0


def _answer(status: int, data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        raise ControlError(f"{what}: bad answer ({status})")
    if not 200 <= status < 300:
        raise TunneldError(str(obj.get("error") or f"{what} failed with {status}"))
    return obj


def _offline(
    config: HomeConfig,
    action: str,
    target: str | None,
    duration: str | None,
    reason: str | None,
    as_json: bool,
) -> int:
    file = BanFile(config.daemon.state_directory / BANS_FILE)
    now = time.time()
    if action == "list":  # the file is only ever replaced whole: no lock needed to read
        records = [r for r in file.read() if r.active(now)]
        _print_list([r.to_json() for r in records], as_json)
        return 0
    assert target is not None
    wd = config.watchdog
    try:
        key = parse_target(target, wd.ipv6_prefix if action == "add" else 128)
    except ValueError as exc:
        raise TunneldError(str(exc)) from None
    with file.locked():
        if _daemon_answers(config):
            raise _DaemonStarted()
        bans = {r.ip: r for r in file.read() if r.active(now)}
        if action == "add":
            protected = never_banned(key, wd.never_ban)
            if protected is not None:
                raise TunneldError(f"{key} is in never_ban ({protected})")
            seconds = parse_duration(duration) if duration is not None else wd.ban_duration
            record = BanRecord(key, now + seconds if seconds else None, reason or ADDED, now)
            bans[key] = record
            file.write(bans.values())
            _print_change("banned", [record.to_json()], as_json)
            return 0
        keys = covering_keys(key) if "/" not in key else (key,)
        lifted = [bans.pop(k) for k in keys if k in bans]
        if not lifted:
            print(f"tunneld: {target} is not banned", file=sys.stderr)
            return 1
        file.write(bans.values())
        _print_change("unbanned", [r.to_json() for r in lifted], as_json)
        return 0


def _daemon_answers(config: HomeConfig) -> bool:
    try:
        trio.run(get_json, config.daemon.control_socket, "/v1/bans")
    except NotRunningError:
        return False
    return True


# ---------------------------------------------------------------- output


def _print_list(bans: Sequence[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(list(bans), indent=2))
        return
    if not bans:
        print("no bans")
        return
    print(f"{len(bans)} ban(s):")
    print(format_bans(bans, indent="  "))


def format_bans(bans: Sequence[dict[str, Any]], indent: str = "") -> str:
    """One line per ban: address, expiry, reason (also used by `tunneld status`)."""
    width = max((len(b["ip"]) for b in bans), default=0)
    lines = []
    for b in bans:
        until = f"until {b['until']}" if b.get("until") else "permanent"
        reason = f"  {b['reason']}" if b.get("reason") else ""
        lines.append(f"{indent}{b['ip']:<{width}}  {until:<26}{reason}".rstrip())
    return "\n".join(lines)


def _print_change(verb: str, bans: Sequence[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(list(bans), indent=2))
        return
    for b in bans:
        until = f"until {b['until']}" if b.get("until") else "permanent"
        if verb == "banned":
            print(f"banned {b['ip']} ({until})" + (f": {b['reason']}" if b.get("reason") else ""))
        else:
            print(f"{verb} {b['ip']} (was {until})")
