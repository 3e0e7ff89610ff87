"""`tunneld doctor` for the home: from the config to a request through the relay.

The checks, in order (each one line): config, relay (resolves, TLS verifies, /healthz),
clock (against the relay's Date header), token (unexpired by the relay's clock, naming
every hostname), session (the tunnel handshake with the token, answered without
opening a session), dns (each hostname resolves to the relay, not to this network),
tunnel (a request through the relay reaches this daemon and shows its certificate),
upstream (the app answers),
forwarded (the app accepts X-Forwarded-For from this host: Home Assistant answers 400
both without `use_x_forwarded_for` and with the proxy missing from `trusted_proxies`),
certificate (days left, or renewal working).
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509

from tunneld import __version__
from tunneld.checks import PLACEHOLDER_TOKEN, check_home, client_context
from tunneld.config import HomeConfig, split_connect_to
from tunneld.doctor import Report
from tunneld.doctor.probes import (
    HttpAnswer,
    Resolver,
    colon,
    describe,
    http_request,
    insecure_context,
    is_lan_address,
    open_tcp,
    open_tls,
    running_status,
)
from tunneld.errors import ConfigError, TokenError
from tunneld.hostnames import hostname_key
from tunneld.tokens import decode_claims_unverified
from tunneld.transport.channel import RAW_SUBPROTOCOL

__all__ = ["check_home_setup"]

CLOCK_WARN = 60.0  # seconds of skew: tolerable, but worth fixing
CLOCK_FAIL = 600.0  # tokens and certificates start to look wrong
TOKEN_SOON = 14 * 86400.0
SAMPLE_CLIENT = "203.0.113.7"  # a documentation address (RFC 5737) as the forwarded client
HA_SNIPPET = (
    "add `http: {use_x_forwarded_for: true, trusted_proxies: [127.0.0.1, ::1]}` to Home "
    "Assistant's configuration.yaml (README: Home Assistant and the reverse proxy) and "
    "restart it"
)
REISSUE = (
    "on the relay, `tunneld token issue -c relay.toml --hostname {names} --join`, "
    "then `tunneld join -` here"
)
FIREWALL = (
    "check that the relay runs (`tunneld doctor -c relay.toml` on it) and that its "
    "firewall and the VPS provider's let TCP port {port} in (e.g. `ufw allow {port}/tcp`)"
)


@dataclass
class RelayProbe:
    """What the relay check learned, for the checks after it."""

    host: str  # the URL's name (SNI, certificate)
    port: int
    dial: str  # the name or address dialed (connect_to, else host)
    addresses: list[str]
    reached: str | None = None  # the address that answered
    verified: bool = False
    date: float | None = None  # the relay's clock (Date header), Unix time
    local_at_date: float | None = None  # this machine's clock when that answer came


def check_home_setup(config: HomeConfig, resolver: Resolver, report: Report) -> None:
    if not _config(config, report):
        return
    relay = _relay(config, resolver, report)
    skew = _clock(relay, report)
    _token(config, skew, report)
    _session(config, relay, report)
    _dns(config, relay, resolver, report)
    status = running_status(config.daemon.control_socket)
    _tunnel(config, relay, status, report)
    if _upstream(config, report):
        _forwarded(config, report)
    _certificate(config, status, report)


# -- config ---------------------------------------------------------------------------


def _config(config: HomeConfig, report: Report) -> bool:
    findings = check_home(config)
    if findings.errors:
        more = f" (and {len(findings.errors) - 1} more)" if len(findings.errors) > 1 else ""
        fix = "correct the key it names, then run doctor again"
        if PLACEHOLDER_TOKEN in findings.errors[0]:
            fix = "get a token from the relay's operator and run `tunneld join -` with it"
        report.fail("config", findings.errors[0] + more, fix)
        return False
    report.ok("config", f"{config.path} is a valid home config; every file it names opens")
    return True


# -- the relay ------------------------------------------------------------------------


def _relay(config: HomeConfig, resolver: Resolver, report: Report) -> RelayProbe:
    parts = urlsplit(config.relay.url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    dial, port = (
        split_connect_to(config.relay.connect_to, port)
        if config.relay.connect_to
        else (
            host,
            port,
        )
    )
    probe = RelayProbe(host, port, dial, [])
    try:
        probe.addresses = resolver.resolve(dial)
    except OSError as exc:
        report.fail(
            "relay",
            f"{dial} {describe(exc)}",
            "check the name in [relay] url; the relay's operator must give it an A/AAAA record",
        )
        return probe
    secure = parts.scheme == "wss"
    context = _relay_context(config) if secure else None
    errors: list[str] = []
    for address in probe.addresses:
        try:
            answer, verified, cert = _healthz(address, port, host, context)
        except ssl.SSLCertVerificationError as exc:
            probe.reached = None
            report.fail(
                "relay",
                f"{host} at {address}:{port}: {describe(exc)}",
                "the relay needs a certificate for its name from a public CA (README: Your "
                "first hour); for a private CA set [relay] ca_file here",
            )
            return probe
        except (OSError, ValueError) as exc:
            errors.append(f"{address}: {describe(exc)}")
            continue
        probe.reached, probe.verified = address, verified
        probe.date, probe.local_at_date = answer.date(), answer.received_at
        where = f"{host} at {address}:{port}"
        if verified or not secure:
            report.ok("relay", f"{where} answers /healthz {answer.status} (TLS verified)")
        elif _clock_only(cert, probe.date):
            report.warn(
                "relay",
                f"{where}: its certificate looks invalid only by this machine's clock "
                f"(it is valid by the relay's); the session check is skipped",
                "correct this machine's clock (see the clock check)",
            )
        else:
            report.fail(
                "relay",
                f"{where}: {errors[-1] if errors else 'certificate does not verify'}",
                "the relay needs a certificate for its name from a public CA (README: Your "
                "first hour); for a private CA set [relay] ca_file here",
            )
        return probe
    report.fail(
        "relay",
        f"cannot reach {host} at port {port}: " + "; ".join(errors),
        FIREWALL.format(port=port),
    )
    return probe


def _relay_context(config: HomeConfig) -> ssl.SSLContext:
    ctx = client_context(f"{config.path}: [relay] ca_file", config.relay.ca_file)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _healthz(
    address: str, port: int, host: str, context: ssl.SSLContext | None
) -> tuple[HttpAnswer, bool, x509.Certificate | None]:
    """GET /healthz with a verifying context; when the certificate does not verify, once
    more without verifying, only to read its dates and the relay's Date header."""
    if context is None:
        with open_tcp(address, port) as sock:
            return http_request(sock, host, "/healthz"), True, None
    try:
        peer = open_tls(address, port, host, context)
        verified = True
    except ssl.SSLCertVerificationError as exc:
        peer = open_tls(address, port, host, insecure_context())
        verified = False
        failure = exc
    with peer.sock as sock:
        der = sock.getpeercert(binary_form=True)
        cert = x509.load_der_x509_certificate(der) if der else None
        answer = http_request(sock, host, "/healthz")
    if not verified and not _clock_only(cert, answer.date()):
        raise failure
    return answer, verified, cert


