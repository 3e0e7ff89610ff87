"""TOML config files -> frozen dataclasses, with errors that name `file: [table] key`.

Two roles share one loader: a home config (`[relay] url`) and a relay config
(`[relay] listen` / `hostname`). Every key has a default in its dataclass unless
it is required; the loader passes only the keys the file sets, so the dataclass
is the single source of defaults (the conf/ examples are tested against it).
Paths are not checked for existence here: the daemon and relay do that when
they start, so `check-config` works on a machine without the key files.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import SplitResult, urlsplit, urlunsplit

from packaging.specifiers import InvalidSpecifier, SpecifierSet

from tunneld.errors import ConfigError
from tunneld.hostnames import hostname_key, normalize_hostname

__all__ = [
    "AccessHostSection",
    "AccessSection",
    "AcmeSection",
    "CtSection",
    "DaemonSection",
    "FleetSection",
    "HomeConfig",
    "HomeRelaySection",
    "IPNetwork",
    "LanSection",
    "Listen",
    "RelayAcmeSection",
    "RelayConfig",
    "RelaySection",
    "RouteSection",
    "TlsSection",
    "UpstreamSection",
    "WatchdogSection",
    "format_duration",
    "format_listen",
    "load_config",
    "load_home_config",
    "load_relay_config",
    "masked",
    "normalize_hostname",
    "parse_duration",
    "parse_listen",
    "redact_url",
    "split_connect_to",
    "domain_allows",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Listen = tuple[str, int]

# Where Let's Encrypt publishes its subscriber agreement (the directory's termsOfService).
LETSENCRYPT_TERMS = "https://letsencrypt.org/repository/"
LOG_LEVELS = ("debug", "info", "warning", "error")
MIN_STREAM_WINDOW = 16 * 1024
MAX_STREAM_WINDOW = 16 * 1024 * 1024
# Receive-window tuning (tunneld/wire/flow.py): one stream may grow to 16 MiB (a
# gigabit at 130 ms), and a session's windows together stay within 64 MiB.
DEFAULT_MAX_STREAM_WINDOW = 16 * 1024 * 1024
DEFAULT_SESSION_BUFFER = 64 * 1024 * 1024
MAX_SESSION_BUFFER = 1 << 31
SECRET_MASK = "***"

# ---------------------------------------------------------------------------
# Durations and listen addresses
# ---------------------------------------------------------------------------

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|s|m|h|d)")
_PLAIN_NUMBER = re.compile(r"\d+(?:\.\d+)?|\.\d+")


def parse_duration(text: str | int | float) -> float:
    """`"30s"`, `"10m"`, `"24h"`, `"30d"`, `"250ms"`, `"1h30m"`, `"0"`, or a number of seconds."""
    if isinstance(text, bool):  # bool is an int; `true` is never a duration
        raise ValueError(f"not a duration: {text!r}")
    if isinstance(text, int | float):
        seconds = float(text)
    elif isinstance(text, str):
        s = text.strip()
        if _PLAIN_NUMBER.fullmatch(s):
            seconds = float(s)
        else:
            seconds, pos = 0.0, 0
            while pos < len(s):
                m = _DURATION_PART.match(s, pos)
                if m is None:
                    raise ValueError(f"not a duration: {text!r}")
                number, unit = m.groups()
                # Divide for ms: 1100/1000 is exactly 1.1, 1100*0.001 is not.
                part = float(number) / 1000 if unit == "ms" else float(number) * _UNITS[unit]
                seconds += part
                pos = m.end()
            if pos == 0:
                raise ValueError(f"not a duration: {text!r}")
    else:
        raise ValueError(f"not a duration: {text!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration: {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """The short form `parse_duration` reads back: 30 -> "30s", 600 -> "10m", 0.25 -> "250ms"."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration: {seconds!r}")
    if seconds == int(seconds):
        n = int(seconds)
        if n == 0:
            return "0s"
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if n % size == 0:
                return f"{n // size}{unit}"
        return f"{n}s"
    ms = seconds * 1000
    if seconds < 1 and abs(ms - round(ms)) < 1e-9:
        return f"{round(ms)}ms"
    text = repr(seconds)
    if "e" in text:  # tiny values: fixed notation, microsecond precision is plenty
        text = f"{seconds:.9f}".rstrip("0")
    return f"{text}s"


_LISTEN_BRACKETED = re.compile(r"\[([^\[\]]+)\]:(\d{1,5})")
_LISTEN_PLAIN = re.compile(r"([A-Za-z0-9._-]+):(\d{1,5})")


def parse_listen(text: str) -> Listen:
    """`"0.0.0.0:443"` -> ("0.0.0.0", 443); `"[::1]:8443"` -> ("::1", 8443)."""
    s = text.strip()
    m = _LISTEN_BRACKETED.fullmatch(s)
    if m is not None:
        host = m.group(1)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"not an IPv6 address in brackets: {text!r}") from None
    else:
        m = _LISTEN_PLAIN.fullmatch(s)
        if m is None:
            raise ValueError(
                f'expected "host:port" (IPv6 as "[address]:port"), got {json.dumps(text)}'
            )
        host = m.group(1)
    port = int(m.group(2))
    if port > 65535:
        raise ValueError(f"port must be 0-65535, got {json.dumps(text)}")
    return host, port


def split_connect_to(text: str, default_port: int) -> Listen:
    """`[relay] connect_to`: "host", "1.2.3.4", "::1", "host:port" or "[v6]:port" ->
    (host, port), the URL's port when none is given; ValueError naming the forms."""
    s = text.strip()
    try:
        ipaddress.ip_address(s)  # a bare IPv4 or IPv6 address, colons and all
        return s, default_port
    except ValueError:
        pass
    if ":" in s or s.startswith("["):
        try:
            return parse_listen(s)
        except ValueError:
            pass
    elif _CONNECT_HOST.fullmatch(s):
        return s, default_port
    raise ValueError(
        'expected a host or IP address, optionally with a port: "relay.example.net", '
        f'"192.0.2.7", "192.0.2.7:8443" or "[2001:db8::7]:8443", got {json.dumps(text)}'
    )


_CONNECT_HOST = re.compile(r"[A-Za-z0-9._-]+")


def format_listen(listen: Listen) -> str:
    """Inverse of `parse_listen`: IPv6 hosts get brackets."""
    host, port = listen
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_http_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL without path, query or credentials."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc}): {json.dumps(url)}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f'expected an "http://host:port" or "https://..." URL, got {json.dumps(url)}'
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"expected scheme, host and port only, got {json.dumps(url)}")
    default_port = 443 if parts.scheme == "https" else 80
    return parts.scheme, parts.hostname, default_port if port is None else port


