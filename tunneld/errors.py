"""The one exception tree of tunneld.

Everything tunneld raises on purpose derives from TunneldError, so the CLI can
turn any of them into one clear line and an exit code, never a traceback.
"""

from __future__ import annotations


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error a boundary reports for a nursery's group.

    The group is split by type: `trio.Cancelled` are only echoes of the real error
    (the nursery cancelled its other tasks because of it) and are dropped. Of what
    is left, the first error is returned; any others are not dropped but added to
    it as notes, so a traceback or log of it still shows them. A group of nothing
    but cancellations is returned as it is.

    Used once at each boundary (CLI, session attempt) so users see one clear error,
    never an exception group.
    """
    import trio  # here, not at the top: tunneld.wire imports this module and stays sans-IO

    _, rest = group.split(trio.Cancelled)
    if rest is None:
        return group
    errors = _leaves(rest)
    first = errors[0]
    for other in errors[1:]:
        first.add_note(f"also raised in the same task group: {type(other).__name__}: {other}")
    return first


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


class TunneldError(Exception):
    """Base of every error tunneld raises on purpose."""


class ConfigError(TunneldError):
    """A config file is missing, unreadable or invalid.

    The message names `file: [table] key` and what was expected.
    """


class ProtocolError(TunneldError):
    """The multiplexer protocol was violated (sans-IO core, h11 style).

    `error_code` is the RESET/GOAWAY code that describes the violation.
    """

    def __init__(self, msg: str, error_code: int = 1) -> None:
        super().__init__(msg)
        self.error_code = error_code


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids; the session must close."""


class ClientHelloError(TunneldError):
    """A ClientHello could not be parsed (not TLS, malformed, too large)."""


class TokenError(TunneldError):
    """A token is malformed, badly signed, expired, revoked or not allowed.

    `reason` is a machine-readable word (`bad_signature`, `expired`, ...).
    """

    def __init__(self, reason: str, msg: str) -> None:
        super().__init__(msg)
        self.reason = reason


class KeyFileError(TunneldError):
    """A key file is missing, unreadable or not the expected kind of key."""


class ControlError(TunneldError):
    """The control socket could not be reached or answered badly."""


class NotRunningError(ControlError):
    """Nothing listens on the control socket: the process is not running."""


class ControlPermissionError(ControlError):
    """The control socket exists but this user may not open it (`status` exits 4)."""


class AlreadyRunningError(ControlError):
    """Another process already listens on the control socket (a second daemon)."""

    def __init__(self, msg: str, socket_path: str) -> None:
        super().__init__(msg)
        self.socket_path = socket_path


class SessionRefused(TunneldError):
    """The relay refused the tunnel session before the upgrade.

    `reason` is the relay's machine-readable reason, `status` its HTTP status.
    """

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(f"relay refused the session ({status} {reason}): {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail


class HttpError(TunneldError):
    """An HTTP/1.1 message broke the rules of `tunneld.home.proxy.http1` (sans-IO, h11 style).

    `status_hint` is the status a server answers a bad request with.
    """

    def __init__(self, msg: str, status_hint: int = 400) -> None:
        super().__init__(msg)
        self.status_hint = status_hint


class LocalHttpError(HttpError):
    """We were about to frame something HTTP forbids (a value with CR/LF, say)."""


class RemoteHttpError(HttpError):
    """The peer sent a malformed, oversized or cut-off HTTP message."""