def _clock_only(cert: x509.Certificate | None, relay_now: float | None) -> bool:
    """Whether a certificate that did not verify is valid by the relay's clock and not by
    this machine's: then the clock is to blame, not the certificate."""
    if cert is None or relay_now is None:
        return False
    return _valid_at(cert, relay_now) and not _valid_at(cert, time.time())


def _valid_at(cert: x509.Certificate, when: float) -> bool:
    return cert.not_valid_before_utc.timestamp() <= when <= cert.not_valid_after_utc.timestamp()


# -- clock ------------------------------------------------------------------------------


def _clock(relay: RelayProbe, report: Report) -> float | None:
    """This machine's clock minus the relay's, in seconds (None when unknown)."""
    if relay.reached is None:
        report.skip("clock", "the relay was not reached, so its clock was not read")
        return None
    if relay.date is None or relay.local_at_date is None:
        report.skip("clock", "the relay sent no Date header (an older relay)")
        return None
    # Date has one-second resolution: up to a second of difference is the header's own.
    skew = relay.local_at_date - relay.date
    size = abs(skew) - 1 if abs(skew) > 1 else 0.0
    way = "ahead of" if skew > 0 else "behind"
    text = _span(size)
    fix = (
        "set the clock right, e.g. `timedatectl set-ntp true` (if this machine's clock is "
        "right, the relay's is wrong: fix that one)"
    )
    if size > CLOCK_FAIL:
        report.fail("clock", f"this machine's clock is {text} {way} the relay's", fix)
    elif size > CLOCK_WARN:
        report.warn("clock", f"this machine's clock is {text} {way} the relay's", fix)
    else:
        report.ok("clock", f"within {max(1, round(abs(skew)))} s of the relay's")
    return skew


