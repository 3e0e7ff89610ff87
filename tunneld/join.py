"""Pairing in one line: `tunneld token issue ... --join` prints `tunneld join TOKEN@RELAY`;
on the home, `tunneld join -` (the line pasted on stdin) writes or updates the config.

The line carries a secret, so the documented way to use it keeps it off command lines:
`tunneld join -` reads it from stdin, where neither the shell's history nor `ps` (which
every local user can read) sees it. The token goes into `token_file` (0640), never into
the config itself, and is never printed.

An existing config is edited in place, key by key, so its comments and other keys
stay: `[relay] url`, `[relay] token_file` (an inline `token` is removed),
`[tls] hostnames`, and what the options name. A new one is written by `tunneld init`.
"""

from __future__ import annotations

import grp
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from tunneld.errors import ConfigError, TokenError
from tunneld.files import atomic_write
from tunneld.tokens import decode_claims_unverified, normalize_hostname

__all__ = ["JoinLine", "apply_join", "format_join_line", "parse_join_line"]

PREFIX = "tunneld join "
GROUP = "tunneld"  # the daemon's group (README: Setting it up)
CONFIG_MODE = 0o640
TOKEN_MODE = 0o640


class JoinLine:
    def __init__(self, token: str, relay_host: str, port: int) -> None:
        self.token = token
        self.relay_host = relay_host
        self.port = port

    @property
    def url(self) -> str:
        port = "" if self.port == 443 else f":{self.port}"
        return f"wss://{self.relay_host}{port}/v1/tunnel"

    def __repr__(self) -> str:  # never the token
        return f"JoinLine(relay={self.relay_host}:{self.port})"


def format_join_line(token: str, relay_host: str, port: int) -> str:
    where = relay_host if port == 443 else f"{relay_host}:{port}"
    return f"{PREFIX}{token}@{where}"


def parse_join_line(text: str) -> JoinLine:
    """The whole printed line, or just `TOKEN@RELAY[:PORT]`; ConfigError (never quoting
    the token) when it is not one."""
    line = " ".join(text.split())
    if line.startswith(PREFIX):
        line = line[len(PREFIX) :]
    token, sep, where = line.strip().rpartition("@")
    if not sep or not token or not where or " " in line.strip():
        raise ConfigError(
            "join: expected the line `tunneld token issue --join` printed "
            "(tunneld join TOKEN@RELAY)"
        )
    try:
        decode_claims_unverified(token)
    except TokenError as exc:
        raise ConfigError(f"join: the line holds no valid tunneld token ({exc})") from None
    host, _, port_text = where.partition(":")
    try:
        host = normalize_hostname(host)
        port = int(port_text) if port_text else 443
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise ConfigError(f"join: {where!r} is not a relay name with an optional port") from None
    return JoinLine(token, host, port)


# -- writing ------------------------------------------------------------------------------


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomically, with `mode`, group `tunneld` when root and that group exists."""
    group = None
    if os.geteuid() == 0:
        try:
            group = grp.getgrnam(GROUP).gr_gid
        except KeyError:
            pass
    atomic_write(path, data, mode=mode, group=group)


_HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]\s*(#.*)?$")


def set_keys(text: str, table: str, values: Mapping[str, Any]) -> str:
    """`text` with `[table]`'s keys set (None removes one), other lines untouched."""
    lines = text.splitlines(keepends=True)
    start = None
    end = len(lines)
    for i, line in enumerate(lines):
        m = _HEADER.match(line)
        if m is None:
            continue
        if start is not None:
            end = i
            break
        if m.group(1) == table:
            start = i
    if start is None:
        block = "".join(tomli_w.dumps({k: v}) for k, v in values.items() if v is not None)
        sep = "" if text.endswith("\n") or not text else "\n"
        return f"{text}{sep}\n[{table}]\n{block}"
    pending = dict(values)
    out = lines[: start + 1]
    i = start + 1
    while i < end:
        line = lines[i]
        key = line.split("=", 1)[0].strip() if "=" in line else None
        if key in pending:
            value = pending.pop(key)
            # A multi-line array continues until its closing bracket.
            rest = line.split("=", 1)[1].split("#", 1)[0].strip()
            if rest.startswith("[") and rest.count("[") > rest.count("]"):
                while i + 1 < end and "]" not in lines[i]:
                    i += 1
            if value is not None:
                out.append(tomli_w.dumps({key: value}))
        else:
            out.append(line)
        i += 1
    added = [tomli_w.dumps({k: v}) for k, v in pending.items() if v is not None]
    out[start + 1 : start + 1] = added
    out.extend(lines[end:])
    return "".join(out)


