"""The `tunneld` command: argparse only; the work happens in the modules it calls."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from tunneld import __version__
from tunneld.errors import (
    AlreadyRunningError,
    ConfigError,
    ControlError,
    ControlPermissionError,
    NotRunningError,
    TunneldError,
    first_error,
)

if TYPE_CHECKING:
    from tunneld.config import HomeConfig, RelayConfig

DEFAULT_HOME_CONFIG = "/etc/tunneld/tunneld.toml"

# `tunneld status` exit codes (README contract), and 4: the control socket exists but
# this user may not open it (README: "Reading status as another user").
EXIT_CONNECTED, EXIT_NOT_CONNECTED, EXIT_NOT_RUNNING, EXIT_PERMISSION_DENIED = 0, 1, 3, 4
EXIT_ERROR = 2
# stdout closed by the reader (`tunneld status | head -1`): end quietly with the status a
# shell shows for a command ended by SIGPIPE, as `yes | head -1` does.
EXIT_BROKEN_PIPE = 128 + 13


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunneld", description="Remote access for a home server, TLS end to end."
    )
    parser.add_argument("--version", action="version", version=f"tunneld {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the home daemon")
    p.add_argument("-c", "--config", default=DEFAULT_HOME_CONFIG)

    p = sub.add_parser("relay", help="run the relay")
    p.add_argument("-c", "--config", required=True)

    p = sub.add_parser("status", help="ask the running daemon or relay how it is")
    p.add_argument("-c", "--config", default=DEFAULT_HOME_CONFIG)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("-c", "--config", required=True)

    p = sub.add_parser("keygen", help="make an Ed25519 token-signing key pair")
    p.add_argument("--private-key", required=True, type=Path)
    p.add_argument("--public-key", required=True, type=Path)

    cert = sub.add_parser(
        "cert", help="the home's (or, with -c relay.toml, the relay's) certificate"
    )
    csub = cert.add_subparsers(dest="cert_command", required=True, metavar="ACTION")
    p = csub.add_parser("show", help="subject, SANs, issuer, expiry and SHA-256 fingerprint")
    p.add_argument("-c", "--config", default=DEFAULT_HOME_CONFIG)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = csub.add_parser(
        "acknowledge",
        help="accept a certificate the CT watch reported (tunneld status: ct.unknown)",
    )
    p.add_argument("sha256", help="its SHA-256 fingerprint, hex or colon form")
    p.add_argument("-c", "--config", default=DEFAULT_HOME_CONFIG)

    p = sub.add_parser("demo", help="relay + daemon + a small web app on loopback")
    p.add_argument("--check", action="store_true", help="run the printed curl once and exit")
    p.add_argument("--keep", action="store_true", help="keep the temporary files")
    p.add_argument("--port", type=int, default=0, help="relay port (default: any free one)")

    token = sub.add_parser("token", help="issue or inspect tokens")
    tsub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    p = tsub.add_parser("issue", help="print a new token on stdout")
    p.add_argument("-c", "--config", required=True, help="the relay config")
    p.add_argument("--hostname", action="append", required=True, dest="hostnames")
    p.add_argument("--ttl", default="90d", help='lifetime, e.g. "90d" (default)')
    p.add_argument("--subject", default=None, help="instance name (default: first hostname)")
    p.add_argument(
        "--allow-insecure",
        action="store_true",
        help="waive the relay's current blocked_versions (later blocks still apply)",
    )
    p.add_argument(
        "--join",
        action="store_true",
        help="print one line, `tunneld join TOKEN@RELAY`, for `tunneld join -` on the home",
    )
    p.add_argument(
        "--port",
        type=int,
        default=None,
        help="with --join: the relay's public port (default: its first listen port)",
    )
    p = tsub.add_parser("inspect", help="show a token's claims (never its signature)")
    p.add_argument("token", nargs="?", help="the token (default: read stdin)")
    _add_bans_parser(sub)
    _add_init_parser(sub)
    _add_client_parser(sub)
    _add_doctor_parser(sub)
    _add_join_parser(sub)
    return parser


def _add_client_parser(sub: Any) -> None:
    client = sub.add_parser("client", help="client certificates for routes that ask for one")
    csub = client.add_subparsers(dest="client_command", required=True, metavar="ACTION")
    p = csub.add_parser("issue", help="a password-protected PKCS#12 file for a device")
    p.add_argument("--name", required=True, help="the device's name, e.g. phone")
    p.add_argument("-c", "--config", default=DEFAULT_HOME_CONFIG)
    p.add_argument("-o", "--out", type=Path, help="the .p12 file to write (default: NAME.p12)")
    p.add_argument("--password-file", type=Path, help="read the password from this file")
    p.add_argument("--days", type=int, default=825, help="validity (default 825)")
    p.add_argument("--force", action="store_true", help="overwrite the .p12 file")
    p = csub.add_parser("list", help="the certificates issued, revoked ones marked")
    p.add_argument("-c", "--config", default=DEFAULT_HOME_CONFIG)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = csub.add_parser("revoke", help="refuse a device's certificate from the next handshake")
    p.add_argument("name")
    p.add_argument("-c", "--config", default=DEFAULT_HOME_CONFIG)


def _client(args: argparse.Namespace) -> int:
    from tunneld.home.certs.clients import client_command

    return client_command(
        args.config,
        args.client_command,
        name=getattr(args, "name", None),
        out=getattr(args, "out", None),
        password_file=getattr(args, "password_file", None),
        days=getattr(args, "days", 825),
        force=getattr(args, "force", False),
        as_json=getattr(args, "json", False),
    )


def _add_join_parser(sub: Any) -> None:
    p = sub.add_parser(
        "join",
        help="pair this home with a relay: the line `token issue --join` printed, or - (stdin)",
    )
    p.add_argument(
        "line",
        help="- to read the line from stdin (keeps the token out of shell history and ps)",
    )
    p.add_argument("-c", "--config", default=DEFAULT_HOME_CONFIG, type=Path)
    p.add_argument("--upstream", help="the local app (default: keep, or http://127.0.0.1:8123)")
    p.add_argument("--ca-file", type=Path, help="an extra CA for the relay's certificate")
    p.add_argument(
        "--agree-tos",
        action="store_true",
        help="agree to the ACME CA's terms of service (turns ACME on)",
    )
    p.add_argument("--resolve", action="append", default=[], metavar="NAME:ADDRESS")


def _join(args: argparse.Namespace) -> int:
    from tunneld.checks import check_config
    from tunneld.config import load_config
    from tunneld.doctor import run_doctor
    from tunneld.join import apply_join, parse_join_line

    if args.line == "-":
        text = sys.stdin.readline()
    else:
        text = args.line
        print(
            "tunneld: warning: the token was on the command line, where shell history and "
            "`ps` see it; next time use `tunneld join -` and paste the line",
            file=sys.stderr,
        )
    line = parse_join_line(text)
    for note in apply_join(
        args.config, line, upstream=args.upstream, agree_tos=args.agree_tos, ca_file=args.ca_file
    ):
        print(note)
    findings = check_config(load_config(args.config))
    for warning in findings.warnings:
        print(f"tunneld: warning: {warning}", file=sys.stderr)
    if findings.errors:
        for error in findings.errors:
            print(f"tunneld: {error}", file=sys.stderr)
        return EXIT_ERROR
    print(f"check-config: {args.config} is valid")
    print("doctor:", flush=True)
    report = run_doctor(
        str(args.config), args.resolve, echo=lambda text: print(f"  {text}", flush=True)
    )
    print(f"  {report.summary()}")
    running = not any(c.name == "tunnel" and "not running" in c.message for c in report.checks)
    if running:
        print("next: `systemctl reload tunneld` (the daemon runs: it picks up the new token)")
    else:
        print(
            "next: `systemctl enable --now tunneld` (see README: Setting it up), then "
            f"`tunneld doctor -c {args.config}`"
        )
    return 0


def _add_doctor_parser(sub: Any) -> None:
    p = sub.add_parser(
        "doctor", help="check a home or relay setup end to end; one line per check, with its fix"
    )
    p.add_argument("-c", "--config", default=DEFAULT_HOME_CONFIG)
    p.add_argument(
        "--resolve",
        action="append",
        default=[],
        metavar="NAME:ADDRESS",
        help="use ADDRESS for NAME instead of DNS (repeatable), e.g. before the records exist",
    )


def _doctor(args: argparse.Namespace) -> int:
    from tunneld.doctor import run_doctor

    print(f"tunneld doctor: {args.config}", flush=True)
    report = run_doctor(args.config, args.resolve, echo=lambda line: print(line, flush=True))
    print(report.summary())
    return report.exit_code


def _add_init_parser(sub: Any) -> None:
    p = sub.add_parser("init", help="write a commented config file (every key, with defaults)")
    p.add_argument("-o", "--output", required=True, type=Path, help="the file to write")
    p.add_argument("--role", choices=("home", "relay"), default="home")
    p.add_argument("--relay", dest="relay_url", help="the relay's wss:// tunnel URL")
    p.add_argument("--token", help="the token from `tunneld token issue`")
    p.add_argument("--token-file", type=Path, help="a file holding the token instead")
    p.add_argument(
        "--hostname",
        action="append",
        default=[],
        dest="hostnames",
        help="a public hostname (repeat for more); for --role relay, the relay's own",
    )
    p.add_argument("--upstream", help="the local app, e.g. http://127.0.0.1:8123")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.add_argument(
        "--agree-tos",
        action="store_true",
        help="agree to the ACME CA's terms of service (Let's Encrypt: "
        "https://letsencrypt.org/repository/); without it ACME stays off",
    )
    p.add_argument(
        "--lan-listen",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help='also serve on the home network ([lan] listen), e.g. "0.0.0.0:443" (repeat)',
    )
    p.add_argument(
        "--route",
        action="append",
        default=[],
        dest="routes",
        metavar="HOSTNAME=URL",
        help="one more service: a [[route]] from HOSTNAME to the upstream URL (repeat)",
    )


def _init(args: argparse.Namespace) -> int:
    from tunneld.initconfig import init_command

    print(
        init_command(
            args.output,
            role=args.role,
            relay_url=args.relay_url,
            token=args.token,
            token_file=args.token_file,
            hostnames=args.hostnames,
            upstream=args.upstream,
            force=args.force,
            agree_tos=args.agree_tos,
            lan_listen=args.lan_listen,
            routes=args.routes,
        )
    )
    return 0


def _add_bans_parser(sub: Any) -> None:
    bans = sub.add_parser("bans", help="list, add or remove client IP bans")
    bsub = bans.add_subparsers(dest="bans_command", required=True, metavar="ACTION")
    p = bsub.add_parser("list", help="the active bans")
    p.add_argument("-c", "--config", default=DEFAULT_HOME_CONFIG)
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p = bsub.add_parser("add", help="ban an address (or an IPv6 /64)")
    p.add_argument("ip")
    p.add_argument("-c", "--config", default=DEFAULT_HOME_CONFIG)
    p.add_argument("--duration", help='e.g. "24h"; "0" = until removed (default: ban_duration)')
    p.add_argument("--reason", help="noted in the list and the log")
    p.add_argument("--json", action="store_true", help="print the ban as JSON")
    p = bsub.add_parser("remove", help="lift every ban covering an address")
    p.add_argument("ip")
    p.add_argument("-c", "--config", default=DEFAULT_HOME_CONFIG)
    p.add_argument("--json", action="store_true", help="print the lifted bans as JSON")


def _bans(args: argparse.Namespace) -> int:
    from tunneld.home.watchdog.banctl import bans_command

    return bans_command(
        args.config,
        args.bans_command,
        getattr(args, "ip", None),
        duration=getattr(args, "duration", None),
        reason=getattr(args, "reason", None),
        as_json=args.json,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        try:
            code = _dispatch(args)
        except BaseExceptionGroup as group:
            # A nursery's group carrying one of ours is that one error, on one line.
            exc = first_error(group)
            if not isinstance(exc, TunneldError | BrokenPipeError):
                raise
            raise exc from None
        sys.stdout.flush()  # a closed stdout shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_BROKEN_PIPE
    except NotRunningError as exc:
        print(f"tunneld: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except ControlPermissionError as exc:
        print(f"tunneld: {exc}", file=sys.stderr)
        return EXIT_PERMISSION_DENIED if args.command == "status" else EXIT_ERROR
    except TunneldError as exc:
        print(f"tunneld: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush finds no closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _dispatch(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "run":
        return _run(args.config)
    if cmd == "relay":
        return _relay(args.config)
    if cmd == "status":
        return _status(args.config, args.json)
    if cmd == "check-config":
        return _check_config(args.config)
    if cmd == "keygen":
        from tunneld.tokens import generate_keypair

        generate_keypair(args.private_key, args.public_key)
        print(f"wrote {args.private_key} (private, 0600) and {args.public_key} (public)")
        return 0
    if cmd == "demo":
        from tunneld.demo import main as demo_main
        from tunneld.logs import setup_logging

        setup_logging("warning")
        return demo_main(check=args.check, keep=args.keep, port=args.port)
    if cmd == "cert":
        if args.cert_command == "acknowledge":
            from tunneld.home.ctctl import acknowledge_command

            return acknowledge_command(args.config, args.sha256)
        return _cert_show(args.config, args.json)
    if cmd == "bans":
        return _bans(args)
    if cmd == "init":
        return _init(args)
    if cmd == "client":
        return _client(args)
    if cmd == "doctor":
        return _doctor(args)
    if cmd == "join":
        return _join(args)
    if cmd == "token":
        if args.token_command == "issue":
            return _token_issue(args)
        return _token_inspect(args.token)
    raise AssertionError(cmd)


def _freeze_startup_heap() -> None:
    """Take what start-up built (modules, classes, the config) out of the cyclic GC's
    sight. A full collection walked all ~50,000 of those objects, a 20+ ms pause for every
    stream under load (bench/RESULTS.md), and they live as long as the process."""
    gc.collect()
    gc.freeze()


def _run(path: str) -> int:
    from tunneld.config import HomeConfig
    from tunneld.home.daemon import run_daemon

    return _start(path, HomeConfig, run_daemon)


def _relay(path: str) -> int:
    from tunneld.config import RelayConfig
    from tunneld.relay.server import run_relay

    return _start(path, RelayConfig, run_relay)


def _start(path: str, kind: type[HomeConfig] | type[RelayConfig], main: Any) -> int:
    """`tunneld run` (a HomeConfig) or `tunneld relay` (a RelayConfig): check, then serve."""
    from tunneld.config import HomeConfig, load_config
    from tunneld.errors import ConfigError
    from tunneld.logs import setup_logging

    config = load_config(path)
    home = kind is HomeConfig
    if not isinstance(config, kind):
        if home:
            raise ConfigError(
                f"{path}: this is a relay config; run it with `tunneld relay -c {path}`"
            )
        raise ConfigError(f"{path}: this is a home config; run it with `tunneld run -c {path}`")
    section = config.daemon if isinstance(config, HomeConfig) else config.relay
    what = "a daemon" if home else "a relay"
    _refuse_if_running(section.control_socket, path, what)
    _preflight(config)
    setup_logging(section.log_level)
    _log_warnings(config)
    _freeze_startup_heap()
    return _serve(main, config, path, what)


def _refuse_if_running(socket_path: Path, path: str, what: str) -> None:
    """A second process on the same config stops here, before it touches the first one's
    state files. (The control socket's own check, at bind, covers a race.)"""
    import socket

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(socket_path))
    except OSError:
        return  # nothing listens (or we may not tell): the bind decides
    finally:
        probe.close()
    raise _already_running(AlreadyRunningError("", str(socket_path)), path, what)