def _span(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.0f} hours"
    if seconds >= 120:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds:.0f} s"


# -- token ------------------------------------------------------------------------------


def _token(config: HomeConfig, skew: float | None, report: Report) -> None:
    try:
        claims = decode_claims_unverified(config.relay.token)
    except TokenError as exc:  # check_home already refused this; kept for safety
        report.fail("token", f"not a tunneld token ({exc})", "get a new one from the relay")
        return
    local = time.time()
    now = local - skew if skew is not None else local
    names = " --hostname ".join(config.tls.hostnames)
    allowed = {hostname_key(name) for name in claims.hostnames}
    missing = [h for h in config.tls.hostnames if h not in allowed]
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(claims.expires_at))
    if claims.expires_at <= now:
        report.fail(
            "token",
            f"token {claims.token_id} expired at {when}",
            "get a new token: " + REISSUE.format(names=names),
        )
    elif missing:
        report.fail(
            "token",
            f"token {claims.token_id} does not name {', '.join(missing)} (it names "
            f"{', '.join(claims.hostnames)}); the relay will refuse the session",
            "get a token naming every [tls] hostname: " + REISSUE.format(names=names),
        )
    elif claims.expires_at <= local:
        report.warn(
            "token",
            f"token {claims.token_id} looks expired ({when}) only by this machine's clock",
            "correct this machine's clock (see the clock check)",
        )
    elif claims.expires_at - now < TOKEN_SOON:
        days = (claims.expires_at - now) / 86400
        report.warn(
            "token",
            f"token {claims.token_id} for {', '.join(claims.hostnames)} expires in "
            f"{days:.1f} days ({when})",
            "get a new token before then: " + REISSUE.format(names=names),
        )
    else:
        days = (claims.expires_at - now) / 86400
        report.ok(
            "token",
            f"token {claims.token_id} names {', '.join(config.tls.hostnames)}, "
            f"{days:.0f} days left",
        )


# -- session: the real handshake, no session opened ----------------------------------------

_REFUSAL_FIX = {
    "hostname_not_allowed": "get a token naming every [tls] hostname: " + REISSUE,
    "expired": "get a new token: " + REISSUE,
    "revoked": "this token was revoked on the relay; get a new one: " + REISSUE,
    "bad_signature": "the relay does not trust the key that signed this token: get one "
    "issued by this relay: " + REISSUE,
    "bad_token": "the token is damaged: get a new one: " + REISSUE,
    "version_blocked": "upgrade tunneld (`/opt/tunneld/bin/pip install -U .` in a new "
    "checkout) and restart it",
}


def _session(config: HomeConfig, relay: RelayProbe, report: Report) -> None:
    if relay.reached is None:
        report.skip("session", "the relay was not reached")
        return
    if not relay.verified and config.relay.url.startswith("wss:"):
        # The token is a secret: it is never sent over a connection that did not verify.
        report.skip("session", "the relay's certificate did not verify, so no token was sent")
        return
    names = ", ".join(config.tls.hostnames)
    headers = [
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Key", "dHVubmVsZCBkb2N0b3IgIQ=="),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Protocol", RAW_SUBPROTOCOL),
        ("Authorization", "Bearer " + config.relay.token),
        ("Tunneld-Version", __version__),
        ("Tunneld-Hostnames", names),
        # Answered 200 without opening a session (an older relay upgrades: 101, also fine).
        ("Tunneld-Check", "1"),
    ]
    try:
        if config.relay.url.startswith("wss:"):
            sock: socket.socket = open_tls(
                relay.reached, relay.port, relay.host, _relay_context(config)
            ).sock
        else:
            sock = open_tcp(relay.reached, relay.port)
        with sock:
            path = urlsplit(config.relay.url).path or "/v1/tunnel"
            answer = http_request(sock, relay.host, path, headers, connection="Upgrade")
    except (OSError, ValueError) as exc:
        report.fail(
            "session",
            f"the tunnel handshake failed: {describe(exc)}",
            FIREWALL.format(port=relay.port),
        )
        return
    if answer.status in (101, 200):
        report.ok(
            "session",
            f"the relay accepts this token for {names} (checked without opening a session)",
        )
        return
    reason, detail = "refused", ""
    try:
        parsed = json.loads(answer.body or b"{}")
        reason = str(parsed.get("reason", reason))
        detail = str(parsed.get("detail", ""))
    except (ValueError, AttributeError):
        detail = answer.body[:200].decode("utf-8", "replace")
    fix = _REFUSAL_FIX.get(reason, "see the relay's log for this refusal").format(
        names=" --hostname ".join(config.tls.hostnames)
    )
    report.fail("session", f"the relay refuses the session: {reason} ({detail})", fix)