def _edit(text: str, changes: Mapping[str, Mapping[str, Any]]) -> str:
    edited = text
    for table, values in changes.items():
        edited = set_keys(edited, table, values)
    # Check the edit by reading it back; a file this editor misreads is rewritten whole.
    data = tomllib.loads(edited)
    for table, values in changes.items():
        for key, value in values.items():
            got = data.get(table, {}).get(key)
            want = list(value) if isinstance(value, tuple | list) else value
            if got != want:
                whole = tomllib.loads(text)
                for t, vals in changes.items():
                    section = whole.setdefault(t, {})
                    for k, v in vals.items():
                        if v is None:
                            section.pop(k, None)
                        else:
                            section[k] = v
                return tomli_w.dumps(whole)
    return edited


def apply_join(
    config_path: Path,
    line: JoinLine,
    *,
    upstream: str | None = None,
    agree_tos: bool = False,
    ca_file: Path | None = None,
) -> list[str]:
    """Write or update the home config and its token file; returns what was done."""
    from tunneld.config import load_config

    claims = decode_claims_unverified(line.token)
    hostnames = list(claims.hostnames)
    config_path = config_path.absolute()
    notes: list[str] = []
    try:
        config_path.parent.mkdir(parents=True, exist_ok=True)
        if config_path.exists():
            text = config_path.read_text()
            try:
                current = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{config_path}: not valid TOML ({exc})") from None
            relay = current.get("relay") or {}
            if "listen" in relay or "hostname" in relay:
                raise ConfigError(f"{config_path}: this is a relay config; join writes a home one")
            token_path = Path(str(relay.get("token_file") or "token"))
            if not token_path.is_absolute():
                token_path = config_path.parent / token_path
            _write(token_path, line.token.encode() + b"\n", TOKEN_MODE)
            changes: dict[str, dict[str, Any]] = {
                "relay": {"url": line.url, "token_file": str(token_path), "token": None},
                "tls": {"hostnames": hostnames},
            }
            if ca_file is not None:
                changes["relay"]["ca_file"] = str(ca_file.absolute())
            if upstream:
                changes["upstream"] = {"url": upstream}
            if agree_tos:
                changes["acme"] = {"agree_tos": True}
            _write(config_path, _edit(text, changes).encode(), CONFIG_MODE)
            notes.append(
                f"updated {config_path}: relay {line.url}, hostnames {', '.join(hostnames)}"
            )
        else:
            from tunneld.initconfig import init_command

            token_path = config_path.parent / "token"
            _write(token_path, line.token.encode() + b"\n", TOKEN_MODE)
            init_command(
                config_path,
                relay_url=line.url,
                token_file=token_path,
                hostnames=hostnames,
                upstream=upstream or "http://127.0.0.1:8123",
                agree_tos=agree_tos,
            )
            if ca_file is not None:
                text = config_path.read_text()
                edited = _edit(text, {"relay": {"ca_file": str(ca_file.absolute())}})
                _write(config_path, edited.encode(), CONFIG_MODE)
            else:
                _write(config_path, config_path.read_bytes(), CONFIG_MODE)
            notes.append(f"wrote {config_path}: relay {line.url}, hostnames {', '.join(hostnames)}")
    except PermissionError as exc:
        raise ConfigError(
            f"join: permission denied writing {exc.filename}: run it as root (sudo)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"join: cannot write {exc.filename}: {exc.strerror or exc}") from None
    notes.append(f"the token is in {token_path} (mode 0640), not in the config")
    load_config(config_path)  # a file this wrote that does not load is a bug: say so now
    return notes
