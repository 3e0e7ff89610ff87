"""Certificate-transparency watch: certificates for our hostnames that we did not obtain.

A relay never holds the home's key, so its one way in is a publicly trusted
certificate for the home's hostname, obtained elsewhere. Every such certificate
is logged in Certificate Transparency. With `[ct] enabled`, the daemon lists the
certificates logged for each hostname (and for the wildcard one level up) every
`interval` from a crt.sh-style search API at `[ct] url`, and compares them with
the certificates it obtained (fingerprint and serial of every certificate it has
served, kept in the state directory, `ct.json`). An unknown one is a WARNING in
the log (once), in status (`ct.unknown`: hostname, issuer, serial, not-before,
SHA-256) and in metrics, until `tunneld cert acknowledge SHA256` accepts it.

The API (crt.sh's, documented in docs/ct-watch.md):

    GET {url}?q={name}&output=json&exclude=expired
        -> [{"id": 123, "issuer_name": "...", "name_value": "a\\nb",
             "serial_number": "03ab...", "not_before": "2026-12-01T00:00:00",
             "not_after": "...", ...}, ...]
    GET {url}?d={id}
        -> the certificate (PEM or DER), for its SHA-256 fingerprint

A precertificate and its certificate share the serial: ours are matched by
serial, so neither is reported. A foreign one is fetched once per id.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tunneld import __version__
from tunneld.config import CtSection, HomeConfig
from tunneld.files import atomic_write

__all__ = ["CT_FILE", "CtWatch", "normalize_sha256", "read_state", "write_state"]

log = logging.getLogger("tunneld.ct")

_DER = Encoding.DER
CT_FILE = "ct.json"
TIMEOUT = 30.0
MAX_ANSWER = 32 * 1024 * 1024


def normalize_sha256(text: str) -> str:
    """A SHA-256 fingerprint as lower-case hex (colons and case as browsers show them)."""
    value = text.strip().replace(":", "").lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"not a SHA-256 fingerprint (64 hex digits): {text!r}")
    return value


@dataclass(frozen=True)
class Foreign:
    """A logged certificate for one of our names that this daemon did not obtain."""

    hostname: str
    issuer: str
    serial: str  # lower-case hex, no leading zeros
    not_before: str
    not_after: str
    sha256: str
    id: int  # the API's id for it


def read_state(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    data.setdefault("known", [])
    data.setdefault("acknowledged", [])
    return data


def write_state(path: Path, data: dict[str, Any]) -> None:
    """Atomically: temp file, fsync, rename (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=1, sort_keys=True)
    atomic_write(path, text.encode(), mode=0o600, temp_prefix=".ct.")


def _serial(value: object) -> str:
    return format(int(str(value).replace(":", ""), 16), "x")