# ---------------------------------------------------------------------------
# The dataclasses (field names are contract: the daemon, relay and CLI use them)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RelaySection:
    hostname: str
    certificate: Path
    private_key: Path
    token_public_key: tuple[Path, ...]
    listen: tuple[Listen, ...] = (("0.0.0.0", 443),)
    http_listen: tuple[Listen, ...] = ()
    token_private_key: Path | None = None
    # `tunneld token issue` refuses hostnames outside these domains (empty: any name).
    allowed_domains: tuple[str, ...] = ()
    blocked_versions: tuple[str, ...] = ()
    revoked_tokens: tuple[str, ...] = ()
    control_socket: Path = Path("/run/tunneld-relay/control.sock")
    log_level: str = "info"
    client_hello_timeout: float = 10.0
    ping_interval: float = 20.0
    drain_timeout: float = 30.0
    max_streams_per_session: int = 1000
    stream_window: int = 262144  # each stream's initial receive window (WELCOME)
    max_stream_window: int = DEFAULT_MAX_STREAM_WINDOW  # how far tuning may grow one
    session_buffer: int = DEFAULT_SESSION_BUFFER  # the sum of a session's windows
    max_connections_per_ip: int = 256
    raw_transport: bool = True  # allow the tunneld-raw.1 transport (frames without WS framing)
    data_connections: int = 8  # idle data connections kept per home session; 0 = none
    connections_per_ip_per_second: int = 20  # new connections per client IP (0 = unlimited)
    metrics_listen: Listen | None = None  # Prometheus /metrics over TCP; None = off
    # Peers (load balancers) whose PROXY v1/v2 header names the client's address.
    proxy_protocol: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class HomeRelaySection:
    url: str
    token: str = field(default="", repr=False)
    token_file: Path | None = None
    ca_file: Path | None = None
    connect_to: str = ""  # dial this address instead of the URL's host; TLS checks the URL name
    connect_timeout: float = 15.0
    ping_interval: float | None = None
    ping_timeout: float = 20.0
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    backoff_reset_after: float = 60.0
    blocked_retry: float = 3600.0
    drain_timeout: float = 30.0


@dataclass(frozen=True)
class TlsSection:
    hostnames: tuple[str, ...]
    certificate: Path | None = None
    private_key: Path | None = None
    client_hello_timeout: float = 10.0
    handshake_timeout: float = 10.0


@dataclass(frozen=True)
class AcmeSection:
    enabled: bool = True
    # The CA's terms of service, agreed to by the user (issue 22): until then no ACME
    # account is made and the daemon serves its self-signed certificate; status says why.
    agree_tos: bool = False
    directory: str = "https://acme-v02.api.letsencrypt.org/directory"
    email: str = ""
    ca_file: Path | None = None
    renew_before: float = 30 * 86400.0
    key_type: str = "ec256"
    retry_initial: float = 60.0  # first delay after a failed order; doubles up to retry_max
    retry_max: float = 6 * 3600.0
    check_interval: float = 12 * 3600.0  # longest sleep between looks at the certificate
    jitter: float = 3600.0  # renew up to this much earlier, so many homes do not renew at once


@dataclass(frozen=True)
class RelayAcmeSection(AcmeSection):
    """`[relay.acme]`: the relay's own certificate from an ACME CA (issue 20). Off by
    default: a relay with certificate files keeps them."""

    enabled: bool = False
    # "tls-alpn-01" on the relay's own port (it ends TLS for its name), or "http-01" on
    # `http_listen` (which must then be on port 80).
    challenge: str = "tls-alpn-01"
    # The account key, and the certificate and key when [relay] certificate /
    # private_key are not given.
    state_directory: Path = Path("/var/lib/tunneld-relay")


@dataclass(frozen=True)
class FleetSection:
    """`[fleet]`: relays sharing a registry on Redis (issue 18; README "Fleet").
    Off (a single relay, as always) while redis_url is empty."""

    redis_url: str = field(default="", repr=False)  # may carry a password
    node_id: str = ""  # "" = this machine's host name
    advertise: str = ""  # "host:port" where other relays reach this one
    lease_ttl: float = 15.0
    # Relay-to-relay forwarding (PROTOCOL.md 13): its listener and the fleet's shared
    # secret; both set (with advertise) or neither (no forwarding).
    forward_listen: Listen | None = None
    secret_file: Path | None = None

    @property
    def forwarding(self) -> bool:
        return self.enabled and self.secret_file is not None

    @property
    def enabled(self) -> bool:
        return bool(self.redis_url)


@dataclass(frozen=True)
class RelayConfig:
    path: Path
    relay: RelaySection
    relay_acme: RelayAcmeSection = field(default_factory=RelayAcmeSection)  # [relay.acme]
    fleet: FleetSection = field(default_factory=FleetSection)


@dataclass(frozen=True)
class UpstreamSection:
    url: str = "http://127.0.0.1:8123"
    connect_timeout: float = 10.0
    ca_file: Path | None = None
    verify: bool = True
    header_timeout: float = 20.0  # a request head must arrive within this (slowloris)
    idle_timeout: float = 75.0  # keep-alive: wait this long for the next request
    response_timeout: float = 300.0  # request sent -> response head, else 504
    max_header_size: int = 65536  # request head bytes, else 431
    pool_size: int = 8  # idle upstream connections kept for reuse
    # Derived from url, so code never re-parses it.
    scheme: str = field(init=False)
    host: str = field(init=False)
    port: int = field(init=False)

    def __post_init__(self) -> None:
        scheme, host, port = _split_http_url(self.url)
        object.__setattr__(self, "scheme", scheme)
        object.__setattr__(self, "host", host)
        object.__setattr__(self, "port", port)


@dataclass(frozen=True)
class WatchdogSection:
    preset: str = "home-assistant"
    ban_threshold: int = 5
    ban_window: float = 600.0
    ban_duration: float = 86400.0  # 0 = until removed
    ban_statuses: tuple[int, ...] = (401, 403)
    never_ban: tuple[IPNetwork, ...] = ()
    trusted_proxies: tuple[IPNetwork, ...] = ()
    max_streams_per_ip: int = 64
    ipv6_prefix: int = 128  # 64: an IPv6 client is banned with its whole /64
    home_assistant_bans: Path | None = None  # Home Assistant's ip_bans.yaml, followed live


