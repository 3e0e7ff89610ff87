"""The WAN figures of issue 16: the daemon reaches the relay through bench/wan.py (a
one-way delay, a rate per direction, a 512 KiB bottleneck FIFO), clients reach the relay
over loopback. The emulated link is what limits, so these measure how the tunnel fills a
link (its windows) and what it queues in front of small requests.

Per link: (a) one download, MB/s and % of the link rate; (b) the p99 of paced small
requests on other connections, alone and while a download runs; (c) four downloads
started together, each one's MB/s over the same window and their spread.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Any

from bench.world import World, wait_for

MIB = 1024 * 1024
TARGETS = {"link_share": 0.90, "p99_ratio": 1.5, "spread": 0.20}


@dataclass(frozen=True)
class Link:
    rtt_ms: float
    rate_mbit: float
    buffer_kib: int = 512

    @property
    def rate(self) -> float:
        """Bytes per second."""
        return self.rate_mbit * 1e6 / 8

    @property
    def label(self) -> str:
        return f"{self.rtt_ms:g} ms RTT, {self.rate_mbit:g} Mbit/s, {self.buffer_kib} KiB buffer"

    def args(self) -> tuple[str, ...]:
        return (
            "--delay-ms",
            f"{self.rtt_ms / 2:g}",
            "--rate-mbit",
            f"{self.rate_mbit:g}",
            "--buffer-kib",
            str(self.buffer_kib),
        )

    @classmethod
    def parse(cls, value: str) -> Link:
        """RTT_MS/MBIT[/BUFFER_KIB], e.g. 50/100 or 100/40/512."""
        parts = value.split("/")
        if len(parts) not in (2, 3):
            raise ValueError(f"expected RTT_MS/MBIT[/BUFFER_KIB], got {value!r}")
        return cls(float(parts[0]), float(parts[1]), *(int(p) for p in parts[2:]))


LINKS = (Link(50, 100), Link(100, 40))


@dataclass(frozen=True)
class WanSettings:
    download_bytes: int = 32 * MIB
    probe_conns: int = 8
    probe_think: float = 0.05  # each connection waits this long between requests
    probe_seconds: float = 8.0  # ~550 requests at 50 ms RTT: p99 is the 6th worst
    streams: int = 4
    stream_seconds: float = 8.0


WAN_FULL = WanSettings()
WAN_QUICK = dataclasses.replace(
    WAN_FULL, download_bytes=16 * MIB, probe_seconds=4.0, stream_seconds=4.0
)


def measure_link(
    world: World, clients: Any, link: Link, s: WanSettings, via: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The WAN figures through whichever tunnel `via` points the clients at (spec fields
    such as port and cafile; none: tunneld's relay). `clients` is bench.run's Clients."""
    via = via or {}
    out: dict[str, Any] = {"link": dataclasses.asdict(link), "label": link.label}
    per_byte = 1 / link.rate  # seconds the link needs per byte: timeouts scale with it
    one = clients.run(
        True,
        {"mode": "download", "size": s.download_bytes, **via},
        timeout=60 + 20 * s.download_bytes * per_byte,
    )
    out["download_mbps"] = round(one["mbps"], 2)
    out["download_share"] = round(one["mbps"] * 1e6 / link.rate, 3)

    probe = {
        "mode": "rate",
        "conns": s.probe_conns,
        "duration": s.probe_seconds,
        "warmup": 0.5,
        "think": s.probe_think,
        "path": "/small",
        "count_unfinished": True,  # a stalled request counts, with its age so far
        **via,
    }
    timeout = s.probe_seconds + 120
    alone = clients.run(True, probe, timeout)
    # Repeated 8 MiB GETs on one connection; ready once the first one is in, so the
    # probe meets a download in its stride. It outlasts the probe's handshakes and window.
    bulk = clients.start_load(
        "wan-bulk",
        {"mode": "download", "size": 8 * MIB, "duration": s.probe_seconds + 8.0, **via},
    )
    try:
        loaded = clients.run(True, probe, timeout)
    except RuntimeError as exc:  # SniTun may starve the probe's handshakes: say so
        loaded = {"p99_ms": float("inf"), "p50_ms": float("inf"), "requests": 0}
        loaded["unfinished"] = s.probe_conns
        out["probe_error"] = str(exc)
    beside = clients.result(bulk, timeout + 60 + 20 * 8 * MIB * per_byte)
    out.update(
        p99_ms_alone=round(alone["p99_ms"], 1),
        p50_ms_alone=round(alone["p50_ms"], 1),
        p99_ms_loaded=round(loaded["p99_ms"], 1),
        p50_ms_loaded=round(loaded["p50_ms"], 1),
        requests_alone=alone["requests"],
        requests_loaded=loaded["requests"],
        unfinished_loaded=loaded["unfinished"],
        p99_ratio=round(loaded["p99_ms"] / alone["p99_ms"], 2),
        download_mbps_beside_probe=round(beside["mbps"], 2),
    )
    if s.streams:
        out.update(measure_streams(world, clients, link, s, via))
    out["pass"] = {
        "download": out["download_share"] >= TARGETS["link_share"],
        "p99": out["p99_ratio"] <= TARGETS["p99_ratio"] and not out["unfinished_loaded"],
        **({"spread": out["streams_deviation"] <= TARGETS["spread"]} if s.streams else {}),
    }
    return out