def _preflight(config: HomeConfig | RelayConfig) -> None:
    """Open every file the process will open, and decode the token, before starting:
    the first failure is the one line the user sees (exit 2), never a traceback."""
    from tunneld.checks import check_config

    findings = check_config(config, starting=True)
    if findings.errors:
        raise ConfigError(findings.errors[0])


def _log_warnings(config: HomeConfig | RelayConfig) -> None:
    import logging

    from tunneld.checks import check_config

    for warning in check_config(config, starting=True).warnings:
        logging.getLogger("tunneld.config").warning("%s", warning)


def _serve(main: Any, config: HomeConfig | RelayConfig, path: str, what: str) -> int:
    try:
        result: int = trio.run(main, config)
    except BaseExceptionGroup as group:
        exc = first_error(group)
        if not isinstance(exc, TunneldError):
            raise
        if isinstance(exc, AlreadyRunningError):
            raise _already_running(exc, path, what) from None
        raise exc from None
    except AlreadyRunningError as exc:
        raise _already_running(exc, path, what) from None
    return result


def _already_running(exc: AlreadyRunningError, path: str, what: str) -> TunneldError:
    return TunneldError(
        f"{what} is already running with this config: its control socket {exc.socket_path} "
        f"answers; see it with `tunneld status -c {path}`"
    )