@dataclass(frozen=True)
class CtSection:
    """Certificate-transparency watch (home/ct.py)."""

    enabled: bool = False
    interval: float = 21600.0
    url: str = "https://crt.sh/"


@dataclass(frozen=True)
class AccessHostSection:
    """`[access.hostnames."name"]`: one hostname's own rule."""

    allow: tuple[IPNetwork, ...] | None = None  # None: [access] allow
    deny: tuple[IPNetwork, ...] = ()  # added to [access] deny


@dataclass(frozen=True)
class AccessSection:
    """Which client networks may reach the hostnames, enforced at the relay."""

    allow: tuple[IPNetwork, ...] = ()  # empty: every network not denied
    deny: tuple[IPNetwork, ...] = ()
    hostnames: tuple[tuple[str, AccessHostSection], ...] = ()


@dataclass(frozen=True)
class DaemonSection:
    state_directory: Path = Path("/var/lib/tunneld")
    control_socket: Path = Path("/run/tunneld/control.sock")
    log_level: str = "info"
    metrics_listen: Listen | None = None
    max_streams: int = 1000
    stream_window: int = 262144  # each stream's initial receive window (HELLO)
    max_stream_window: int = DEFAULT_MAX_STREAM_WINDOW  # how far tuning may grow one
    session_buffer: int = DEFAULT_SESSION_BUFFER  # the sum of a session's windows
    data_connections: int = 64  # most data connections held to the relay at once; 0 = none


@dataclass(frozen=True)
class LanSection:
    """A listener on the home network: the same names, certificate, proxy and watchdog."""

    listen: tuple[Listen, ...] = ()  # off by default; e.g. ["0.0.0.0:443", "[::]:443"]


CLIENT_CERTIFICATE_MODES = ("", "optional", "required")
DEFAULT_CLIENT_NAME_HEADER = "X-Tunneld-Client"


@dataclass(frozen=True)
class RouteSection:
    """One `[[route]]`: a hostname served by its own upstream. Unset keys (None, "")
    take the value of `[upstream]` / `[watchdog]`."""

    hostname: str
    upstream: str
    connect_timeout: float | None = None
    ca_file: Path | None = None
    verify: bool = True
    header_timeout: float | None = None
    idle_timeout: float | None = None
    response_timeout: float | None = None
    preset: str = ""  # "": [watchdog] preset
    trusted_proxies: tuple[IPNetwork, ...] | None = None  # None: [watchdog] trusted_proxies
    share_bans: bool = True  # a ban earned here covers every route, and the relay's edge
    client_ca: Path | None = None  # None: the daemon's own CA (`tunneld client issue`)
    client_certificate: str = ""  # "", "optional" or "required"
    client_name_header: str = DEFAULT_CLIENT_NAME_HEADER

    def upstream_section(self, base: UpstreamSection) -> UpstreamSection:
        given = {
            k: getattr(self, k)
            for k in ("connect_timeout", "header_timeout", "idle_timeout", "response_timeout")
            if getattr(self, k) is not None
        }
        return dataclasses.replace(
            base, url=self.upstream, ca_file=self.ca_file, verify=self.verify, **given
        )

    def watchdog_section(self, base: WatchdogSection) -> WatchdogSection:
        return dataclasses.replace(
            base,
            preset=self.preset or base.preset,
            trusted_proxies=(
                base.trusted_proxies if self.trusted_proxies is None else self.trusted_proxies
            ),
        )


@dataclass(frozen=True)
class HomeConfig:
    path: Path
    relay: HomeRelaySection
    tls: TlsSection
    acme: AcmeSection = field(default_factory=AcmeSection)
    upstream: UpstreamSection = field(default_factory=UpstreamSection)
    watchdog: WatchdogSection = field(default_factory=WatchdogSection)
    daemon: DaemonSection = field(default_factory=DaemonSection)
    lan: LanSection = field(default_factory=LanSection)
    # `[[route]]` tables; their hostnames are also in `tls.hostnames` (claimed, certified).
    route: tuple[RouteSection, ...] = ()
    access: AccessSection = field(default_factory=AccessSection)
    ct: CtSection = field(default_factory=CtSection)


# ---------------------------------------------------------------------------
# Converters: TOML value -> field value, or _Invalid("expected ..., got ...")
# ---------------------------------------------------------------------------


class _Invalid(Exception):
    """A value is wrong; the message says what was expected (the key is added later)."""


Converter = Callable[[object], object]
_T = TypeVar("_T")