def measure_streams(
    world: World, clients: Any, link: Link, s: WanSettings, via: dict[str, Any]
) -> dict[str, Any]:
    """`s.streams` downloads at once, counted over the same wall-clock window."""
    start_at = time.time() + 6.0  # after every client has connected (a few WAN RTTs)
    spec = {
        "mode": "stream",
        "size": 8 * 1024**3,  # more than any window here lets through: cut at the end
        "start_at": start_at,
        "duration": s.stream_seconds,
        **via,
    }
    readies = [world.root / f"stream-{i}.ready" for i in range(s.streams)]
    popens = []
    for ready in readies:
        ready.unlink(missing_ok=True)
        popens.append(clients.start(True, {**spec, "ready_file": str(ready)}))
    wait_for(lambda: all(r.exists() for r in readies), 30, "the downloads to connect")
    late = time.time() > start_at
    results = [clients.result(p, s.stream_seconds + 90) for p in popens]
    rates = [r["mbps"] for r in results]
    mean = statistics.mean(rates)
    return {
        "streams_mbps": [round(x, 2) for x in rates],
        "streams_spread": round(max(rates) / max(min(rates), 1e-9), 2),
        "streams_deviation": round(max(abs(x - mean) for x in rates) / mean, 3),
        "streams_share": round(sum(rates) * 1e6 / link.rate, 3),
        "streams_late_start": late,
        "streams_timelines_mbps": [[round(b / 1e6, 2) for b in r["timeline"]] for r in results],
    }


def _ok(flag: bool) -> str:
    return "yes" if flag else "NO"


def table(results: list[dict[str, Any]]) -> str:
    """One block of rows per (side, link) result."""
    rows = [("WAN figure", "value", "target", "ok")]
    for r in results:
        side = r.get("side", "tunneld")
        rows.append((f"{side}, {r['label']}", "", "", ""))
        rows.append(
            (
                "  one download MB/s (% of link)",
                f"{r['download_mbps']:.2f} ({r['download_share']:.0%})",
                f">= {TARGETS['link_share']:.0%}",
                _ok(r["pass"]["download"]),
            )
        )
        stalled = f", {r['unfinished_loaded']} unfinished" if r["unfinished_loaded"] else ""
        rows.append(
            (
                "  small p99 ms, download running / idle",
                f"{r['p99_ms_loaded']:.1f} / {r['p99_ms_alone']:.1f} = {r['p99_ratio']:.2f}x"
                + stalled,
                f"<= {TARGETS['p99_ratio']:g}x",
                _ok(r["pass"]["p99"]),
            )
        )
        if "streams_mbps" in r:
            each = " ".join(f"{x:.2f}" for x in r["streams_mbps"])
            rows.append(
                (
                    f"  {len(r['streams_mbps'])} downloads at once MB/s (sum % of link)",
                    f"{each} ({r['streams_share']:.0%}), max/min {r['streams_spread']:.2f}",
                    f"each within ±{TARGETS['spread']:.0%} of the mean",
                    _ok(r["pass"]["spread"]),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
