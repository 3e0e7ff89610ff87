"""ACME (RFC 8555) certificates with TLS-ALPN-01 (RFC 8737) or HTTP-01: the one client
the home daemon and the relay share (relay/ and home/ never import each other; both
import this).

At home the CA connects to `hostname:443` at the relay, which routes by SNI as for any
client; the stream handler sees ALPN `acme-tls/1` in the ClientHello and the
certificate store answers with the challenge certificate published here. Nothing but
the relay's port is needed at home. The relay answers for its own name the same way
on its own port, or HTTP-01 on `http_listen`.

The protocol work (JWS signing, nonces, the account and order state machine) is
certbot's `acme` package: well kept, typed, and the client Let's Encrypt itself
maintains. It is blocking (requests), so each order runs in a worker thread
(`trio.to_thread.run_sync`); the manager task around it owns timing: renew
`renew_before` (minus a random jitter) ahead of expiry, retry failures with
exponential backoff, and never die of one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import random
import ssl
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import requests
import trio
from acme import challenges, client, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from josepy.jwa import ES256, RS256, JWASignature
from josepy.jwk import JWK, JWKEC, JWKRSA

from tunneld import __version__
from tunneld.config import AcmeSection, format_duration
from tunneld.errors import KeyFileError, TunneldError
from tunneld.hostnames import hostname_key
from tunneld.pki import (
    CertificateInfo,
    PrivateKey,
    generate_private_key,
    read_private_key,
    write_certificate,
    write_private_key,
)

__all__ = [
    "ACME_IDENTIFIER_OID",
    "ACME_TLS_ALPN",
    "HTTP01_PREFIX",
    "AcmeManager",
    "AcmeSettings",
    "ManagedCertificate",
    "RenewalStatus",
    "TLSALPN01",
    "challenge_certificate",
    "challenge_context",
    "describe_error",
    "issue_certificate",
    "load_account_key",
    "make_csr",
]

log = logging.getLogger("tunneld.acme")

ACME_TLS_ALPN = "acme-tls/1"
TLS_ALPN_01, HTTP_01 = "tls-alpn-01", "http-01"
HTTP01_PREFIX = "/.well-known/acme-challenge/"

# id-pe-acmeIdentifier (RFC 8737 section 6.1)
ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
ACCOUNT_KEY_FILE = "acme_account.key"
HTTP_TIMEOUT = 30  # one request to the ACME server
ORDER_TIMEOUT = 120.0  # validation plus finalization of one order
READY_WAIT = 30.0  # how long an order waits for the relay session before it gives up
MAX_ERROR = 400

# Publishes the challenge contexts (hostname -> context) to the stream handler.
ChallengeSink = Callable[[Mapping[str, ssl.SSLContext]], None]
# Publishes the http-01 answers (token -> key authorization) to the HTTP listener.
HttpChallengeSink = Callable[[Mapping[str, str]], None]
# (hostnames, sink) -> (PEM full chain, its private key); blocking.
Issuer = Callable[[Sequence[str], ChallengeSink], tuple[bytes, PrivateKey]]


# --- the tls-alpn-01 challenge (dropped from the `acme` package; RFC 8737) ----------------


@challenges.ChallengeResponse.register
class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """The answer POSTed to the challenge URL: `{}` (the key authorization is not sent)."""

    typ = "tls-alpn-01"


@challenges.Challenge.register
class TLSALPN01(challenges.KeyAuthorizationChallenge):
    response_cls = TLSALPN01Response
    typ = response_cls.typ

    def validation(self, account_key: JWK, **kwargs: Any) -> bytes:
        """SHA-256 of the key authorization: the acmeIdentifier extension's content."""
        return hashlib.sha256(self.key_authorization(account_key).encode("ascii")).digest()


def challenge_certificate(hostname: str, key_authorization: str) -> tuple[PrivateKey, bytes]:
    """A throwaway key and the self-signed challenge certificate for `hostname`:
    SAN = the hostname only, acmeIdentifier (critical) = SHA-256(key authorization).
    """
    key = generate_private_key("ec256")
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tunneld acme-tls/1 challenge")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        # The extension value is the DER OCTET STRING holding the 32-byte digest.
        .add_extension(
            x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, b"\x04\x20" + digest), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert.public_bytes(serialization.Encoding.PEM)


