"""atheris harness: the ClientHello parser (tunneld/wire/clienthello.py).

Contract checked: `parse_client_hello` never raises; it returns a ClientHello or
a Status; a ClientHello's SNI is normalized (lower case, no trailing dot, LDH
and `_` only) and its length lies within the input and `max_size`; answers are
prefix-monotonic (NEED_MORE, then one answer that longer prefixes repeat).
"""

from __future__ import annotations

import re
import ssl
import sys
from pathlib import Path

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports():
    from tunneld.wire.clienthello import MAX_CLIENT_HELLO, ClientHello, Status, parse_client_hello

_SNI = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


def _check(data: bytes, max_size: int) -> ClientHello | Status:
    result = parse_client_hello(data, max_size=max_size)
    if isinstance(result, ClientHello):
        assert 0 < result.length <= min(len(data), max_size), result
        assert result.sni is None or _SNI.fullmatch(result.sni), result.sni
        assert all(result.alpn), result.alpn
    else:
        assert isinstance(result, Status), result
    return result


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    max_size = fdp.ConsumeIntInRange(6, MAX_CLIENT_HELLO + 64)
    cut = fdp.ConsumeIntInRange(0, 2**16)
    raw = fdp.ConsumeBytes(fdp.remaining_bytes())
    final = _check(raw, max_size)
    prefix = _check(raw[: cut % (len(raw) + 1)], max_size)
    assert prefix is Status.NEED_MORE or prefix == final, (prefix, final)


def write_seeds(directory: Path) -> None:
    """Real ClientHellos from OpenSSL as starting points."""
    directory.mkdir(parents=True, exist_ok=True)
    cases = [("home.example.com", ["h2", "http/1.1"]), (None, ["acme-tls/1"]), ("a.b", [])]
    for n, (sni, alpn) in enumerate(cases):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if alpn:
            ctx.set_alpn_protocols(alpn)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        conn = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
        try:
            conn.do_handshake()
        except ssl.SSLWantReadError:
            pass
        # Three bytes for max_size and cut (FuzzedDataProvider reads them first).
        (directory / f"seed-{n}").write_bytes(b"\xff\xff\x00\x40" + outgoing.read())


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write-seeds":
        write_seeds(Path(sys.argv[2]))
        sys.exit(0)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