class CtWatch:
    def __init__(self, config: HomeConfig, cert_path: Callable[[], Path]) -> None:
        self.cert_path = cert_path
        self.path = config.daemon.state_directory / CT_FILE
        self.unknown: dict[str, Foreign] = {}  # sha256 -> certificate
        self.last_check: float | None = None
        self.last_error: str | None = None
        self.checks = 0
        self._fingerprints: dict[int, str] = {}  # API id -> sha256, fetched once
        self._wake = trio.Event()
        self.configure(config)

    def configure(self, config: HomeConfig) -> None:
        self.cfg: CtSection = config.ct
        self.hostnames = config.tls.hostnames
        self._wake.set()  # a reload checks at once

    # -- what we obtained and what was accepted ----------------------------------------
    def record_own(self) -> None:
        """Add the certificate being served to `known` (every one this daemon obtains
        passes here: at start, after each renewal, before each check)."""
        try:
            pem = self.cert_path().read_bytes()
            cert = x509.load_pem_x509_certificates(pem)[0]
        except (OSError, ValueError):
            return  # none yet
        fingerprint = sha256(cert.public_bytes(_DER)).hexdigest()
        data = read_state(self.path)
        if any(k.get("sha256") == fingerprint for k in data["known"]):
            return
        data["known"].append(
            {"sha256": fingerprint, "serial": format(cert.serial_number, "x"), "at": time.time()}
        )
        write_state(self.path, data)

    def acknowledge(self, fingerprint: str) -> Foreign | None:
        """Accept an unknown certificate: it is not reported again (None: not one)."""
        fingerprint = normalize_sha256(fingerprint)
        cert = self.unknown.pop(fingerprint, None)
        if cert is None:
            return None
        data = read_state(self.path)
        data["acknowledged"].append({**asdict(cert), "at": time.time()})
        write_state(self.path, data)
        log.info(
            "acknowledged certificate %s (serial %s) for %s",
            cert.sha256,
            cert.serial,
            cert.hostname,
        )
        return cert

    # -- the watch -------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._wake = trio.Event()
            await trio.to_thread.run_sync(self.record_own)
            if self.cfg.enabled:
                await self.check()
            with trio.move_on_after(self.cfg.interval):
                await self._wake.wait()

    async def check(self) -> None:
        try:
            found = await trio.to_thread.run_sync(self._check_sync)
        except (OSError, ValueError) as exc:  # URLError, HTTPError, bad JSON
            why = f"{self.cfg.url}: {getattr(exc, 'reason', None) or exc}"
            if why != self.last_error:
                log.warning("certificate-transparency check failed: %s", why)
            self.last_error = why
            return
        self.last_error = None
        self.last_check = time.time()
        self.checks += 1
        for fingerprint, cert in found.items():
            if fingerprint not in self.unknown:
                log.warning(
                    "certificate for %s that this daemon did not obtain, in CT logs: issuer %s, "
                    "serial %s, not before %s, sha256 %s (tunneld cert acknowledge %s accepts it)",
                    cert.hostname,
                    cert.issuer,
                    cert.serial,
                    cert.not_before,
                    cert.sha256,
                    cert.sha256,
                )
        self.unknown = found

    def _check_sync(self) -> dict[str, Foreign]:
        data = read_state(self.path)
        ours = {_serial(k["serial"]) for k in data["known"]}
        accepted = {a["sha256"] for a in data["acknowledged"]}
        accepted_serials = {_serial(a["serial"]) for a in data["acknowledged"] if a.get("serial")}
        found: dict[str, Foreign] = {}
        for hostname in self.hostnames:
            names = [hostname]
            if hostname.count(".") >= 2:
                names.append("*." + hostname.split(".", 1)[1])  # a wildcard covers it too
            for name in names:
                for entry in self._search(name):
                    serial = _serial(entry["serial_number"])
                    if serial in ours or serial in accepted_serials:
                        continue
                    fingerprint = self._fingerprint(int(entry["id"]))
                    if fingerprint in accepted or fingerprint in found:
                        continue
                    found[fingerprint] = Foreign(
                        hostname=hostname,
                        issuer=str(entry.get("issuer_name", "")),
                        serial=serial,
                        not_before=str(entry.get("not_before", "")),
                        not_after=str(entry.get("not_after", "")),
                        sha256=fingerprint,
                        id=int(entry["id"]),
                    )
        return found

    def _get(self, query: dict[str, str]) -> bytes:
        url = self.cfg.url + "?" + urllib.parse.urlencode(query)
        req = urllib.request.Request(url, headers={"User-Agent": f"tunneld/{__version__}"})
        with urllib.request.urlopen(req, timeout=TIMEOUT) as answer:  # noqa: S310 - http(s) only
            body: bytes = answer.read(MAX_ANSWER + 1)
        if len(body) > MAX_ANSWER:
            raise ValueError(f"answer larger than {MAX_ANSWER} bytes")
        return body

    def _search(self, name: str) -> list[dict[str, Any]]:
        answer = json.loads(self._get({"q": name, "output": "json", "exclude": "expired"}))
        if not isinstance(answer, list):
            raise ValueError(f"expected a JSON list for {name}")
        entries = []
        for entry in answer:
            if isinstance(entry, dict) and "id" in entry and "serial_number" in entry:
                entries.append(entry)
        return entries

    def _fingerprint(self, cert_id: int) -> str:
        if cert_id not in self._fingerprints:
            body = self._get({"d": str(cert_id)})
            try:
                if b"-----BEGIN" in body:
                    cert = x509.load_pem_x509_certificate(body)
                else:
                    cert = x509.load_der_x509_certificate(body)
            except ValueError:
                raise ValueError(f"certificate {cert_id}: not a certificate") from None
            self._fingerprints[cert_id] = sha256(cert.public_bytes(_DER)).hexdigest()
        return self._fingerprints[cert_id]

    # -- status ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.cfg.enabled,
            "url": self.cfg.url,
            "interval": self.cfg.interval,
            "last_check": _iso(self.last_check),
            "last_error": self.last_error,
            "checks": self.checks,
            "unknown": [asdict(c) for c in self.unknown.values()],
        }

    def warnings(self) -> list[str]:
        out = [
            f"certificate for {c.hostname} that this daemon did not obtain: issuer {c.issuer},"
            f" serial {c.serial}, sha256 {c.sha256} (tunneld cert acknowledge {c.sha256})"
            for c in self.unknown.values()
        ]
        if self.cfg.enabled and self.last_error:
            out.append(f"certificate-transparency check failed: {self.last_error}")
        return out


def _iso(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