def challenge_context(hostname: str, key_authorization: str, scratch: Path) -> ssl.SSLContext:
    """A server context that negotiates only `acme-tls/1` with the challenge certificate.

    `ssl` loads certificates only from files: they pass through a private (0700) scratch
    folder under `scratch` that is removed at once.
    """
    key, pem = challenge_certificate(hostname, key_authorization)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".acme-challenge.") as tmp:
        write_private_key(key, Path(tmp) / "key.pem")
        write_certificate(pem, Path(tmp) / "cert.pem")
        ctx.load_cert_chain(str(Path(tmp) / "cert.pem"), str(Path(tmp) / "key.pem"))
    ctx.set_alpn_protocols([ACME_TLS_ALPN])
    return ctx


def make_csr(key: PrivateKey, hostnames: Sequence[str]) -> bytes:
    """PEM CSR with every hostname as SAN (CN = the first, when it fits in 64 characters)."""
    if not hostnames:
        raise ValueError("a certificate needs at least one hostname")
    cn = hostnames[0]
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if len(cn) <= 64 else []
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(attrs))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(h) for h in hostnames]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def load_account_key(path: Path) -> PrivateKey:
    """The ACME account key, created (EC P-256, file 0600) on first use and kept."""
    try:
        return read_private_key(path)
    except KeyFileError:
        if path.exists():
            raise
    key = generate_private_key("ec256")
    write_private_key(key, path)
    log.info("created the ACME account key %s", path)
    return key


# --- one order (blocking; runs in a worker thread) ----------------------------------------


@dataclass(frozen=True)
class AcmeSettings:
    directory: str
    email: str
    ca_file: Path | None
    key_type: str
    state_directory: Path  # the account key lives here; challenge scratch files pass here
    order_timeout: float = ORDER_TIMEOUT
    challenge: str = TLS_ALPN_01

    @classmethod
    def from_section(
        cls, acme: AcmeSection, state_directory: Path, challenge: str = TLS_ALPN_01
    ) -> AcmeSettings:
        return cls(
            acme.directory,
            acme.email,
            acme.ca_file,
            acme.key_type,
            state_directory,
            challenge=challenge,
        )


def _jwk(key: PrivateKey) -> tuple[JWK, JWASignature]:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return JWKEC(key=key), ES256
    return JWKRSA(key=key), RS256


def issue_certificate(
    settings: AcmeSettings,
    hostnames: Sequence[str],
    publish: ChallengeSink,
    publish_http: HttpChallengeSink | None = None,
) -> tuple[bytes, PrivateKey]:
    """Register (or find) the account, order a certificate for `hostnames`, answer every
    challenge (`settings.challenge`: tls-alpn-01 through `publish`, http-01 through
    `publish_http`), finalize. Returns (PEM full chain, key).
    Blocking; raises on any failure (see `describe_error`).
    """
    account_key = load_account_key(settings.state_directory / ACCOUNT_KEY_FILE)
    jwk, alg = _jwk(account_key)
    verify: str | bool = str(settings.ca_file) if settings.ca_file is not None else True
    net = client.ClientNetwork(
        jwk,
        alg=alg,
        verify_ssl=verify,  # type: ignore[arg-type]  # requests takes a CA path too
        user_agent=f"tunneld/{__version__} acme-python",
        timeout=HTTP_TIMEOUT,
    )
    try:
        acme = client.ClientV2(client.ClientV2.get_directory(settings.directory, net), net)
        registration = messages.NewRegistration.from_data(
            email=settings.email or None, terms_of_service_agreed=True
        )
        try:
            acme.new_account(registration)
        except errors.ConflictError as exists:  # the key already has an account: reuse it
            net.account = messages.RegistrationResource(
                uri=exists.location, body=messages.Registration()
            )
        key = generate_private_key(settings.key_type)
        order = acme.new_order(make_csr(key, hostnames))
        deadline = dt.datetime.now() + dt.timedelta(seconds=settings.order_timeout)
        answers: list[tuple[messages.ChallengeBody, challenges.ChallengeResponse]] = []
        contexts: dict[str, ssl.SSLContext] = {}
        tokens: dict[str, str] = {}
        wanted = challenges.HTTP01 if settings.challenge == HTTP_01 else TLSALPN01
        for authz in order.authorizations:
            if authz.body.status == messages.STATUS_VALID:
                continue  # the CA remembers an earlier validation
            name = authz.body.identifier.value
            challb = next((c for c in authz.body.challenges if isinstance(c.chall, wanted)), None)
            if challb is None:
                offered = ", ".join(c.chall.typ for c in authz.body.challenges)
                raise TunneldError(
                    f"the ACME server offers no {settings.challenge} challenge for {name} "
                    f"({offered})"
                )
            chall = challb.chall
            if isinstance(chall, challenges.HTTP01):
                tokens[chall.encode("token")] = chall.key_authorization(jwk)
            else:
                assert isinstance(chall, TLSALPN01)
                contexts[name] = challenge_context(
                    name, chall.key_authorization(jwk), settings.state_directory
                )
            answers.append((challb, chall.response(jwk)))
        publish(contexts)
        if publish_http is not None:
            publish_http(tokens)
        elif tokens:
            raise TunneldError("http-01 challenges, but nothing serves them")
        for challb, response in answers:
            acme.answer_challenge(challb, response)
        order = acme.poll_and_finalize(order, deadline)
        if not order.fullchain_pem:
            raise TunneldError("the ACME server returned no certificate")
        return order.fullchain_pem.encode("ascii"), key
    finally:
        net.session.close()


