"""`tunneld cert acknowledge SHA256`: accept a certificate the CT watch reported.

Against the running daemon (control socket): it must be one of `ct.unknown`.
With the daemon stopped, the fingerprint is written to the state file
(`ct.json`), and the next check does not report it.
"""

from __future__ import annotations

import json

import trio

from tunneld.config import load_home_config
from tunneld.control import request
from tunneld.errors import ConfigError, NotRunningError, TunneldError
from tunneld.home.ct import CT_FILE, normalize_sha256, read_state, write_state

__all__ = ["acknowledge_command"]


def acknowledge_command(config_path: str, fingerprint: str) -> int:
    config = load_home_config(config_path)
    try:
        fingerprint = normalize_sha256(fingerprint)
    except ValueError as exc:
        raise ConfigError(f"SHA256: {exc}") from None
    body = json.dumps({"sha256": fingerprint}).encode()
    try:
        status, data = trio.run(
            lambda: request(config.daemon.control_socket, "POST", "/v1/ct/acknowledge", body=body)
        )
    except NotRunningError:
        path = config.daemon.state_directory / CT_FILE
        try:
            state = read_state(path)
            if not any(a.get("sha256") == fingerprint for a in state["acknowledged"]):
                state["acknowledged"].append({"sha256": fingerprint, "serial": None})
                write_state(path, state)
        except (OSError, ValueError) as exc:
            raise TunneldError(f"cannot update {path}: {exc}") from None
        print(f"acknowledged {fingerprint} (in {path}; the daemon is not running)")
        return 0
    try:
        answer = json.loads(data)
    except ValueError:
        answer = {}
    if status == 404:
        raise TunneldError(f"{fingerprint}: {answer.get('error', 'not an unknown certificate')}")
    if status != 200:
        raise TunneldError(str(answer.get("error") or f"the daemon answered {status}"))
    cert = answer["acknowledged"]
    print(
        f"acknowledged {cert['sha256']}: {cert['hostname']}, issuer {cert['issuer']},"
        f" serial {cert['serial']}"
    )
    return 0