def _show(value: object) -> str:
    """A value as the user wrote it in TOML, shortened."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, int | float):
        text = repr(value)
    elif isinstance(value, list):
        text = "[" + ", ".join(_show(v) for v in value) + "]"
    elif isinstance(value, dict):
        text = "a table"
    else:
        text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_show(value)}")
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_show(value)}")
    return value


def _integer(low: int, high: int | None = None) -> Converter:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected an integer, got {_show(value)}")
        if value < low or (high is not None and value > high):
            bound = f"at least {low}" if high is None else f"from {low} to {high}"
            raise _Invalid(f"expected an integer {bound}, got {_show(value)}")
        return value

    return convert


def _duration(*, zero_ok: bool = False, empty_is_none: bool = False) -> Converter:
    def convert(value: object) -> float | None:
        if empty_is_none and value == "":
            return None
        expected = 'expected a duration like "30s", "10m", "24h" or "30d"'
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _Invalid(f"{expected}, got {_show(value)}")
        try:
            seconds = parse_duration(value)
        except ValueError:
            raise _Invalid(f"{expected}, got {_show(value)}") from None
        if seconds == 0 and not zero_ok:
            raise _Invalid(f"expected a duration longer than 0, got {_show(value)}")
        return seconds

    return convert


def _choice(options: tuple[str, ...], *, fold_case: bool = False) -> Converter:
    def convert(value: object) -> str:
        text = _string(value)
        text = text.lower() if fold_case else text
        if text not in options:
            listed = ", ".join(json.dumps(o) for o in options)
            raise _Invalid(f"expected one of {listed}, got {_show(value)}")
        return text

    return convert


def _path(base: Path, *, optional: bool) -> Converter:
    def convert(value: object) -> Path | None:
        if not isinstance(value, str):
            raise _Invalid(f"expected a file path string, got {_show(value)}")
        if value == "":
            if optional:
                return None
            raise _Invalid('expected a file path, got ""')
        if "\0" in value:
            raise _Invalid(f"expected a file path, got {_show(value)}")
        try:
            p = Path(value).expanduser()
        except RuntimeError as exc:  # "~" without a home directory
            raise _Invalid(f"cannot expand {_show(value)}: {exc}") from None
        return p if p.is_absolute() else base / p

    return convert


def _string_list(
    item: Callable[[str], _T], what: str, *, single_ok: bool = False, empty_ok: bool = True
) -> Converter:
    """A TOML list of strings (or one string if single_ok), each converted by `item`."""

    def convert(value: object) -> tuple[_T, ...]:
        if single_ok and isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _Invalid(f"expected a list of {what}, got {_show(value)}")
        if not value and not empty_ok:
            raise _Invalid(f"expected at least one of {what}, got []")
        out: list[_T] = []
        for v in value:
            try:
                out.append(item(v))
            except ValueError as exc:
                raise _Invalid(str(exc)) from None
        return tuple(out)

    return convert


def _listen_item(text: str) -> Listen:
    return parse_listen(text)


def _optional_listen(value: object) -> Listen | None:
    if value == "":
        return None
    if not isinstance(value, str):
        raise _Invalid(f'expected a "host:port" string or "", got {_show(value)}')
    try:
        return parse_listen(value)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _hostname(value: object) -> str:
    try:
        return normalize_hostname(_string(value))
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _hostnames(value: object) -> tuple[str, ...]:
    names = _string_list(normalize_hostname, "hostname strings", empty_ok=False)(value)
    assert isinstance(names, tuple)
    return tuple(dict.fromkeys(names))  # drop duplicates, keep order


def _nonempty_item(what: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        if not text.strip():
            raise ValueError(f"expected {what}, got {json.dumps(text)}")
        return text.strip()

    return convert


def _domain(text: str) -> str:
    """`[relay] allowed_domains` entry: "example.com" (it and every name below it) or
    "*.example.com" (only names below it)."""
    wildcard = text.strip().startswith("*.")
    name = normalize_hostname(text.strip()[2:] if wildcard else text)
    return f"*.{name}" if wildcard else name


def domain_allows(domains: tuple[str, ...], hostname: str) -> bool:
    """Whether `hostname` (normalized) falls in `[relay] allowed_domains` (empty: any)."""
    if not domains:
        return True
    for entry in domains:
        if entry.startswith("*."):
            if hostname.endswith(entry[1:]):
                return True
        elif hostname == entry or hostname.endswith("." + entry):
            return True
    return False


def _specifier(text: str) -> str:
    # An empty SpecifierSet matches every version: blocking "" would block everything.
    try:
        if not text.strip():
            raise InvalidSpecifier(text)
        SpecifierSet(text)
    except InvalidSpecifier:
        raise ValueError(
            f'expected PEP 440 version specifiers like "<0.3" or "==0.4.1", got {json.dumps(text)}'
        ) from None
    return text.strip()


def _network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text.strip())
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f'expected an IP address or CIDR like "192.168.1.0/24", got {json.dumps(text)}'
        ) from None
    raise ValueError(
        f"{json.dumps(text)} has host bits set; did you mean {json.dumps(str(loose))}?"
    )


def _statuses(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise _Invalid(f"expected a list of HTTP status codes, got {_show(value)}")
    for v in value:
        if not 100 <= v <= 599:
            raise _Invalid(f"expected HTTP status codes from 100 to 599, got {v}")
    return tuple(dict.fromkeys(value))


def _ipv6_prefix(value: object) -> int:
    # Only these two: the relay matches a ban on an address or on a whole /64 (PROTOCOL.md).
    if isinstance(value, bool) or value not in (64, 128):
        raise _Invalid(f"expected 128 (one address) or 64 (its /64 network), got {_show(value)}")
    assert isinstance(value, int)
    return value


def _url_parts(value: object, expected: str) -> tuple[str, SplitResult]:
    """The URL string and its parts; _Invalid("expected <expected>") if it does not parse."""
    url = _string(value)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        raise _Invalid(f"expected {expected}, got {_show(value)}") from None
    return url, parts


def _ws_url(value: object) -> str:
    url, parts = _url_parts(value, "a ws:// or wss:// URL")
    if parts.username or parts.password:
        # Not echoed: the credentials would land in logs.
        raise _Invalid("credentials do not belong in the URL (value not shown); use token")
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise _Invalid(
            f'expected a "wss://host/v1/tunnel" (or ws://) URL with a host, got {_show(value)}'
        )
    return url


def _connect_to(value: object) -> str:
    text = _string(value).strip()
    if text:
        try:
            split_connect_to(text, 443)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
    return text


def _http_url(value: object) -> str:
    url = _string(value)
    try:
        _split_http_url(url)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    return url


def _acme_directory(value: object) -> str:
    url, parts = _url_parts(value, "an https:// URL")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Invalid(f"expected an https:// URL, got {_show(value)}")
    return url


def _email(value: object) -> str:
    text = _string(value).strip()
    if text and not re.fullmatch(r"[^@\s]+@[^@\s]+", text):
        raise _Invalid(f'expected an e-mail address or "", got {_show(value)}')
    return text


def _token(value: object) -> str:
    # Never show the value: it is (or is close to) a secret.
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got a {_toml_type(value)} (value not shown)")
    return value.strip()


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "table"
    return type(value).__name__


def _check_token(text: str) -> str | None:
    """Why a token cannot be sent in an Authorization header, or None if it can."""
    if not text:
        return "is empty"
    if not all("\x21" <= c <= "\x7e" for c in text):
        return "holds spaces, control or non-ASCII characters (value not shown)"
    return None


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ctx:
    label: str  # the path as given, for messages
    base: Path  # the config file's folder, absolute

    def error(self, table: str, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.label}: [{table}] {key}: {msg}")


def _keys(cls: type[Any]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name != "path"]


def _required(cls: type[Any], key: str) -> bool:
    f = next(f for f in dataclasses.fields(cls) if f.name == key)
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _unknown(what: str, name: str, known: list[str], *, tables: bool = False) -> str:
    """`unknown key (did you mean "token"?); known: url, token, ...` for typos."""
    show = (lambda k: f"[{k}]") if tables else json.dumps
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {show(close[0])}?)" if close else ""
    listed = ", ".join(show(k) if tables else k for k in known)
    return f"unknown {what}{hint}; known: {listed}"


def _table(ctx: _Ctx, data: Mapping[str, object], name: str) -> dict[str, object]:
    raw = data.get(name, {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{ctx.label}: [{name}]: expected a table, got {_show(raw)}")
    return raw


_WINDOW_KEYS: Final[dict[str, Converter]] = {
    "stream_window": _integer(MIN_STREAM_WINDOW, MAX_STREAM_WINDOW),
    "max_stream_window": _integer(MIN_STREAM_WINDOW, MAX_STREAM_WINDOW),
    "session_buffer": _integer(MIN_STREAM_WINDOW, MAX_SESSION_BUFFER),
}


def _check_windows(
    ctx: _Ctx, table: str, values: dict[str, Any], cls: type[RelaySection | DaemonSection]
) -> None:
    """The initial window <= the most one stream may grow to <= the session's buffer."""
    initial = values.get("stream_window", cls.stream_window)
    most = values.get("max_stream_window", cls.max_stream_window)
    budget = values.get("session_buffer", cls.session_buffer)
    if most < initial:
        raise ctx.error(
            table, "max_stream_window", f"must be at least stream_window ({initial}), got {most}"
        )
    if budget < most:
        raise ctx.error(
            table, "session_buffer", f"must be at least max_stream_window ({most}), got {budget}"
        )


