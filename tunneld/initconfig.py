"""`tunneld init`: write a complete, commented config file for either role.

Every key is written with a comment and its value (the dataclass defaults,
formatted by tomli-w, with the user's answers filled in), so the file doubles
as documentation. The comments are the ones in conf/ (a test keeps the two
the same). The text is loaded with the real loader before it is written, so
`init` never leaves an invalid file; a home config holds the token, so the
file is created with mode 0600 and an existing file is kept unless `force`.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from tunneld.checks import PLACEHOLDER_TOKEN
from tunneld.config import (
    AcmeSection,
    HomeConfig,
    HomeRelaySection,
    LanSection,
    Listen,
    RelayConfig,
    RelaySection,
    RouteSection,
    TlsSection,
    UpstreamSection,
    load_config,
    masked,
    normalize_hostname,
    parse_listen,
)
from tunneld.errors import ConfigError
from tunneld.files import atomic_write

__all__ = [
    "HOME_COMMENTS",
    "PLACEHOLDER_TOKEN",
    "RELAY_COMMENTS",
    "home_config_text",
    "relay_config_text",
    "write_config",
]

FILE_MODE = 0o600
WIDTH = 98

HOME_HEADER = """\
# tunneld home daemon configuration (`tunneld run -c tunneld.toml`).
# Every key is shown with its default; required keys are marked. Relative paths
# resolve against this file's folder. Durations: "250ms", "30s", "10m", "24h", "30d".
# After an edit: `tunneld check-config -c FILE`, then `systemctl reload tunneld`.
"""

RELAY_HEADER = """\
# tunneld relay configuration (`tunneld relay -c relay.toml`).
# Every key is shown with its default; required keys are marked. Relative paths
# resolve against this file's folder. Durations: "250ms", "30s", "10m", "24h", "30d".
# After an edit: `tunneld check-config -c FILE`, then `systemctl reload tunneld-relay`.
"""

# The keys [acme] (home) and [relay.acme] share, with the same meaning.
_ACME_COMMENTS: dict[str, str] = {
    "directory": "ACME directory URL.",
    "email": 'Contact address for the ACME account; "" = none.',
    "ca_file": 'Extra CA file (PEM) to trust for the ACME server; "" = system CAs.',
    "renew_before": "Renew this long before the certificate expires.",
    "key_type": 'Certificate key type: "ec256" or "rsa2048".',
    "retry_initial": (
        "First retry delay after a failed order; it doubles (with jitter) after each failure."
    ),
    "retry_max": "Longest retry delay.",
    "check_interval": "Longest time between two looks at the certificate's expiry.",
    "jitter": ("Renew up to this much earlier than renew_before (random), so renewals spread out."),
}

HOME_COMMENTS: dict[str, dict[str, str]] = {
    "relay": {
        "url": "Required. The relay's tunnel endpoint (wss://, or ws:// for tests only).",
        "token": "The token from `tunneld token issue`; set this or token_file, not both.",
        "token_file": (
            'A file holding the token (read at start, whitespace stripped); "" = use token above.'
        ),
        "ca_file": 'Extra CA file (PEM) to trust for the relay\'s certificate; "" = system CAs.',
        "connect_to": (
            "Connect to this address instead of resolving the URL's host (TLS still checks "
            "the URL's name)."
        ),
        "connect_timeout": "How long one connection attempt to the relay may take.",
        "ping_interval": 'Ping interval; "" = use the value the relay sends in WELCOME.',
        "ping_timeout": (
            "The session is considered dead when a ping gets no answer within this time."
        ),
        "backoff_initial": "First reconnect delay; it doubles (with jitter) after each failure.",
        "backoff_max": "Longest reconnect delay.",
        "backoff_reset_after": (
            "A session that stayed up this long resets the delay to backoff_initial."
        ),
        "blocked_retry": "Retry interval after the relay refused this version as blocked.",
        "drain_timeout": "On shutdown or replacement, how long open streams may finish.",
    },
    "tls": {
        "hostnames": "Required. Public hostnames served through the tunnel (certificate SANs).",
        "certificate": (
            'Certificate chain (PEM); "" = managed by [acme] (self-signed until issued).'
        ),
        "private_key": "Private key (PEM) for certificate; set both or neither.",
        "client_hello_timeout": "How long a client may take to send its TLS ClientHello.",
        "handshake_timeout": "How long the TLS handshake may take.",
    },
    "acme": {
        "enabled": (
            "Obtain and renew the certificate with ACME (TLS-ALPN-01 through the tunnel), once "
            "agree_tos is true."
        ),
        "agree_tos": (
            "You agree to the ACME CA's terms of service (Let's Encrypt: "
            "https://letsencrypt.org/repository/). Until true, ACME stays off, clients see a "
            "self-signed certificate and `tunneld status` says why; `tunneld init --agree-tos` "
            "writes true."
        ),
        **_ACME_COMMENTS,
    },
    "upstream": {
        "url": "The local app that requests are proxied to (http:// or https://).",
        "connect_timeout": "How long connecting to the upstream may take.",
        "ca_file": 'Extra CA file (PEM) for an https upstream; "" = system CAs.',
        "verify": "Verify an https upstream's certificate.",
        "header_timeout": (
            "A client's request head (request line and headers) must arrive within this time."
        ),
        "idle_timeout": (
            "How long an idle keep-alive connection waits for the client's next request."
        ),
        "response_timeout": (
            "How long the upstream may take to start its response once the request is sent "
            "(else 504)."
        ),
        "max_header_size": "Largest request head in bytes (1024 to 1048576); larger ones get 431.",
        "pool_size": (
            "Idle upstream connections kept open for reuse; 0 = a new connection per request."
        ),
    },
    "watchdog": {
        "preset": '"home-assistant" also counts failed Home Assistant logins; or "generic".',
        "ban_threshold": "Failed authentications from one IP that trigger a ban.",
        "ban_window": "Window in which those failures are counted.",
        "ban_duration": 'How long a ban lasts; "0" = until removed.',
        "ban_statuses": "Upstream statuses counted as failed authentications.",
        "never_ban": "Networks that are never banned (CIDRs; a bare address is a /32 or /128).",
        "trusted_proxies": "Peers whose X-Forwarded-*/Forwarded headers are trusted (CIDRs).",
        "max_streams_per_ip": "Most concurrent streams from one client IP.",
        "ipv6_prefix": (
            "IPv6 bans cover this prefix of the client's address: 128 (the address) or 64 "
            "(its /64)."
        ),
        "home_assistant_bans": (
            "Home Assistant's ban file (ip_bans.yaml in its config folder), followed live: an "
            "address it bans is refused at the relay within seconds, and admitted again when "
            'its line goes; "" = off.'
        ),
    },
    "ct": {
        "enabled": (
            "Watch certificate-transparency logs for certificates for the hostnames that this "
            "daemon did not obtain (a WARNING in the log, status and metrics). It sends the "
            "hostnames to the search API at url (they are public in CT logs anyway)."
        ),
        "interval": "How often the logs are searched.",
        "url": "A crt.sh-style search API (docs/ct-watch.md).",
    },
    "access": {
        "allow": (
            "Client networks (CIDR) that may reach the hostnames, checked at the relay before "
            "any of a client's bytes cross the tunnel; [] = every network that is not denied."
        ),
        "deny": "Client networks refused at the relay (deny wins over allow).",
        "hostnames": (
            'Rules of one hostname, e.g. {"ha.example.com" = {allow = ["192.0.2.0/24"]}}: its '
            "allow replaces the one above, its deny is added to it; {} = none."
        ),
    },
    "daemon": {
        "state_directory": "Where bans, the ACME account and certificates are kept.",
        "control_socket": "Unix socket for `tunneld status` and `tunneld bans`.",
        "log_level": 'One of "debug", "info", "warning", "error".',
        "metrics_listen": 'Prometheus metrics listener, e.g. "127.0.0.1:9464"; "" = off.',
        "max_streams": "Most concurrent streams on the relay session.",
        "stream_window": (
            "Each stream's initial receive window in bytes (16384 to 16777216),"
            " sent in the handshake."
        ),
        "max_stream_window": (
            "How far window tuning may grow one stream's window, in bytes"
            " (16384 to 16777216; = stream_window turns tuning off)."
        ),
        "session_buffer": (
            "The most all of one session's stream windows add up to, in bytes"
            " (at least max_stream_window)."
        ),
        "data_connections": (
            "Most data connections the daemon holds open to the relay at once (0 to 4096;"
            " 0 = none): plain TCP connections, each carrying one client connection's own"
            " TLS bytes."
        ),
    },
    "lan": {
        "listen": (
            'Also serve the hostnames on the home network, e.g. ["0.0.0.0:443", "[::]:443"]:'
            " the same certificate, proxy and watchdog, and it works while the relay is"
            " unreachable. [] = off."
        ),
    },
}

ROUTE_COMMENTS: dict[str, str] = {
    "hostname": "A hostname this route serves (in the token and the certificate).",
    "upstream": "Where its requests go.",
}

RELAY_COMMENTS: dict[str, dict[str, str]] = {
    "relay": {
        "hostname": (
            "Required. The relay's own public name: SNI for it reaches the tunnel endpoint "
            "/v1/tunnel."
        ),
        "listen": 'Public TLS listeners, "host:port" (IPv6 as "[::]:443").',
        "http_listen": 'Optional plain-HTTP listeners that redirect to https, e.g. ["0.0.0.0:80"].',
        "certificate": (
            "Required (unless [relay.acme] manages it). Certificate chain (PEM) for the "
            "relay's own hostname."
        ),
        "private_key": (
            "Required (unless [relay.acme] manages it). Private key (PEM) for that certificate."
        ),
        "token_public_key": (
            "Required. Ed25519 public key(s) that verify tokens; a list lets signing keys rotate."
        ),
        "token_private_key": (
            'Signing key used only by `tunneld token issue`; "" on a relay that never issues.'
        ),
        "allowed_domains": (
            'Domains `tunneld token issue` may name: "tunnel.example.com" allows it and every '
            'name below it, "*.tunnel.example.com" only the names below; [] = any name.'
        ),
        "blocked_versions": (
            'Daemon versions refused as insecure, PEP 440 specifiers, e.g. ["<0.3", "==0.4.1"].'
        ),
        "revoked_tokens": "Token ids that are refused even though their signature is valid.",
        "control_socket": "Unix socket for `tunneld status` and metrics.",
        "metrics_listen": (
            'Prometheus metrics listener, e.g. "127.0.0.1:9465"; "" = off (the control socket'
            " serves /metrics too)."
        ),
        "log_level": 'One of "debug", "info", "warning", "error".',
        "client_hello_timeout": "How long a client may take to send its TLS ClientHello.",
        "ping_interval": "Ping interval the relay asks daemons to use (sent in WELCOME).",
        "drain_timeout": "On shutdown, how long open streams may finish before they are cut.",
        "max_streams_per_session": "Most concurrent streams on one home session.",
        "stream_window": (
            "Each stream's initial receive window in bytes (16384 to 16777216),"
            " sent in the handshake."
        ),
        "max_stream_window": (
            "How far window tuning may grow one stream's window, in bytes"
            " (16384 to 16777216; = stream_window turns tuning off)."
        ),
        "session_buffer": (
            "The most all of one session's stream windows add up to, in bytes"
            " (at least max_stream_window)."
        ),
        "max_connections_per_ip": (
            "Most concurrent client connections from one source IP (0 = unlimited)."
        ),
        "connections_per_ip_per_second": (
            "Most new client connections per second from one source IP, in bursts of as many "
            "(0 = unlimited)."
        ),
        "raw_transport": (
            "Let daemons carry frames without WebSocket framing after the upgrade (tunneld-"
            "raw.1); about twice the throughput per CPU. false = plain binary WebSocket "
            "messages only."
        ),
        "data_connections": (
            "Idle data connections each home keeps open to the relay (0 to 1024; 0 = none):"
            " a client's bytes then cross the relay in the kernel, not inside the session"
            " (PROTOCOL.md section 11)."
        ),
        "proxy_protocol": (
            'Load balancers in front of the relay, as CIDRs (e.g. ["10.0.0.0/8"]): a PROXY v1/v2'
            " header from these peers names the client's address (bans and limits use it); a"
            " header from any other peer is refused. [] = no PROXY headers."
        ),
    },
    "relay.acme": {
        "enabled": (
            "Obtain and renew the relay's own certificate with ACME, once agree_tos is true; "
            "then [relay] certificate and private_key (default: in state_directory) are "
            "written by the relay, which starts with a self-signed one."
        ),
        "agree_tos": (
            "You agree to the ACME CA's terms of service (Let's Encrypt: "
            "https://letsencrypt.org/repository/). Until true, ACME stays off."
        ),
        **_ACME_COMMENTS,
        "challenge": (
            '"tls-alpn-01" on the relay\'s own TLS port, or "http-01" on http_listen (which '
            "must then be reachable on port 80)."
        ),
        "state_directory": "Where the ACME account key (and, by default, the certificate) live.",
    },
    "fleet": {
        "redis_url": (
            'Redis shared by a fleet of relays (README "Fleet"), e.g. "redis://10.0.0.5:6379/0" or'
            ' "rediss://…" for TLS; "" = a single relay, no Redis.'
        ),
        "node_id": "This relay's name in the fleet, unique; \"\" = the machine's host name.",
        "advertise": (
            'Where the other relays reach this one, "host:port" (relay-to-relay forwarding).'
        ),
        "lease_ttl": (
            "A relay renews its claims on hostnames within this; a dead relay's claims end"
            " after it."
        ),
        "forward_listen": (
            'The relay-to-relay listener, e.g. "10.0.0.11:8443"; "" = no forwarding (then'
            " a client reaches a home only through the relay holding its session)."
        ),
        "secret_file": (
            "The fleet's shared secret for forwarding: 64 hex digits (`openssl rand -hex 32`),"
            ' the same file on every relay, mode 0600; "" = no forwarding.'
        ),
    },
}


def _value(value: object) -> str:
    """One TOML value; lists stay on one line like the conf/ examples."""
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table ([access] hostnames)
        return "{" + ", ".join(f"{json.dumps(k)} = {_value(v)}" for k, v in value.items()) + "}"
    return tomli_w.dumps({"v": value})[len("v = ") :].strip()


def _render(
    header: str, tables: Mapping[str, Any], comments: Mapping[str, Mapping[str, str]]
) -> str:
    out = [header]
    for table, values in tables.items():
        if table == "route":
            for route in values:
                out.append("\n[[route]]\n")
                for key, value in route.items():
                    comment = ROUTE_COMMENTS.get(key)
                    if comment:
                        out.extend(f"# {line}\n" for line in textwrap.wrap(comment, WIDTH))
                    out.append(f"{key} = {_value(value)}\n")
            continue
        out.append(f"\n[{table}]\n")
        # A dict is a sub-table ([relay.acme]) when it has comments of its own; otherwise an
        # inline-table value ([access] hostnames = {...}).
        subtables = {
            k: v for k, v in values.items() if isinstance(v, dict) and f"{table}.{k}" in comments
        }
        for key, value in values.items():
            if key in subtables:
                continue  # after this table's keys, as [table.key]
            comment = comments.get(table, {}).get(key)
            if comment:
                out.extend(f"# {line}\n" for line in textwrap.wrap(comment, WIDTH))
            out.append(f"{key} = {_value(value)}\n")
        if subtables:
            out.append(_render("", {f"{table}.{k}": v for k, v in subtables.items()}, comments))
    return "".join(out)


def home_config_text(
    *,
    path: Path,
    relay_url: str = "wss://relay.example.com/v1/tunnel",
    token: str | None = None,
    token_file: Path | None = None,
    hostnames: Sequence[str] = ("home.example.com",),
    upstream: str = "http://127.0.0.1:8123",
    agree_tos: bool = False,
    lan_listen: Sequence[str] = (),
    routes: Sequence[str] = (),
) -> str:
    """A complete home config; without token or token_file it holds a placeholder."""
    if token is not None and token_file is not None:
        raise ConfigError("--token and --token-file: give one, not both")
    try:
        config = HomeConfig(
            path=path,
            relay=HomeRelaySection(
                url=relay_url, token=token or PLACEHOLDER_TOKEN, token_file=token_file
            ),
            tls=TlsSection(hostnames=tuple(hostnames)),
            acme=AcmeSection(agree_tos=agree_tos),
            upstream=UpstreamSection(url=upstream),
        )
    except ValueError as exc:  # the upstream URL, checked by its dataclass
        raise ConfigError(f"--upstream: {exc}") from None
    lan: list[Listen] = []
    for text in lan_listen:
        try:
            lan.append(parse_listen(text))
        except ValueError as exc:
            raise ConfigError(f"--lan-listen: {exc}") from None
    route_sections: list[RouteSection] = []
    for text in routes:
        host, sep, url = text.partition("=")
        try:
            if not sep:
                raise ValueError(f'expected HOSTNAME=URL, got "{text}"')
            UpstreamSection(url=url.strip())
            route_sections.append(
                RouteSection(hostname=normalize_hostname(host.strip()), upstream=url.strip())
            )
        except ValueError as exc:
            raise ConfigError(f"--route: {exc}") from None
    config = dataclasses.replace(
        config,
        lan=LanSection(listen=tuple(lan)),
        route=tuple(route_sections),
        tls=TlsSection(
            hostnames=tuple(
                dict.fromkeys([*config.tls.hostnames, *(r.hostname for r in route_sections)])
            )
        ),
    )
    tables = masked(config)
    for route in tables.get("route", []):  # only what was given; the rest inherits
        for key in list(route):
            if key not in ROUTE_COMMENTS:
                del route[key]
    relay = dict(tables["relay"])
    # masked() hides the token; here it is the point. Keep the conf/ key order.
    ordered = {"url": relay.pop("url"), "token": "" if token_file else token or PLACEHOLDER_TOKEN}
    tables["relay"] = {**ordered, **{k: v for k, v in relay.items() if k != "token"}}
    return _render(HOME_HEADER, tables, HOME_COMMENTS)


def relay_config_text(*, path: Path, hostname: str = "relay.example.com") -> str:
    """A complete relay config; the key files are named relative to it."""
    config = RelayConfig(
        path=path,
        relay=RelaySection(
            hostname=hostname,
            certificate=Path("relay.crt"),
            private_key=Path("relay.key"),
            token_public_key=(Path("token.pub"),),
        ),
    )
    return _render(RELAY_HEADER, masked(config), RELAY_COMMENTS)


def write_config(path: Path, text: str, *, force: bool = False) -> HomeConfig | RelayConfig:
    """Check `text` with the real loader, then write it to `path` (mode 0600) atomically.

    Refuses an existing `path` unless `force`. Errors name the file, table and key.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory")
    if path.exists() and not force:
        raise ConfigError(f"{path}: already exists; use --force to overwrite it")
    directory = path.absolute().parent
    if not directory.is_dir():
        raise ConfigError(f"{path}: the folder {directory} does not exist")
    loaded: list[HomeConfig | RelayConfig] = []

    def check(tmp: Path) -> None:
        try:
            loaded.append(load_config(tmp))
        except ConfigError as exc:
            # Name the file the user asked for, not the scratch file.
            raise ConfigError(str(exc).replace(str(tmp), str(path))) from None

    try:
        # Mode 0600: the file holds the token. Without --force, a file that appeared
        # meanwhile is not overwritten (exclusive).
        atomic_write(path, text.encode("utf-8"), mode=FILE_MODE, exclusive=not force, check=check)
    except FileExistsError:
        raise ConfigError(f"{path}: already exists; use --force to overwrite it") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write: {exc.strerror or exc}") from None
    config = loaded[0]
    return dataclasses.replace(config, path=path.absolute())


