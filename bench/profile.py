"""Sampling profiles of the relay and the daemon with py-spy, and a summary of them.

`py-spy record --format raw` writes collapsed stacks ("frame;frame;... count"),
which speedscope.app also opens. Time spent in C (OpenSSL, socket calls) is
charged to the Python line that called it, so `ssl.py` frames are TLS crypto.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# (category, substring of the frame's file): the first match names a leaf frame's category.
CATEGORIES = (
    # A process woken from epoll_wait but not yet given a CPU is in state R and is
    # sampled there: with four busy processes on two cores this is mostly run-queue
    # wait, not work (epoll_wait(0) itself costs ~0.5 us here).
    ("epoll_wait (mostly waiting for a CPU)", "trio/_core/_io_epoll.py"),
    ("TLS (OpenSSL via ssl.py)", "/ssl.py"),
    ("trio SSLStream", "trio/_ssl.py"),
    ("wsproto (WS framing, masking)", "wsproto/"),
    ("trio-websocket", "trio_websocket/"),
    ("tunneld wire (frames, mux)", "tunneld/wire/"),
    ("tunneld transport (session, splice)", "tunneld/transport/"),
    ("tunneld other", "tunneld/"),
    ("trio scheduler/core", "trio/_core/"),
    ("socket calls (incl. preempted after waking the peer)", "trio/_socket.py"),
    ("trio other", "trio/"),
    ("h11", "h11/"),
)
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start_record(py_spy: str, pid: int, seconds: int, output: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "200"]
        + ["--format", "raw", "--full-filenames", "--output", str(output)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )


def start_perf(pid: int, seconds: int, output: Path) -> subprocess.Popen[bytes] | None:
    """`perf record` of on-CPU time (None without perf): where CPU really goes, by library.
    py-spy samples runnable threads, so a thread preempted inside send() after waking its
    peer counts there; perf counts only cycles actually spent."""
    perf = shutil.which("perf")
    if perf is None:
        return None
    return subprocess.Popen(
        [
            perf,
            "record",
            "-F",
            "499",
            "-o",
            str(output),
            "-p",
            str(pid),
            "--",
            "sleep",
            str(seconds),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )


def perf_shares(data: Path, sort: str, top: int = 10) -> list[tuple[str, float]]:
    """(name, share) from `perf report --sort dso` or `--sort sym`."""
    perf = shutil.which("perf")
    if perf is None or not data.exists():
        return []
    result = subprocess.run(
        [perf, "report", "-i", str(data), "--no-children", "--sort", sort, "--stdio"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    rows = []
    for line in result.stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0].endswith("%") and not line.startswith("#"):
            name = parts[1].replace("[.]", "").replace("[k]", "").strip()
            rows.append((name, float(parts[0][:-1]) / 100))
    return rows[:top]


def format_perf(name: str, dsos: list[tuple[str, float]], syms: list[tuple[str, float]]) -> str:
    lines = [f"== {name}: on-CPU time (perf)"]
    lines += [f"    {share:6.1%}  {dso}" for dso, share in dsos]
    lines.append("  top symbols:")
    lines += [f"    {share:6.1%}  {sym}" for sym, share in syms]
    return "\n".join(lines)


def short_file(path: str) -> str:
    for marker in ("site-packages/", "/main/", "/lib/python3.11/", "/lib/python3.12/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path.rsplit("/", 1)[-1]


def category(path: str) -> str:
    for name, marker in CATEGORIES:
        if marker in path:
            return name
    return "other (stdlib, interpreter)"


@dataclass(frozen=True)
class Summary:
    samples: int
    categories: list[tuple[str, float]]  # self share per category
    top_self: list[tuple[str, float]]  # "func (file)", share of samples as the leaf
    top_total: list[tuple[str, float]]  # share of samples with the function anywhere on the stack


def summarize(raw: Path, top: int = 12) -> Summary:
    self_count: Counter[str] = Counter()
    total_count: Counter[str] = Counter()
    cats: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        names = []
        leaf_file = ""
        for frame in stack.split(";"):
            match = _FRAME.match(frame)
            func, file = (match["func"], match["file"]) if match else (frame, "")
            names.append(f"{func} ({short_file(file)})")
            leaf_file = file
        self_count[names[-1]] += count
        for name in set(names):
            total_count[name] += count
        cats[category(leaf_file)] += count
    if not samples:
        return Summary(0, [], [], [])

    def shares(counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(name, c / samples) for name, c in counter.most_common(n)]

    # Frames on (nearly) every stack are the entry points: they say nothing.
    for name, c in list(total_count.items()):
        if c >= 0.97 * samples:
            del total_count[name]
    return Summary(samples, shares(cats, 20), shares(self_count, top), shares(total_count, top))


def format_summary(name: str, s: Summary) -> str:
    lines = [f"== {name}: {s.samples} samples (busy time only)"]
    lines.append("  self time by category:")
    lines += [f"    {share:6.1%}  {cat}" for cat, share in s.categories]
    lines.append("  top functions, self:")
    lines += [f"    {share:6.1%}  {func}" for func, share in s.top_self]
    lines.append("  top functions, total (on the stack):")
    lines += [f"    {share:6.1%}  {func}" for func, share in s.top_total]
    return "\n".join(lines)