def _section(
    ctx: _Ctx,
    name: str,
    raw: Mapping[str, object],
    cls: type[_T],
    converters: Mapping[str, Converter],
) -> dict[str, Any]:
    """Check keys, convert the ones present; the dataclass supplies the defaults."""
    known = _keys(cls)
    assert set(converters) <= set(known), (cls, set(converters) - set(known))
    for key in raw:
        if key not in known:
            raise ctx.error(name, key, _unknown("key", key, known))
    values: dict[str, Any] = {}
    for key in known:
        if key not in converters:
            continue  # handled by the caller (e.g. token)
        if key not in raw:
            if _required(cls, key):
                raise ctx.error(name, key, "missing; this key is required")
            continue
        try:
            values[key] = converters[key](raw[key])
        except _Invalid as exc:
            raise ctx.error(name, key, str(exc)) from None
    return values


def _check_tables(ctx: _Ctx, data: Mapping[str, object], known: list[str]) -> None:
    for name, value in data.items():
        if name in known:
            continue
        tables = ", ".join(f"[{k}]" for k in known)
        if isinstance(value, dict):
            hint = _unknown("table", name, known, tables=True)
            raise ConfigError(f"{ctx.label}: [{name}]: {hint}")
        raise ConfigError(
            f"{ctx.label}: {name}: key outside any table; keys belong in a table: {tables}"
        )


def _read(path: str | Path) -> tuple[_Ctx, dict[str, object]]:
    label = str(path)
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{label}: is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{label}: permission denied") from None
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{label}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:  # its message carries "(at line N, column M)"
        raise ConfigError(f"{label}: invalid TOML: {exc}") from None
    return _Ctx(label, p.absolute().parent), data


def _role(data: Mapping[str, object]) -> str | None:
    relay = data.get("relay")
    if not isinstance(relay, dict):
        return None
    if "url" in relay:
        return "home"
    # `hostname` is required in a relay config while `listen` has a default.
    if "listen" in relay or "hostname" in relay:
        return "relay"
    return None


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def load_config(path: str | Path) -> HomeConfig | RelayConfig:
    """Load either role, told apart by `[relay] url` (home) or `[relay] listen` (relay)."""
    ctx, data = _read(path)
    _table(ctx, data, "relay")  # `relay = 3` or `[[relay]]`: say so, not "cannot tell"
    role = _role(data)
    if role == "home":
        return _build_home(ctx, data)
    if role == "relay":
        return _build_relay(ctx, data)
    raise ConfigError(
        f"{ctx.label}: [relay]: cannot tell the role: a home config sets [relay] url, "
        "a relay config sets [relay] listen (and hostname)"
    )


def load_home_config(path: str | Path) -> HomeConfig:
    ctx, data = _read(path)
    if _role(data) == "relay":
        raise ConfigError(
            f"{ctx.label}: [relay] url: missing; this looks like a relay config "
            "([relay] listen/hostname), expected a home config"
        )
    return _build_home(ctx, data)


def load_relay_config(path: str | Path) -> RelayConfig:
    ctx, data = _read(path)
    if _role(data) == "home":
        raise ConfigError(
            f"{ctx.label}: [relay] hostname: missing; this looks like a home config "
            "([relay] url), expected a relay config"
        )
    return _build_relay(ctx, data)


def _build_relay(ctx: _Ctx, data: Mapping[str, object]) -> RelayConfig:
    _check_tables(ctx, data, ["relay", "fleet"])
    if "relay" not in data:
        raise ConfigError(f"{ctx.label}: [relay]: missing; this table is required")
    path = _path(ctx.base, optional=False)
    raw_relay = dict(_table(ctx, data, "relay"))
    acme = _relay_acme(ctx, raw_relay.pop("acme", {}))
    if acme.enabled:
        # ACME-managed: the files default to the state directory (written by the relay).
        raw_relay.setdefault("certificate", str(acme.state_directory / "certificate.pem"))
        raw_relay.setdefault("private_key", str(acme.state_directory / "private_key.pem"))
    values = _section(
        ctx,
        "relay",
        raw_relay,
        RelaySection,
        {
            "hostname": _hostname,
            "listen": _string_list(
                _listen_item, '"host:port" strings', single_ok=True, empty_ok=False
            ),
            "http_listen": _string_list(_listen_item, '"host:port" strings', single_ok=True),
            "certificate": path,
            "private_key": path,
            "token_public_key": _string_list(
                _path_item(ctx.base), "file path strings", single_ok=True, empty_ok=False
            ),
            "token_private_key": _path(ctx.base, optional=True),
            "allowed_domains": _string_list(_domain, "domain name strings"),
            "blocked_versions": _string_list(_specifier, "version specifier strings"),
            "revoked_tokens": _string_list(_nonempty_item("a token id"), "token id strings"),
            "control_socket": path,
            "log_level": _choice(LOG_LEVELS, fold_case=True),
            "client_hello_timeout": _duration(),
            "ping_interval": _duration(),
            "drain_timeout": _duration(),
            "max_streams_per_session": _integer(1),
            **_WINDOW_KEYS,
            "max_connections_per_ip": _integer(0),
            "connections_per_ip_per_second": _integer(0),
            "metrics_listen": _optional_listen,
            "raw_transport": _boolean,
            "data_connections": _integer(0, 1024),
            "proxy_protocol": _string_list(_network, 'CIDR strings like "10.0.0.0/8"'),
        },
    )
    _check_windows(ctx, "relay", values, RelaySection)
    relay = RelaySection(**values)
    if acme.enabled and acme.challenge == "http-01" and not relay.http_listen:
        raise ctx.error(
            "relay.acme",
            "challenge",
            '"http-01" needs [relay] http_listen (port 80, e.g. ["0.0.0.0:80"])',
        )
    fleet = _fleet(ctx, _table(ctx, data, "fleet"))
    return RelayConfig(path=Path(ctx.label).absolute(), relay=relay, relay_acme=acme, fleet=fleet)


