"""atheris harness: the frame decoder (tunneld/wire/frames.py).

Contract checked: whatever bytes arrive, in whatever pieces, `FrameDecoder`
raises only RemoteProtocolError; the events it returns do not depend on how
the bytes were split; every decoded event encodes again and decodes back to
itself. See fuzz/README.md for how to run it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports():
    from tunneld.errors import RemoteProtocolError
    from tunneld.wire import events as ev
    from tunneld.wire.frames import FrameDecoder, decode, encode

MAX_FRAME = 4096  # a small limit, so the fuzzer meets the size check often


def _decode_all(pieces: list[bytes]) -> tuple[list[ev.Event], bool]:
    """Events decoded from `pieces` fed in order, and whether decoding failed."""
    decoder = FrameDecoder(MAX_FRAME)
    events: list[ev.Event] = []
    try:
        for piece in pieces:
            decoder.feed(piece)
            events.extend(decoder)
    except RemoteProtocolError:
        return events, True
    assert decoder.buffered <= sum(map(len, pieces))
    return events, False


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    cut = fdp.ConsumeIntInRange(0, 64)
    raw = fdp.ConsumeBytes(fdp.remaining_bytes())
    cut = min(cut, len(raw))
    whole, whole_failed = _decode_all([raw])
    split, split_failed = _decode_all([raw[:cut], raw[cut:]])
    # Splitting never changes what is decoded (an error may only surface later, with the
    # bytes that prove it, never earlier and never differently).
    assert whole == split and whole_failed == split_failed, (whole, split)
    for event in whole:
        assert decode(encode(event), MAX_FRAME) == [event], event


def write_seeds(directory: Path) -> None:
    """A few valid frames as starting points for the fuzzer."""
    directory.mkdir(parents=True, exist_ok=True)
    seeds = [
        ev.Hello("0.1.0", ("home.example.com",), 262144, 1000),
        ev.Welcome("s-1", ("home.example.com",), 65536, 20.0),
        ev.Open(1, "203.0.113.7", 51000, "home.example.com"),
        ev.Open(2, "2001:db8::1", 443, "h"),
        ev.Data(1, b"GET / HTTP/1.1\r\n\r\n"),
        ev.Window(1, 131072),
        ev.Eof(1),
        ev.Reset(1, ev.ResetCode.CANCEL),
        ev.Ban((ev.BanEntry("198.51.100.1", None),), replace=True),
        ev.GoAway(ev.ResetCode.SHUTDOWN, "bye"),
        ev.Ping(b"12345678"),
        ev.Pong(b"12345678"),
    ]
    for n, event in enumerate(seeds):
        (directory / f"seed-{n:02d}").write_bytes(b"\x00" + encode(event))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write-seeds":
        write_seeds(Path(sys.argv[2]))
        sys.exit(0)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