# -- DNS ----------------------------------------------------------------------------------


def _dns(config: HomeConfig, relay: RelayProbe, resolver: Resolver, report: Report) -> None:
    if not relay.addresses:
        report.skip("dns", "the relay's own name does not resolve")
        return
    wanted = set(relay.addresses)
    shown = ", ".join(relay.addresses)
    for name in config.tls.hostnames:
        point = (
            f"point {name} at the relay: an A/AAAA record to {shown} or a CNAME to "
            f"{relay.host} (README: DNS)"
        )
        try:
            addresses = resolver.resolve(name)
        except OSError as exc:
            report.fail("dns", f"{name} {describe(exc)}", point)
            continue
        got = ", ".join(addresses)
        if wanted & set(addresses):
            report.ok("dns", f"{name} resolves to {got}, the relay")
        elif all(is_lan_address(a) for a in addresses):
            report.warn(
                "dns",
                f"{name} resolves here to {got}, a home-network address, not the relay "
                f"({shown}): fine for split DNS at home, but public DNS must point at the relay",
                f"check the public record (`dig @1.1.1.1 {name}`); {point}",
            )
        else:
            report.fail(
                "dns",
                f"{name} resolves to {got}, not to the relay ({shown}): clients reach that "
                "address (your router?) instead of the tunnel",
                point + ", not at your home's address",
            )


# -- a request through the relay to this daemon ---------------------------------------------


def _tunnel(
    config: HomeConfig,
    relay: RelayProbe,
    status: dict[str, Any] | None | str,
    report: Report,
) -> None:
    if status is None:
        report.warn(
            "tunnel",
            "the daemon is not running, so no request went through the relay",
            "start it: `systemctl enable --now tunneld` (or `tunneld run -c FILE`)",
        )
        return
    if isinstance(status, str):
        report.skip("tunnel", f"cannot read the daemon's status: {status}")
        return
    if relay.reached is None:
        report.skip("tunnel", "the relay was not reached")
        return
    if status.get("state") != "connected":
        report.fail(
            "tunnel",
            f"the daemon is {status.get('state')}, not connected to the relay"
            + (f" (last error: {status['last_error']})" if status.get("last_error") else ""),
            "see the session check above and `tunneld status`",
        )
        return
    mine = str((status.get("certificate") or {}).get("sha256", ""))
    for name in config.tls.hostnames:
        try:
            peer = open_tls(relay.reached, relay.port, name, insecure_context())
            with peer.sock as sock:
                answer = http_request(sock, name, "/")
        except ssl.SSLError as exc:
            if "UNRECOGNIZED_NAME" in str(exc).upper():
                report.fail(
                    "tunnel",
                    f"the relay has no session for {name}",
                    "check that the daemon's session claims it (`tunneld status`) and that no "
                    "other daemon replaced it",
                )
            else:
                report.fail(
                    "tunnel",
                    f"https://{name}/ through the relay: {describe(exc)}",
                    "see the daemon's log",
                )
            continue
        except (OSError, ValueError) as exc:
            report.fail(
                "tunnel",
                f"https://{name}/ through the relay: {describe(exc)}",
                FIREWALL.format(port=relay.port),
            )
            continue
        if mine and peer.sha256 != mine:
            report.fail(
                "tunnel",
                f"https://{name}/ through the relay presents certificate {colon(peer.sha256)}, "
                f"not this daemon's {colon(mine)}",
                "another daemon (or something in the middle) answers for this name: check "
                "the relay's sessions (`tunneld status -c relay.toml`) and who else has this token",
            )
            continue
        report.ok(
            "tunnel",
            f"https://{name}/ through the relay reached this daemon (certificate "
            f"{colon(peer.sha256)[:23]}..., answer {answer.status})",
        )


# -- the upstream app -----------------------------------------------------------------------


def _upstream_get(config: HomeConfig, headers: list[tuple[str, str]]) -> HttpAnswer:
    up = config.upstream
    if up.scheme == "https":
        ctx = client_context(f"{config.path}: [upstream] ca_file", up.ca_file)
        if not up.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["http/1.1"])
        sock: socket.socket = open_tls(up.host, up.port, up.host, ctx).sock
    else:
        sock = open_tcp(up.host, up.port)
    with sock:
        return http_request(sock, f"{up.host}:{up.port}", "/", headers)