def _redis_url(value: object) -> str:
    text = _string(value).strip()
    if not text:
        return ""
    parts = urlsplit(text)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise _Invalid(
            'expected "redis://host:port/db", "rediss://…" (TLS) or "unix:///path", '
            f"got a URL with scheme {json.dumps(parts.scheme)}"
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise _Invalid("expected a host in the URL, e.g. redis://10.0.0.5:6379/0")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise _Invalid("the URL's port is not a number from 0 to 65535") from None
    return text


def _node_id(value: object) -> str:
    text = _string(value).strip()
    if text and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", text):
        raise _Invalid(
            "expected up to 63 letters, digits, '.', '_' or '-' (a host name, say), "
            f"got {json.dumps(text)}"
        )
    return text


def _advertise(value: object) -> str:
    text = _string(value).strip()
    if text:
        try:
            parse_listen(text)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
    return text


def _fleet(ctx: _Ctx, raw: Mapping[str, object]) -> FleetSection:
    values = _section(
        ctx,
        "fleet",
        raw,
        FleetSection,
        {
            "redis_url": _redis_url,
            "node_id": _node_id,
            "advertise": _advertise,
            "lease_ttl": _duration(),
            "forward_listen": _optional_listen,
            "secret_file": _path(ctx.base, optional=True),
        },
    )
    fleet = FleetSection(**values)
    if fleet.secret_file is not None or fleet.forward_listen is not None:
        for key in ("secret_file", "forward_listen", "advertise"):
            if not getattr(fleet, key):
                raise ctx.error(
                    "fleet", key, "needed for forwarding (with secret_file and forward_listen)"
                )
    if fleet.lease_ttl < 1.0:
        raise ctx.error("fleet", "lease_ttl", f"must be at least 1s, got {raw['lease_ttl']}")
    return fleet


def redact_url(url: str) -> str:
    """A Redis URL with its password (and user) replaced by ***, for status and logs."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{SECRET_MASK}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _relay_acme(ctx: _Ctx, raw: object) -> RelayAcmeSection:
    if not isinstance(raw, dict):
        raise ConfigError(f"{ctx.label}: [relay.acme]: expected a table, got {_show(raw)}")
    acme = RelayAcmeSection(
        **_section(
            ctx,
            "relay.acme",
            raw,
            RelayAcmeSection,
            {
                "enabled": _boolean,
                "agree_tos": _boolean,
                "directory": _acme_directory,
                "email": _email,
                "ca_file": _path(ctx.base, optional=True),
                "renew_before": _duration(),
                "key_type": _choice(("ec256", "rsa2048")),
                "retry_initial": _duration(),
                "retry_max": _duration(),
                "check_interval": _duration(),
                "jitter": _duration(zero_ok=True),
                "challenge": _choice(("tls-alpn-01", "http-01")),
                "state_directory": _path(ctx.base, optional=False),
            },
        )
    )
    if acme.retry_max < acme.retry_initial:
        raise ctx.error(
            "relay.acme",
            "retry_max",
            f"must not be shorter than retry_initial ({format_duration(acme.retry_initial)}),"
            f" got {format_duration(acme.retry_max)}",
        )
    return acme


def _path_item(base: Path) -> Callable[[str], Path]:
    convert = _path(base, optional=False)

    def item(text: str) -> Path:
        try:
            result = convert(text)
        except _Invalid as exc:
            raise ValueError(str(exc)) from None
        assert isinstance(result, Path)
        return result

    return item


def _build_home(ctx: _Ctx, data: Mapping[str, object]) -> HomeConfig:
    _check_tables(ctx, data, _keys(HomeConfig))
    path = _path(ctx.base, optional=False)
    optional_path = _path(ctx.base, optional=True)

    raw_relay = _table(ctx, data, "relay")
    relay_values = _section(
        ctx,
        "relay",
        raw_relay,
        HomeRelaySection,
        {
            "url": _ws_url,
            "token_file": optional_path,
            "ca_file": optional_path,
            "connect_to": _connect_to,
            "connect_timeout": _duration(),
            "ping_interval": _duration(empty_is_none=True),
            "ping_timeout": _duration(),
            "backoff_initial": _duration(),
            "backoff_max": _duration(),
            "backoff_reset_after": _duration(),
            "blocked_retry": _duration(),
            "drain_timeout": _duration(),
        },
    )
    relay_values["token"] = _home_token(ctx, raw_relay, relay_values.get("token_file"))
    relay = HomeRelaySection(**relay_values)
    if relay.backoff_max < relay.backoff_initial:
        raise ctx.error(
            "relay",
            "backoff_max",
            f"must not be shorter than backoff_initial ({format_duration(relay.backoff_initial)}),"
            f" got {format_duration(relay.backoff_max)}",
        )

    tls = TlsSection(
        **_section(
            ctx,
            "tls",
            _table(ctx, data, "tls"),
            TlsSection,
            {
                "hostnames": _hostnames,
                "certificate": optional_path,
                "private_key": optional_path,
                "client_hello_timeout": _duration(),
                "handshake_timeout": _duration(),
            },
        )
    )
    if (tls.certificate is None) != (tls.private_key is None):
        missing = "private_key" if tls.private_key is None else "certificate"
        raise ctx.error(
            "tls",
            missing,
            'set both certificate and private_key, or leave both "" to let [acme] manage them',
        )

    acme = AcmeSection(
        **_section(
            ctx,
            "acme",
            _table(ctx, data, "acme"),
            AcmeSection,
            {
                "enabled": _boolean,
                "agree_tos": _boolean,
                "directory": _acme_directory,
                "email": _email,
                "ca_file": optional_path,
                "renew_before": _duration(),
                "key_type": _choice(("ec256", "rsa2048")),
                "retry_initial": _duration(),
                "retry_max": _duration(),
                "check_interval": _duration(),
                "jitter": _duration(zero_ok=True),
            },
        )
    )
    if acme.retry_max < acme.retry_initial:
        raise ctx.error(
            "acme",
            "retry_max",
            f"must not be shorter than retry_initial ({format_duration(acme.retry_initial)}),"
            f" got {format_duration(acme.retry_max)}",
        )
    upstream = UpstreamSection(
        **_section(
            ctx,
            "upstream",
            _table(ctx, data, "upstream"),
            UpstreamSection,
            {
                "url": _http_url,
                "connect_timeout": _duration(),
                "ca_file": optional_path,
                "verify": _boolean,
                "header_timeout": _duration(),
                "idle_timeout": _duration(),
                "response_timeout": _duration(),
                "max_header_size": _integer(1024, 1024 * 1024),
                "pool_size": _integer(0, 1024),
            },
        )
    )
    networks = _string_list(_network, 'CIDR strings like "192.168.1.0/24"')
    watchdog = WatchdogSection(
        **_section(
            ctx,
            "watchdog",
            _table(ctx, data, "watchdog"),
            WatchdogSection,
            {
                "preset": _choice(("home-assistant", "generic")),
                "ban_threshold": _integer(1),
                "ban_window": _duration(),
                "ban_duration": _duration(zero_ok=True),
                "ban_statuses": _statuses,
                "never_ban": networks,
                "trusted_proxies": networks,
                "max_streams_per_ip": _integer(1),
                "ipv6_prefix": _ipv6_prefix,
                "home_assistant_bans": optional_path,
            },
        )
    )
    access = _access_section(ctx, _table(ctx, data, "access"), networks, tls.hostnames)
    ct = CtSection(
        **_section(
            ctx,
            "ct",
            _table(ctx, data, "ct"),
            CtSection,
            {"enabled": _boolean, "interval": _duration(), "url": _ct_url},
        )
    )
    daemon_values = _section(
        ctx,
        "daemon",
        _table(ctx, data, "daemon"),
        DaemonSection,
        {
            "state_directory": path,
            "control_socket": path,
            "log_level": _choice(LOG_LEVELS, fold_case=True),
            "metrics_listen": _optional_listen,
            "max_streams": _integer(1),
            **_WINDOW_KEYS,
            "data_connections": _integer(0, 4096),
        },
    )
    _check_windows(ctx, "daemon", daemon_values, DaemonSection)
    daemon = DaemonSection(**daemon_values)
    lan = LanSection(
        **_section(
            ctx,
            "lan",
            _table(ctx, data, "lan"),
            LanSection,
            {"listen": _string_list(_listen_item, '"host:port" strings', single_ok=True)},
        )
    )
    routes = _routes(ctx, data, relay, tls)
    extra = tuple(r.hostname for r in routes if r.hostname not in tls.hostnames)
    if extra:  # claimed from the relay and certified like the [tls] names
        tls = dataclasses.replace(tls, hostnames=tls.hostnames + extra)
    return HomeConfig(
        path=Path(ctx.label).absolute(),
        relay=relay,
        tls=tls,
        acme=acme,
        upstream=upstream,
        watchdog=watchdog,
        daemon=daemon,
        lan=lan,
        route=routes,
        access=access,
        ct=ct,
    )


def _header_name(value: object) -> str:
    text = _string(value).strip()
    if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", text):
        raise _Invalid(f"expected an HTTP header name, got {_show(value)}")
    if text.lower() in ("host", "x-forwarded-for", "forwarded", "x-forwarded-proto"):
        raise _Invalid(f"{_show(value)} is a header the proxy already sets")
    return text


def _routes(
    ctx: _Ctx, data: Mapping[str, object], relay: HomeRelaySection, tls: TlsSection
) -> tuple[RouteSection, ...]:
    """`[[route]]` tables: each checked alone, then against each other, the token and
    the configured certificate. Errors name the route as `[route N]` (1-based)."""
    raw = data.get("route", [])
    if isinstance(raw, dict):
        raise ConfigError(f"{ctx.label}: [route]: write [[route]] (a list of tables), not [route]")
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise ConfigError(f"{ctx.label}: [[route]]: expected tables, got {_show(raw)}")
    optional_path = _path(ctx.base, optional=True)
    networks = _string_list(_network, 'CIDR strings like "192.168.1.0/24"')
    routes: list[RouteSection] = []
    seen: dict[str, str] = {}
    for i, table in enumerate(raw, 1):
        name = f"route {i}"
        values = _section(
            ctx,
            name,
            table,
            RouteSection,
            {
                "hostname": _hostname,
                "upstream": _http_url,
                "connect_timeout": _duration(empty_is_none=True),
                "ca_file": optional_path,
                "verify": _boolean,
                "header_timeout": _duration(empty_is_none=True),
                "idle_timeout": _duration(empty_is_none=True),
                "response_timeout": _duration(empty_is_none=True),
                "preset": _choice(("", "home-assistant", "generic")),
                "trusted_proxies": networks,
                "share_bans": _boolean,
                "client_ca": optional_path,
                "client_certificate": _choice(CLIENT_CERTIFICATE_MODES),
                "client_name_header": _header_name,
            },
        )
        route = RouteSection(**values)
        if route.hostname in seen:
            raise ctx.error(
                name,
                "hostname",
                f"{route.hostname} is already the hostname of [{seen[route.hostname]}]",
            )
        seen[route.hostname] = name
        if route.client_ca is not None and not route.client_certificate:
            raise ctx.error(
                name, "client_ca", 'set client_certificate = "required" or "optional" to use it'
            )
        if route.client_ca is not None:
            problem = _client_ca_problem(route.client_ca)
            if problem:
                raise ctx.error(name, "client_ca", problem)
        routes.append(route)
    if routes:
        _check_route_names(ctx, routes, relay, tls)
    return tuple(routes)


def _client_ca_problem(path: Path) -> str | None:
    from cryptography import x509

    try:
        pem = path.read_bytes()
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        return f"{path} holds no PEM certificate"
    if not certs:
        return f"{path} holds no PEM certificate"
    return None


def _check_route_names(
    ctx: _Ctx, routes: list[RouteSection], relay: HomeRelaySection, tls: TlsSection
) -> None:
    """Every route's name must be one the token allows and, for a certificate given as
    files, one it covers (ACME orders one certificate for all names)."""
    from tunneld.errors import TokenError
    from tunneld.tokens import decode_claims_unverified

    try:
        allowed = decode_claims_unverified(relay.token).hostnames
    except TokenError:
        allowed = None  # the [relay] token checks report a broken token
    if allowed is not None:
        for i, route in enumerate(routes, 1):
            if route.hostname not in allowed:
                raise ctx.error(
                    f"route {i}",
                    "hostname",
                    f"{route.hostname} is not among the token's hostnames "
                    f"({', '.join(allowed)}); issue a token that lists it",
                )
    if tls.certificate is None:
        return
    sans = _certificate_names(tls.certificate)
    if sans is None:
        return  # unreadable now: the daemon names the file when it starts
    for i, route in enumerate(routes, 1):
        if not _covered(route.hostname, sans):
            raise ctx.error(
                f"route {i}",
                "hostname",
                f"{route.hostname} is not among the names of [tls] certificate "
                f"{tls.certificate} ({', '.join(sans) or 'none'})",
            )


def _certificate_names(path: Path) -> tuple[str, ...] | None:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(hostname_key(n) for n in ext.value.get_values_for_type(x509.DNSName))


def _covered(hostname: str, sans: tuple[str, ...]) -> bool:
    for san in sans:
        if san == hostname:
            return True
        if san.startswith("*.") and "." in hostname:
            if hostname.split(".", 1)[1] == san[2:]:
                return True
    return False


def _ct_url(value: object) -> str:
    text = _string(value)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise _Invalid(
            f'expected an http:// or https:// URL like "https://crt.sh/", got {_show(value)}'
        )
    return text


def _access_section(
    ctx: _Ctx, raw: Mapping[str, object], networks: Converter, hostnames: Sequence[str]
) -> AccessSection:
    converters = {"allow": networks, "deny": networks}
    base = {k: v for k, v in raw.items() if k != "hostnames"}
    values = _section(ctx, "access", base, AccessSection, converters)
    hosts = raw.get("hostnames", {})
    if not isinstance(hosts, dict):
        raise ctx.error("access", "hostnames", f"expected a table, got {_show(hosts)}")
    rules: list[tuple[str, AccessHostSection]] = []
    for name, table in hosts.items():
        label = f'access.hostnames."{name}"'
        if not isinstance(table, dict):
            raise ConfigError(f"{ctx.label}: [{label}]: expected a table, got {_show(table)}")
        try:
            host = normalize_hostname(name)
        except ValueError as exc:
            raise ConfigError(f"{ctx.label}: [{label}]: {exc}") from None
        if any(host == seen for seen, _ in rules):
            raise ConfigError(f"{ctx.label}: [{label}]: {host} has a table already")
        if host not in hostnames:
            raise ConfigError(
                f"{ctx.label}: [{label}]: not one of [tls] hostnames ({', '.join(hostnames)})"
            )
        rules.append(
            (host, AccessHostSection(**_section(ctx, label, table, AccessHostSection, converters)))
        )
    return AccessSection(**values, hostnames=tuple(rules))


def _home_token(ctx: _Ctx, raw: Mapping[str, object], token_file: object) -> str:
    """Exactly one of token / token_file; the file is read now. Never echoes the token."""
    token = ""
    if "token" in raw:
        try:
            token = _token(raw["token"])
        except _Invalid as exc:
            raise ctx.error("relay", "token", str(exc)) from None
    if token and token_file is not None:
        raise ctx.error("relay", "token", "set token or token_file, not both")
    if token_file is None:
        if not token:
            raise ctx.error("relay", "token", "missing; set token or token_file")
        problem = _check_token(token)
        if problem:
            raise ctx.error("relay", "token", f"the token {problem}")
        return token
    assert isinstance(token_file, Path)
    try:
        text = token_file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ctx.error("relay", "token_file", f"no such file: {token_file}") from None
    except UnicodeDecodeError:
        raise ctx.error("relay", "token_file", f"{token_file} is not UTF-8 text") from None
    except OSError as exc:
        raise ctx.error(
            "relay", "token_file", f"cannot read {token_file}: {exc.strerror or exc}"
        ) from None
    problem = _check_token(text)
    if problem:
        raise ctx.error("relay", "token_file", f"the token in {token_file} {problem}")
    return text


# ---------------------------------------------------------------------------
# masked(): the effective config for `check-config`, secrets hidden
# ---------------------------------------------------------------------------

_LISTEN_KEYS = {"listen", "http_listen", "metrics_listen", "forward_listen"}


def _masked_section(section: Any) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for sf in dataclasses.fields(section):
        if not sf.init:
            continue
        value = getattr(section, sf.name)
        if isinstance(section, RouteSection) and value is None:
            continue  # inherited from [upstream] / [watchdog]
        table[sf.name] = _plain(sf.name, value)
    return table


def _plain(key: str, value: object) -> object:
    if value is None:
        return ""
    if key in _LISTEN_KEYS:
        if isinstance(value, tuple) and value and isinstance(value[0], tuple):
            return [format_listen(v) for v in value]
        if isinstance(value, tuple) and len(value) == 2:
            return format_listen((str(value[0]), int(value[1])))
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):  # every float field is a duration
        return format_duration(value)
    if isinstance(value, tuple):
        return [_plain(key, v) for v in value]
    return str(value)  # Path, IP networks


def masked(config: HomeConfig | RelayConfig) -> dict[str, Any]:
    """The effective config as a TOML-writable dict, with the token replaced by "***"."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.name == "path":
            continue
        section = getattr(config, f.name)
        if f.name == "route":
            if section:
                out["route"] = [_masked_section(r) for r in section]
            continue
        table: dict[str, Any] = {}
        for sf in dataclasses.fields(section):
            if not sf.init:
                continue  # derived (upstream host/port/scheme)
            value = getattr(section, sf.name)
            if isinstance(section, FleetSection) and sf.name == "redis_url":
                table["redis_url"] = redact_url(value)
                continue
            if isinstance(section, HomeRelaySection) and sf.name == "token":
                if section.token_file is None:
                    table["token"] = SECRET_MASK
                continue
            if isinstance(section, AccessSection) and sf.name == "hostnames":
                table["hostnames"] = {  # [access.hostnames."name"] tables
                    name: {
                        k: _plain(k, getattr(rule, k))
                        for k in ("allow", "deny")
                        if getattr(rule, k) is not None
                    }
                    for name, rule in value
                }
                continue
            table[sf.name] = _plain(sf.name, value)
        if f.name == "relay_acme":  # [relay.acme]: a table inside [relay]
            out["relay"]["acme"] = table
        else:
            out[f.name] = table
    return out