def _status(path: str, as_json: bool) -> int:
    from tunneld.config import RelayConfig, load_config
    from tunneld.control import get_json

    config = load_config(path)
    socket_path = (
        config.relay.control_socket
        if isinstance(config, RelayConfig)
        else config.daemon.control_socket
    )
    try:
        status = trio.run(get_json, socket_path, "/v1/status")
    except NotRunningError:
        if as_json:
            print(json.dumps({"state": "not running", "control_socket": str(socket_path)}))
        else:
            print(f"not running (no answer on {socket_path})")
        return EXIT_NOT_RUNNING
    except ControlPermissionError:
        raise  # exit 4, with who may open the socket
    except ControlError as exc:
        print(f"tunneld: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    assert isinstance(status, dict)
    if as_json:
        print(json.dumps(status, indent=2))
    else:
        print(_format_status(status))
    if status.get("role") == "relay":
        return EXIT_CONNECTED if status.get("state") == "running" else EXIT_NOT_CONNECTED
    return EXIT_CONNECTED if status.get("state") == "connected" else EXIT_NOT_CONNECTED


def _format_status(st: dict[str, Any]) -> str:
    lines: list[str] = []
    if st.get("role") == "relay":
        lines.append(f"relay {st['hostname']}: {st['state']} (tunneld {st['version']})")
        lines.append(f"  listening   {', '.join(st['listen'])}")
        if st.get("metrics_listen"):
            lines.append(f"  metrics     http://{st['metrics_listen'][0]}/metrics")
        if st.get("certificate"):
            c = st["certificate"]
            lines.append(f"  certificate {', '.join(c['sans'])}, expires {c['not_after']}")
        if "streams" in st:
            lines.append(
                f"  streams     {st['streams']['active']} active, {st['streams']['total']} total"
            )
        lines.append(f"  sessions    {len(st['sessions'])}")
        for s in st["sessions"]:
            gone = " (going away)" if s.get("going_away") else ""
            lines.append(
                f"    {s['id']}  {s['subject']}  {', '.join(s['hostnames'])}  "
                f"streams {s['streams']['active']}/{s['streams']['total']}  "
                f"from {s['peer']} since {s['connected_since']}{gone}"
            )
        lines.extend(f"WARNING: {w}" for w in st.get("warnings") or ())
        return "\n".join(lines)
    state = st["state"]
    if state == "connected":
        head = f"connected since {st['connected_since']} (session {st['session_id']})"
    elif st.get("next_retry"):
        head = f"{state}, next attempt at {st['next_retry']}"
    else:
        head = state
    lines.append(f"tunneld {st['version']}: {head}")
    lines.append(f"  relay       {st['relay']}")
    lines.append(f"  hostnames   {', '.join(st['hostnames'])}")
    lines.append(f"  upstream    {_upstream_text(st)}")
    lines.extend(_paths_and_routes(st))
    if st.get("rtt_ms") is not None:
        lines.append(f"  ping        {st['rtt_ms']} ms")
    streams = st["streams"]
    ws = f" ({streams['websockets']} WebSockets)" if streams.get("websockets") else ""
    lines.append(f"  streams     {streams['active']} active{ws}, {streams['total']} total")
    lines.append(f"  bytes       {st['bytes']['in']} in, {st['bytes']['out']} out")
    cert = st.get("certificate")
    if cert:
        lines.extend(_certificate_lines(cert, "  certificate "))
    if st.get("last_error"):
        lines.append(f"  last error  {st['last_error']}")
    token = st.get("token")
    if token:
        lines.append(
            f"  token       {token['id']} ({token['subject']}), expires {token['expires_at']} "
            f"({token['days_left']} days left)"
        )
    if st.get("metrics_listen"):
        lines.append(f"  metrics     http://{st['metrics_listen'][0]}/metrics")
    bans = st.get("bans") or []
    lines.append(f"  bans        {len(bans)}")
    lines.extend(
        f"    {b['ip']}  " + (f"until {b['until']}" if b.get("until") else "permanent")
        for b in bans[:20]
    )
    if len(bans) > 20:
        lines.append(f"    ... and {len(bans) - 20} more (tunneld bans list)")
    access = st.get("access")
    if access and access.get("rules"):
        ha = access.get("home_assistant_bans")
        line = f"  access      allow {len(access['allow'])}, deny {len(access['deny'])}"
        if access.get("hostnames"):
            line += f", {len(access['hostnames'])} hostname rule(s)"
        if ha:
            line += f", Home Assistant bans {ha['addresses']} ({ha['file']})"
        enforced = {True: "at the relay", False: "at home only"}.get(access.get("relay_enforces"))
        lines.append(line + (f"; enforced {enforced}" if enforced else ""))
    lines.extend(f"WARNING: {w}" for w in st.get("warnings") or ())
    return "\n".join(lines)


def _paths_and_routes(st: dict[str, Any]) -> list[str]:
    """The LAN path beside the relay's, and the [[route]]s (issue 17)."""
    lines = []
    lan = (st.get("paths") or {}).get("lan")
    if lan and lan.get("state") == "listening":
        lines.append(
            f"  lan         listening on {', '.join(lan['listen'])}: "
            f"{lan['active']} active, {lan['total']} total (serves with the relay down)"
        )
    routes = [r for r in st.get("routes") or () if r.get("name") != "default"]
    for r in routes:
        client = (
            f", client certificate {r['client_certificate']}" if r.get("client_certificate") else ""
        )
        lines.append(
            f"  route       {r['name']} -> {r['upstream']} ({r['preset']}{client}): "
            f"{r['requests']} requests, {r['misdirected']} misdirected (421)"
        )
    return lines


def _upstream_text(st: dict[str, Any]) -> str:
    check = st.get("upstream_check") or {}
    if check.get("reachable") is None:
        return str(st.get("upstream", ""))
    if check["reachable"]:
        return f"{check['url']} (reachable at {check['checked_at']})"
    return f"{check['url']} (UNREACHABLE at {check['checked_at']}: {check['error']})"


def _certificate_lines(cert: dict[str, Any], head: str) -> list[str]:
    fp = cert["sha256"].upper()
    colon = ":".join(fp[i : i + 2] for i in range(0, len(fp), 2))
    pad = " " * len(head)
    days = cert.get("days_left")
    left = f" ({days} days left)" if days is not None else ""
    lines = [
        f"{head}{cert['subject']}",
        f"{pad}SANs     {', '.join(cert['sans'])}",
        f"{pad}issuer   {cert['issuer']}" + (" (self-signed)" if cert.get("self_signed") else ""),
        f"{pad}expires  {cert['not_after']}{left}",
        f"{pad}SHA-256  {colon}",
    ]
    renewal = cert.get("renewal")
    if renewal:
        state = renewal["state"] + (f": {renewal['last_error']}" if renewal["last_error"] else "")
        lines.append(f"{pad}renewal  {state}")
    return lines


def _cert_show(path: str, as_json: bool) -> int:
    from cryptography import x509

    from tunneld.config import RelayConfig, load_config
    from tunneld.home.certs.store import CertificateStore, certificate_facts, is_self_signed
    from tunneld.pki import certificate_info

    # The file the daemon (or the relay) serves, read directly: works whether or not it runs.
    config = load_config(path)
    if isinstance(config, RelayConfig):
        cert_path = config.relay.certificate
    else:
        cert_path = CertificateStore(config).cert_path
    try:
        pem = cert_path.read_bytes()
    except FileNotFoundError:
        raise TunneldError(
            f"no certificate at {cert_path} yet (the daemon creates it when it starts)"
        ) from None
    except OSError as exc:
        raise TunneldError(f"cannot read {cert_path}: {exc.strerror or exc}") from None
    info = certificate_info(pem)
    self_signed = is_self_signed(x509.load_pem_x509_certificates(pem)[0])
    facts = {"path": str(cert_path), **certificate_facts(info, self_signed, time.time())}
    if as_json:
        print(json.dumps(facts, indent=2))
    else:
        print("\n".join([f"{cert_path}", *_certificate_lines(facts, "  subject  ")]))
    return 0


def _check_config(path: str) -> int:
    from tunneld.checks import check_config
    from tunneld.config import HomeConfig, load_config, masked

    config = load_config(path)
    findings = check_config(config)
    for warning in findings.warnings:
        print(f"tunneld: warning: {warning}", file=sys.stderr)
    if findings.errors:
        for error in findings.errors:
            print(f"tunneld: {error}", file=sys.stderr)
        return EXIT_ERROR
    role = "home daemon" if isinstance(config, HomeConfig) else "relay"
    note = f" ({len(findings.warnings)} warning(s), above)" if findings.warnings else ""
    print(f"{path}: valid {role} config; every file it names was opened and parsed{note}")
    print(json.dumps(masked(config), indent=2, default=str))
    return 0


def _token_issue(args: argparse.Namespace) -> int:
    from tunneld.config import (
        RelayConfig,
        domain_allows,
        load_config,
        normalize_hostname,
        parse_duration,
    )
    from tunneld.errors import ConfigError
    from tunneld.tokens import issue_token, load_private_key

    config = load_config(args.config)
    if not isinstance(config, RelayConfig):
        raise ConfigError(f"{args.config}: token issue needs the relay config")
    if config.relay.token_private_key is None:
        raise ConfigError(
            f"{args.config}: [relay] token_private_key: needed to issue tokens "
            "(make one with `tunneld keygen`)"
        )
    try:
        ttl = parse_duration(args.ttl)
    except ValueError:
        raise ConfigError(f'--ttl: expected a duration like "90d", got {args.ttl!r}') from None
    hostnames = list(args.hostnames)
    outside = []
    for name in hostnames:
        try:
            normal = normalize_hostname(name)
        except ValueError:
            continue  # issue_token refuses it, with its own reason
        if not domain_allows(config.relay.allowed_domains, normal):
            outside.append(normal)
    if outside:
        raise ConfigError(
            f"--hostname {', '.join(outside)}: outside this relay's domains; "
            f"{args.config}: [relay] allowed_domains is "
            f"{', '.join(config.relay.allowed_domains)} (add the domain there if this relay "
            "serves it, and point its DNS at the relay)"
        )
    key = load_private_key(config.relay.token_private_key)
    token = issue_token(
        key,
        hostnames=hostnames,
        subject=args.subject or hostnames[0],
        ttl=ttl,
        allow_insecure=config.relay.blocked_versions if args.allow_insecure else (),
    )
    if args.join:
        from tunneld.join import format_join_line

        port = args.port if args.port is not None else _public_port(config)
        print(format_join_line(token, config.relay.hostname, port))
        print(
            "tunneld: on the home, run `tunneld join -` and paste this line (stdin keeps the "
            "token out of shell history and ps)",
            file=sys.stderr,
        )
        return 0
    print(token)
    return 0


def _public_port(config: RelayConfig) -> int:
    """The relay's first listen port; when that is 0 (any), the running relay's."""
    from tunneld.control import get_json

    port = config.relay.listen[0][1]
    if port:
        return port
    try:
        status = trio.run(get_json, config.relay.control_socket, "/v1/status")
        assert isinstance(status, dict)
        return int(str(status["listen"][0]).rsplit(":", 1)[1])
    except (TunneldError, OSError, KeyError, IndexError, ValueError, AssertionError):
        raise ConfigError(
            f"{config.path}: [relay] listen: port 0 and no running relay to ask; give --port"
        ) from None


def _token_inspect(token: str | None) -> int:
    from tunneld.tokens import decode_claims_unverified

    text = token if token is not None else sys.stdin.read().strip()
    claims = decode_claims_unverified(text)
    now = time.time()
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    out = {
        "id": claims.token_id,
        "subject": claims.subject,
        "hostnames": list(claims.hostnames),
        "issued_at": time.strftime(fmt, time.gmtime(claims.issued_at)),
        "expires_at": time.strftime(fmt, time.gmtime(claims.expires_at)),
        "expired": claims.expires_at <= now,
        "days_left": round((claims.expires_at - now) / 86400, 1),
        "allow_insecure": list(claims.allow_insecure),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