def init_command(
    output: Path,
    *,
    role: str = "home",
    relay_url: str | None = None,
    token: str | None = None,
    token_file: Path | None = None,
    hostnames: Sequence[str] = (),
    upstream: str | None = None,
    force: bool = False,
    agree_tos: bool = False,
    lan_listen: Sequence[str] = (),
    routes: Sequence[str] = (),
) -> str:
    """`tunneld init`: write the file; returns what to tell the user (never the token)."""
    output = Path(output)
    if role == "relay":
        if (
            relay_url
            or token
            or token_file
            or upstream
            or agree_tos
            or lan_listen
            or routes
            or len(hostnames) > 1
        ):
            raise ConfigError(
                "--role relay takes only --hostname (the relay's own name) and -o/--force"
            )
        text = relay_config_text(path=output, **({"hostname": hostnames[0]} if hostnames else {}))
        write_config(output, text, force=force)
        return (
            f"wrote {output} (relay config). Next: put the relay certificate (relay.crt, "
            "relay.key) and token.pub (`tunneld keygen`) beside it; to issue tokens here, set "
            'token_private_key = "token.key" (the private half); then '
            f"`tunneld check-config -c {output}`"
        )
    home: dict[str, Any] = {"path": output}
    if relay_url:
        home["relay_url"] = relay_url
    if hostnames:
        home["hostnames"] = tuple(hostnames)
    if upstream:
        home["upstream"] = upstream
    text = home_config_text(
        token=token,
        token_file=Path(token_file).absolute() if token_file else None,
        agree_tos=agree_tos,
        lan_listen=lan_listen,
        routes=routes,
        **home,
    )
    write_config(output, text, force=force)
    note = f"wrote {output} (home config, mode 0600)."
    if token is None and token_file is None:
        note += " Next: replace REPLACE-WITH-TOKEN with the token from `tunneld token issue`."
    if not agree_tos:
        note += (
            " ACME (Let's Encrypt) stays off until you agree to the CA's terms: "
            "[acme] agree_tos = true, or init again with --agree-tos."
        )
    return f"{note} Check it with `tunneld check-config -c {output}`"