def describe_error(exc: BaseException) -> str:
    """One line for logs and status: what went wrong, never a traceback or a secret."""
    if isinstance(exc, errors.ValidationError):
        parts = []
        for authz in exc.failed_authzrs:
            for chall in authz.body.challenges:
                if chall.error is not None:
                    parts.append(f"{authz.body.identifier.value}: {_problem(chall.error)}")
        text = "validation failed: " + "; ".join(parts)
    elif isinstance(exc, errors.IssuanceError):
        text = f"the order failed: {_problem(exc.error)}"
    elif isinstance(exc, messages.Error):
        text = f"the ACME server refused: {_problem(exc)}"
    elif isinstance(exc, errors.TimeoutError):
        text = "the ACME server did not finish the order in time"
    elif isinstance(exc, requests.RequestException):
        text = f"cannot reach the ACME server: {exc}"
    elif isinstance(exc, TunneldError | OSError):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 3] + "..."


def _problem(error: messages.Error) -> str:
    code = error.code or str(error.typ)
    detail = error.detail or error.description or ""
    return f"{code}: {detail}" if detail else code


# --- the manager (a task in the daemon's root nursery) ------------------------------------


class ManagedCertificate(Protocol):
    """What the manager needs of a certificate store (home/certs.py, relay/certs.py)."""

    acme_enabled: bool
    info: CertificateInfo | None
    self_signed: bool
    key_kind: str | None
    renewal: RenewalStatus

    def set_challenges(self, contexts: Mapping[str, ssl.SSLContext]) -> None: ...

    def clear_challenges(self) -> None: ...

    def prepare(self, fullchain_pem: bytes, key: PrivateKey) -> Any: ...

    def activate(self, loaded: Any) -> None: ...


@dataclass(frozen=True)
class RenewalStatus:
    """What the ACME manager last did; shown in status."""

    state: str = "idle"  # "idle", "ordering", "failing", "disabled"
    reason: str | None = None  # why an order is (or was last) needed
    last_error: str | None = None
    failures: int = 0  # consecutive failed attempts
    last_attempt: float | None = None
    last_success: float | None = None
    next_check: float | None = None