def _upstream(config: HomeConfig, report: Report) -> bool:
    url = config.upstream.url
    try:
        answer = _upstream_get(config, [])
    except (OSError, ValueError, ConfigError) as exc:
        report.fail(
            "upstream",
            f"{url}: {describe(exc)}",
            "start the app (Home Assistant) or correct [upstream] url",
        )
        return False
    report.ok("upstream", f"{url} answers {answer.status}")
    return True


def _forwarded(config: HomeConfig, report: Report) -> None:
    name = config.tls.hostnames[0]
    headers = [
        ("X-Forwarded-For", SAMPLE_CLIENT),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", name),
        ("Forwarded", f'for={SAMPLE_CLIENT};proto=https;host="{name}"'),
    ]
    try:
        answer = _upstream_get(config, headers)
    except (OSError, ValueError, ConfigError) as exc:
        report.fail(
            "forwarded", f"{config.upstream.url}: {describe(exc)}", "see the upstream check"
        )
        return
    if answer.status == 400:
        report.fail(
            "forwarded",
            f"{config.upstream.url} answers 400 to a request with X-Forwarded-For from this "
            "host, as Home Assistant does until it trusts the daemon as a proxy",
            HA_SNIPPET,
        )
        return
    report.ok(
        "forwarded",
        f"{config.upstream.url} accepts X-Forwarded-For from this host ({answer.status})",
    )


# -- the certificate ----------------------------------------------------------------------


def _certificate(config: HomeConfig, status: dict[str, Any] | None | str, report: Report) -> None:
    from tunneld.home.certs.store import CertificateStore, certificate_facts, is_self_signed
    from tunneld.pki import certificate_info

    store = CertificateStore(config)
    cert: dict[str, Any] | None = None
    if isinstance(status, dict) and status.get("certificate"):
        cert = status["certificate"]
    else:
        try:
            pem = store.cert_path.read_bytes()
            leaf = x509.load_pem_x509_certificates(pem)[0]
            cert = dict(certificate_facts(certificate_info(pem), is_self_signed(leaf), time.time()))
        except FileNotFoundError:
            report.skip("certificate", f"none at {store.cert_path} yet (the daemon makes it)")
            return
        except (OSError, ValueError) as exc:
            report.skip("certificate", f"cannot read {store.cert_path}: {describe(exc)}")
            return
    assert cert is not None
    days = float(cert.get("days_left") or 0)
    renewal = cert.get("renewal") or {}
    failing = renewal.get("last_error") if renewal.get("failures") else None
    sans = ", ".join(cert.get("sans") or [])
    if days <= 0:
        report.fail(
            "certificate",
            f"the certificate for {sans} expired at {cert.get('not_after')}"
            + (f"; renewal fails: {failing}" if failing else ""),
            "see `tunneld status` (renewal) and the daemon's log; with files, install a new one",
        )
    elif cert.get("self_signed"):
        if store.acme_waiting_for_consent:
            report.warn(
                "certificate",
                "clients see a self-signed certificate: ACME is off",
                store.consent_warning(),
            )
        elif store.acme_enabled:
            report.warn(
                "certificate",
                "clients see the self-signed bootstrap certificate until ACME succeeds"
                + (f"; the last order failed: {failing}" if failing else ""),
                "let the daemon run connected: the ACME server validates through the relay; "
                "`tunneld status` shows the renewal state",
            )
        else:
            report.warn(
                "certificate",
                "clients see a self-signed certificate",
                "set [acme] enabled = true and agree_tos = true, or install a CA-issued one",
            )
    elif failing and days * 86400 < config.acme.renew_before:
        report.fail(
            "certificate",
            f"{days:.0f} days left and renewal fails: {failing}",
            "see the daemon's log for the ACME error; the relay's port 443 must reach this daemon",
        )
    elif not store.acme_enabled and days * 86400 < config.acme.renew_before:
        report.warn(
            "certificate",
            f"{days:.0f} days left, and [acme] does not manage it",
            "install a renewed certificate, or let [acme] manage it",
        )
    else:
        report.ok(
            "certificate",
            f"{sans}: {days:.0f} days left, issuer {cert.get('issuer')}, "
            f"SHA-256 {colon(str(cert.get('sha256')))[:23]}...",
        )
