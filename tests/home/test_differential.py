"""Differential framing: tunneld's RequestReader against aiohttp (C and pure Python,
the version Home Assistant ships) and h11, on generated smuggling-family streams.

The harness is tests/home/httpdiff.py; the long mode is fuzz/differential.py; every
documented difference is a row of docs/http-differential.md. The run's size and the
parsers' versions are printed in the session summary (tests/home/conftest.py).
TUNNELD_DIFF_PLANT=1 plants a Content-Length off by one in tunneld's reader, and
the suite must fail.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.home import httpdiff
from tunneld.errors import RemoteHttpError
from tunneld.home.proxy import http1

SEED = 19
CASES = 3000  # generated streams on top of the seeds: about 1.5 s here
DOC = Path(__file__).resolve().parents[2] / "docs" / "http-differential.md"
RESULTS: dict[str, httpdiff.Report] = {}  # read by conftest.py's summary


def _plant_off_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    real = http1._content_length
    monkeypatch.setattr(http1, "_content_length", lambda value: real(value) + 1)


@pytest.fixture(scope="module")
def report() -> httpdiff.Report:
    with pytest.MonkeyPatch.context() as mp:
        if os.environ.get("TUNNELD_DIFF_PLANT"):
            _plant_off_by_one(mp)
        result = httpdiff.run(SEED, CASES)
    RESULTS["ci"] = result
    return result


def _show(items: list[object]) -> str:
    return "\n".join(repr(item)[:400] for item in items[:10])


def test_all_three_parsers_ran() -> None:
    assert set(httpdiff.upstream_parsers()) == {"aiohttp-c", "aiohttp-py", "h11"}


def test_aiohttp_is_the_version_home_assistant_ships() -> None:
    import aiohttp

    # Home Assistant core pins aiohttp==3.14.1 (home-assistant/core PR #173242,
    # "Bump aiohttp to 3.14.1", 2026-06-07; package_constraints.txt and pyproject.toml).
    assert aiohttp.__version__ == "3.14.1"


def test_upstream_parsers_frame_what_tunneld_forwards_as_tunneld_does(
    report: httpdiff.Report,
) -> None:
    assert report.cases > CASES
    assert report.accepted > report.cases // 4  # enough streams get through to mean something
    assert not report.findings, _show(report.findings)


def test_every_difference_from_h11_is_documented(report: httpdiff.Report) -> None:
    assert not report.unexplained, _show(report.unexplained)


def test_the_tables_list_exactly_the_rules() -> None:
    text = DOC.read_text()
    rows = set(re.findall(r"^\| `([a-z0-9-]+)` \|", text, re.M))
    rules = {r.id for r in httpdiff.RAW_RULES} | {r.id for r in httpdiff.UPSTREAM_RULES}
    assert rows == rules


def test_a_planted_disagreement_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: a reader that takes one byte too many for a Content-Length
    body forwards a message aiohttp and h11 end one byte earlier."""
    _plant_off_by_one(monkeypatch)
    planted = httpdiff.run(SEED, 200)
    assert {name for name, _, _ in planted.findings} == {"aiohttp-c", "aiohttp-py", "h11"}


def test_a_planted_unexplained_difference_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpdiff, "RAW_RULES", httpdiff.RAW_RULES[1:])  # obs-fold undocumented
    planted = httpdiff.run(SEED, 0)
    assert planted.unexplained


# -- each fix for a disagreement with aiohttp, on its own ---------------------------
def _refused(raw: bytes) -> str:
    reader = http1.RequestReader(16 * 1024)
    reader.receive_data(raw)
    with pytest.raises(RemoteHttpError) as exc:
        while reader.next_event() is not http1.NEED_DATA:
            pass
    assert exc.value.status_hint == 400
    return str(exc.value)


def _framing(raw: bytes) -> list[tuple[str, int]]:
    fwd = httpdiff.forward(raw)
    return [(m.target.decode(), len(m.body)) for m in fwd.messages]