class AcmeManager:
    """Keeps the managed certificate issued and fresh; started with `nursery.start`."""

    def __init__(
        self,
        acme: AcmeSection,
        certs: ManagedCertificate,
        hostnames: Sequence[str],
        settings: AcmeSettings,
        *,
        ready: Callable[[], bool] | None = None,
        ready_wait: float = READY_WAIT,
        issuer: Issuer | None = None,
        publish_http: Callable[[Mapping[str, str]], None] | None = None,
    ) -> None:
        self.acme = acme
        self.certs = certs
        self.hostnames = tuple(hostnames)
        self.ready = ready
        self.ready_wait = ready_wait
        http = _http_publisher(publish_http) if publish_http is not None else None
        self._issue: Issuer = issuer or (
            lambda names, sink: issue_certificate(settings, names, sink, http)
        )
        self._jitter: tuple[str, float] = ("", 0.0)  # (certificate sha256, its draw)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if not self.certs.acme_enabled:
            return
        while True:
            delay = await self.step()
            self._set(next_check=time.time() + delay)
            await trio.sleep(delay)

    async def step(self) -> float:
        """One look at the certificate, ordering a new one if needed; returns the seconds
        until the next look.
        """
        reason = self.order_reason(time.time())
        if reason is None:
            self._set(state="idle", reason=None, failures=0, last_error=None)
            return self._until_due(time.time())
        return await self._order(reason)

    def order_reason(self, now: float) -> str | None:
        """Why a certificate must be ordered now, or None."""
        certs, info = self.certs, self.certs.info
        assert info is not None, "load() first"
        if certs.self_signed:
            return "the certificate is the self-signed bootstrap one"
        have = {hostname_key(s) for s in info.sans}
        if have != set(self.hostnames):
            return (
                f"the hostnames changed (certificate: {', '.join(sorted(have))}; "
                f"[tls] hostnames: {', '.join(self.hostnames)})"
            )
        if certs.key_kind != self.acme.key_type:
            return f"[acme] key_type is {self.acme.key_type}, the certificate's key is not"
        left = info.not_after.timestamp() - now
        if left <= self.acme.renew_before + self._jitter_for(info.sha256):
            return f"it expires in {left / 86400:.1f} days"
        return None

    def _jitter_for(self, sha256: str) -> float:
        # One draw per certificate, so repeated looks agree on its renewal time.
        if self._jitter[0] != sha256:
            self._jitter = (sha256, random.uniform(0, self.acme.jitter))
        return self._jitter[1]

    def _until_due(self, now: float) -> float:
        info = self.certs.info
        assert info is not None
        due = info.not_after.timestamp() - self.acme.renew_before - self._jitter_for(info.sha256)
        return max(1.0, min(self.acme.check_interval, due - now))

    async def _order(self, reason: str) -> float:
        names = ", ".join(self.hostnames)
        log.info("ordering a certificate for %s: %s", names, reason)
        self._set(state="ordering", reason=reason, last_attempt=time.time())
        try:
            await self._wait_ready()
            fullchain, key = await trio.to_thread.run_sync(
                self._issue, self.hostnames, _publisher(self.certs), abandon_on_cancel=True
            )
            loaded = await trio.to_thread.run_sync(self.certs.prepare, fullchain, key)
        except Exception as exc:  # any failure: the manager must live on to retry
            # Its one line goes to the log and status (`_failed`); the traceback is for
            # debugging, most failures being the CA's or the network's answers.
            log.debug("certificate order failed", exc_info=True)
            return self._failed(describe_error(exc))
        finally:
            self.certs.clear_challenges()
        self.certs.activate(loaded)
        self._set(state="idle", failures=0, last_error=None, last_success=time.time())
        if self.order_reason(time.time()) is not None:
            log.warning(
                "[acme] renew_before (%s) is longer than the new certificate's lifetime; "
                "renewing every check_interval (%s)",
                format_duration(self.acme.renew_before),
                format_duration(self.acme.check_interval),
            )
        # A fresh certificate is not due for weeks; this also paces renewals when
        # renew_before exceeds the CA's lifetime instead of ordering in a loop.
        return self.acme.check_interval

    async def _wait_ready(self) -> None:
        ready = self.ready
        if ready is None or ready():
            return
        for _ in range(max(1, round(self.ready_wait / 0.25))):  # a state to poll, no event
            await trio.sleep(0.25)
            if ready():
                return
        raise TunneldError("not connected to the relay, so the ACME server cannot reach us")

    def _failed(self, error: str) -> float:
        failures = self.certs.renewal.failures + 1
        delay = min(self.acme.retry_max, self.acme.retry_initial * 2.0 ** min(failures - 1, 40))
        delay = random.uniform(delay / 2, delay)
        self._set(state="failing", failures=failures, last_error=error)
        info = self.certs.info
        assert info is not None
        left = info.not_after.timestamp() - time.time()
        retry = f"retrying in {format_duration(round(delay) if delay >= 10 else round(delay, 2))}"
        if not self.certs.self_signed and left < self.acme.renew_before:
            log.error(
                "certificate renewal failed (%d in a row): %s; the certificate expires in "
                "%.1f days; %s",
                failures,
                error,
                left / 86400,
                retry,
            )
        else:
            log.warning("certificate order failed (%d in a row): %s; %s", failures, error, retry)
        return delay

    def _set(self, **changes: Any) -> None:
        self.certs.renewal = replace(self.certs.renewal, **changes)


def _http_publisher(sink: Callable[[Mapping[str, str]], None]) -> HttpChallengeSink:
    """The http-01 sink the worker thread calls: hands the answers to the Trio thread."""

    def publish(tokens: Mapping[str, str]) -> None:
        trio.from_thread.run_sync(sink, tokens)

    return publish


def _publisher(certs: ManagedCertificate) -> ChallengeSink:
    """A sink the worker thread calls: hands the contexts to the Trio thread."""

    def publish(contexts: Mapping[str, ssl.SSLContext]) -> None:
        trio.from_thread.run_sync(certs.set_challenges, contexts)

    return publish