def test_a_head_request_with_a_body_is_refused() -> None:
    # aiohttp's pure-Python parser gives a HEAD request no body: "GET /admin" would
    # have been a second request there, one tunneld never saw.
    smuggle = b"GET /admin HTTP/1.1\r\nHost: ha\r\n\r\n"
    raw = b"HEAD / HTTP/1.1\r\nHost: ha\r\nContent-Length: %d\r\n\r\n" % len(smuggle) + smuggle
    assert _refused(raw) == "a HEAD request with a body"
    assert _refused(b"HEAD / HTTP/1.1\r\nHost: ha\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert _framing(b"HEAD / HTTP/1.1\r\nHost: ha\r\nContent-Length: 0\r\n\r\n") == [("/", 0)]


def test_an_upgrade_request_with_a_body_is_refused() -> None:
    # aiohttp stops framing after an upgrade request's head: the body would be the
    # next request once the app answers without switching.
    smuggle = b"GET /admin HTTP/1.1\r\nHost: ha\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n"
    head = b"POST / HTTP/1.1\r\nHost: ha\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    raw = head + b"Content-Length: %d\r\n\r\n" % len(smuggle) + smuggle
    assert _refused(raw) == "an upgrade request with a body"
    chunked = head + b"Transfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"
    assert _refused(chunked) == "an upgrade request with a body"
    assert _framing(head + b"\r\n") == [("/", 0)]  # a WebSocket handshake still passes


@pytest.mark.parametrize("method", [b"head", b"Head", b"connect", b"cOnNeCt"])
def test_head_and_connect_in_lower_case_are_refused(method: bytes) -> None:
    raw = method + b" / HTTP/1.1\r\nHost: ha\r\n\r\n"
    assert "must be upper case" in _refused(raw)


@pytest.mark.parametrize(
    "target",
    [b"*", b"ha.example.test:443", b"http://ha.{x/", b"htt0p://ha/", b"a/b", b"?x"],
)
def test_targets_in_no_form_aiohttp_takes_are_refused(target: bytes) -> None:
    raw = b"GET " + target + b" HTTP/1.1\r\nHost: ha\r\n\r\n"
    assert _refused(raw) == "malformed request target"


@pytest.mark.parametrize(
    "target", [b"/", b"//x", b"/a?b#c", b"http://ha.example.test", b"https://[::1]:8123/x?y"]
)
def test_targets_in_a_form_aiohttp_takes_pass(target: bytes) -> None:
    assert _framing(b"GET " + target + b" HTTP/1.1\r\nHost: ha\r\n\r\n") == [(target.decode(), 0)]
    assert _framing(b"OPTIONS * HTTP/1.1\r\nHost: ha\r\n\r\n") == [("*", 0)]


@pytest.mark.parametrize("name", [b"User-Agent", b"Content-Type", b"ETag", b"Max-Forwards"])
def test_a_field_aiohttp_takes_once_is_refused_twice(name: bytes) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: ha\r\n%s: a\r\n%s: a\r\n\r\n" % (name, name.lower())
    assert _refused(raw) == f"more than one {name.lower().decode()}"
    assert _framing(b"GET / HTTP/1.1\r\nHost: ha\r\n%s: a\r\n\r\n" % name) == [("/", 0)]


def test_refusals_name_the_shape() -> None:
    head = b"GET / HTTP/1.1\r\nHost: ha\r\n"
    assert _refused(head + b"X: a\r\n b\r\n\r\n").startswith("obs-fold")
    assert _refused(head + b"X : a\r\n\r\n") == "whitespace before a header's colon"
    assert _refused(head + b"X: a\x7f\r\n\r\n") == "a control character in a header line"
    chunked = b"POST / HTTP/1.1\r\nHost: ha\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert _refused(chunked + b"3;\nabc") == "a chunk-size line ended by a bare LF"
    assert _refused(chunked + b"1" * 16 + b"\r\n") == "a chunk size of more than 15 hex digits"
    assert _refused(chunked + b"3;a\rb\r\n") == "a control character in a chunk extension"
