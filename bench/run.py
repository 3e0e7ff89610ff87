"""tunneld benchmark: `python -m bench.run [--quick] [--profile] [--only FIGURES]`.

Starts a real relay, daemon and demo app on loopback (bench/world.py), drives them
from separate client processes (bench/client.py) and compares each figure with
its baseline measured in the same run: a demo app terminating TLS itself. Prints
a table and one line `RESULT {json}`. `--profile` also samples the relay and the
daemon with py-spy during a bulk download (bench/profile.py). The `wan` figures run in
worlds of their own, one per link, with bench/wan.py between daemon and relay
(bench/wanfigures.py); `snitun` puts tunneld beside SniTun 0.47 and direct TLS with the
same aiohttp app behind each (bench/snitunfigures.py; SniTun's Python 3.13 venv is made
on first use, bench/snitunenv.py). `--home-set`/`--relay-set` change the tunnel's config
for A/B runs.
See bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import profile, snitunenv, snitunfigures, wanfigures
from bench.client import Target, connect, get
from bench.world import PY, CpuSampler, World, raise_nofile, rss_kib, wait_for
from tunneld.demoapp import pattern_sha256

MIB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent
TARGETS = {"bulk": 0.15, "rate": 0.50, "fairness": 3.0, "memory_kib": 64.0, "ws": 2.0}
FIGURES = ("memory", "bulk", "rate", "fairness", "ws", "snitun", "wan")


@dataclass(frozen=True)
class Settings:
    bulk_bytes: int
    bulk_runs: int
    rate_conns: int
    rate_seconds: float
    rate_warmup: float
    slices: int  # alternating slices per side for the rate figure
    fair_conns: int
    fair_think: float
    fair_seconds: float
    idle_streams: int
    profile_seconds: int
    perf_seconds: int
    ws_conns: int
    ws_seconds: float
    ws_slices: int
    ws_warmup: float


FULL = Settings(
    bulk_bytes=256 * MIB,
    bulk_runs=3,
    rate_conns=50,
    rate_seconds=10.0,
    rate_warmup=0.5,
    slices=4,
    fair_conns=4,
    fair_think=0.01,
    fair_seconds=8.0,
    idle_streams=1000,
    profile_seconds=8,
    perf_seconds=5,
    ws_conns=10,
    # A p99 over 10 s ranged 0.87-3.18x direct between runs of the same code: both
    # sides' tails move with the machine, the saturated direct app's most. 30 s in 12
    # slices per side kept the ratio within 1.24-2.01x over nine runs (bench/RESULTS.md,
    # stop 15).
    ws_seconds=30.0,
    ws_slices=12,
    ws_warmup=0.5,
)
QUICK = dataclasses.replace(
    FULL,
    bulk_bytes=64 * MIB,
    rate_seconds=3.0,
    rate_warmup=0.5,
    slices=2,
    fair_seconds=3.0,
    profile_seconds=4,
    perf_seconds=3,
    ws_seconds=3.0,
    ws_slices=2,
    ws_warmup=0.5,
)


class Clients:
    """Client processes; every one is killed by `stop_all` (called from a finally)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.running: list[subprocess.Popen[str]] = []

    def start(self, tunnel: bool, spec: dict[str, Any]) -> subprocess.Popen[str]:
        full = {**self.world.target(tunnel), **spec}
        popen = subprocess.Popen(
            [PY, "-m", "bench.client", json.dumps(full)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.running.append(popen)
        return popen

    def result(self, popen: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.communicate(timeout=5)
            raise RuntimeError(f"bench client still running after {timeout:g}s") from None
        finally:
            self.running.remove(popen)
        if popen.returncode != 0:
            self.world.check_alive()
            raise RuntimeError(f"bench client failed ({popen.returncode}): {err.strip()}")
        value: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return value

    def start_load(self, name: str, spec: dict[str, Any]) -> subprocess.Popen[str]:
        """Start a background client through the tunnel; return once its bytes flow."""
        ready = self.world.root / f"{name}.ready"
        ready.unlink(missing_ok=True)
        popen = self.start(True, {**spec, "ready_file": str(ready)})
        wait_for(lambda: ready.exists() or popen.poll() is not None, 60, f"the {name} load")
        if not ready.exists():
            self.result(popen, 5)  # raises with the client's error
        return popen

    def run(self, tunnel: bool, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        return self.result(self.start(tunnel, spec), timeout)

    def stop_all(self) -> None:
        for popen in self.running:
            popen.kill()
            popen.communicate(timeout=5)
        self.running.clear()


# ---------------------------------------------------------------------------
# The measurements


@contextlib.contextmanager
def running(
    what: str,
    prefix: str,
    *,
    keep: bool = False,
    setup: Callable[[World], None] | None = None,
    configure: Callable[[World], None] | None = None,
) -> Iterator[tuple[World, Clients, CpuSampler]]:
    """A started world whose paths answer correctly, its clients and a CPU sampler over
    every process (`configure` may set the world's options before it starts, `setup` may
    start more processes after). Everything is stopped on the way out,
    and the work folder removed unless `keep`. A failure (a process gone, a wait timed
    out) prints what failed and each process's log tail, and exits 1."""
    raise_nofile()
    root = Path(tempfile.mkdtemp(prefix=prefix))
    world = World(root)
    clients = Clients(world)
    sampler: CpuSampler | None = None
    try:
        if configure is not None:
            configure(world)
        world.start_all()
        if setup is not None:
            setup(world)
        sanity(world)
        sampler = CpuSampler(world.pids())
        sampler.start()
        yield world, clients, sampler
        world.check_alive()
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"{what} failed: {exc}", file=sys.stderr)
        for proc in world.procs.values():
            print(f"--- {proc.name} log tail:\n{proc.log_tail(10)}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if sampler is not None:
            sampler.stop()
        clients.stop_all()
        world.stop_all()
        if keep:
            print(f"work folder kept: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def sanity(world: World) -> None:
    """Every path answers correctly before anything is timed."""
    n = 3 * MIB + 7
    specs = [world.target(True), world.target(False)]
    if world.snitun_port:
        specs.append({**world.target(True), **world.snitun_target()})
    for spec in specs:
        target = Target.from_spec(spec)
        view = memoryview(bytearray(256 * 1024))
        with connect(target, target.context()) as sock:
            _, small = get(sock, target, "/small", view)
            if small != b"hello tunnel\n":
                raise RuntimeError(f"/small answered {small!r}")
            _, digest = get(sock, target, f"/bytes-sha256?n={n}", view)
            if digest.strip().decode() != pattern_sha256(n):
                raise RuntimeError("/bytes-sha256 disagrees with the local pattern")


def measure_memory(world: World, clients: Clients, s: Settings) -> dict[str, Any]:
    """RSS of relay and daemon with `idle_streams` handshaken, silent connections vs none."""

    def rss() -> dict[str, float]:
        samples = []
        for _ in range(3):
            samples.append({n: rss_kib(world.procs[n].pid) for n in ("relay", "home")})
            time.sleep(0.2)
        return {n: statistics.median(x[n] for x in samples) for n in ("relay", "home")}

    before = rss()
    ready = world.root / "hold.ready"
    ready.unlink(missing_ok=True)
    hold = clients.start(True, {"mode": "hold", "conns": s.idle_streams, "ready_file": str(ready)})
    wait_for(lambda: ready.exists() or hold.poll() is not None, 240, "idle streams")
    if not ready.exists():
        clients.result(hold, 5)  # raises with the client's error

    def settled() -> bool:
        active = world.home_status().get("streams", {}).get("active")
        return active is None or active >= s.idle_streams

    wait_for(settled, 60, "the daemon to count the idle streams")
    time.sleep(1.0)
    after = rss()
    held = clients.result(hold, 60)  # closes its stdin: the client closes every connection
    wait_for(
        lambda: world.home_status().get("streams", {}).get("active", 0) == 0, 60, "streams to end"
    )
    n = s.idle_streams
    out: dict[str, Any] = {"streams": n, "handshake_seconds": round(held["handshake_seconds"], 2)}
    for name in ("home", "relay"):
        out[f"{name}_kib_before"] = before[name]
        out[f"{name}_kib_after"] = after[name]
        out[f"{name}_kib_per_stream"] = round((after[name] - before[name]) / n, 2)
    out["target_kib"] = TARGETS["memory_kib"]
    out["pass"] = max(out["home_kib_per_stream"], out["relay_kib_per_stream"]) <= out["target_kib"]
    return out


def measure_bulk(
    world: World, clients: Clients, sampler: CpuSampler, s: Settings
) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"tunnel": [], "direct": []}
    for _ in range(s.bulk_runs):
        for tunnel in (True, False):
            r = clients.run(tunnel, {"mode": "download", "size": s.bulk_bytes}, timeout=180)
            r["cpu_seconds"] = sampler.seconds(r["t0"], r["t1"])
            runs["tunnel" if tunnel else "direct"].append(r)
    mib = s.bulk_bytes / MIB

    def cpu_ms_per_mib(rs: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, float]:
        out = {n: statistics.median(r["cpu_seconds"][n] for r in rs) * 1000 / mib for n in names}
        out["client"] = statistics.median(r["cpu"] for r in rs) * 1000 / mib
        return {n: round(v, 2) for n, v in out.items()}

    tunnel = statistics.median(r["mbps"] for r in runs["tunnel"])
    direct = statistics.median(r["mbps"] for r in runs["direct"])
    return {
        "bytes": s.bulk_bytes,
        "runs": s.bulk_runs,
        "tunnel_mbps": round(tunnel, 1),
        "direct_mbps": round(direct, 1),
        "ratio": round(tunnel / direct, 3),
        "target_ratio": TARGETS["bulk"],
        "pass": tunnel / direct >= TARGETS["bulk"],
        "tunnel_runs_mbps": [round(r["mbps"], 1) for r in runs["tunnel"]],
        "direct_runs_mbps": [round(r["mbps"], 1) for r in runs["direct"]],
        "tunnel_cpu_ms_per_mib": cpu_ms_per_mib(runs["tunnel"], ("relay", "home", "app")),
        "direct_cpu_ms_per_mib": cpu_ms_per_mib(runs["direct"], ("direct",)),
        "cipher": runs["tunnel"][0]["cipher"],
        "direct_cipher": runs["direct"][0]["cipher"],
    }


@dataclass(frozen=True)
class Side:
    """One side of an interleaved figure: where its client goes and whose CPU it uses."""

    tunnel: bool  # the tunnel's target, else the direct app's
    procs: tuple[str, ...]  # the processes its CPU share is reported for
    spec: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. another port


TUNNEL_AND_DIRECT = {
    "tunnel": Side(True, ("relay", "home", "app")),
    "direct": Side(False, ("direct",)),
}


def interleaved(
    world: World,
    clients: Clients,
    sampler: CpuSampler,
    spec: dict[str, Any],
    seconds: float,
    slices: int,
    sides: dict[str, Side] = TUNNEL_AND_DIRECT,
) -> dict[str, Any]:
    """A closed-loop figure on each side, in alternating slices (tunnel, direct, direct,
    tunnel, ...: the sides in order, then reversed) of `seconds` / `slices` each per side.

    A noisy stretch of this shared machine then falls on both sides instead of on
    whichever ran during it: one sequential WebSocket run gave the direct side a p99 of
    7.9 ms against 3.0-3.7 ms in the runs on either side of it. Rates and percentiles
    are over every request of a side's slices; `slice_ratios` compare each pair's p99.
    """
    spec = {**spec, "duration": seconds / slices}
    timeout = seconds / slices + float(spec["warmup"]) + 120
    pooled: dict[str, list[float]] = {key: [] for key in sides}
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in sides}
    for i in range(slices):
        for key in list(sides) if i % 2 == 0 else list(sides)[::-1]:
            side = sides[key]
            latency_file = world.root / f"latencies-{key}-{i}"
            run_spec = {**spec, **side.spec, "latency_file": str(latency_file)}
            r = clients.run(side.tunnel, run_spec, timeout)
            pooled[key] += array.array("d", latency_file.read_bytes())
            latency_file.unlink()
            r["share"] = sampler.share(r["t0"], r["t1"])
            runs[key].append(r)
    out: dict[str, Any] = {"seconds": seconds, "slices": slices}
    for key, side in sides.items():
        lat = sorted(pooled[key])
        wall = sum(r["seconds"] for r in runs[key])
        out[f"{key}_rate"] = round(len(lat) / wall, 1)
        out[f"{key}_count"] = len(lat)
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)):
            out[f"{key}_{name}_ms"] = round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 2)
        out[f"{key}_max_ms"] = round(1000 * lat[-1], 2)
        out[f"{key}_errors"] = sum(r["errors"] for r in runs[key])
        share = {n: sum(r["share"][n] * r["seconds"] for r in runs[key]) / wall for n in side.procs}
        share["client"] = sum(r["cpu"] for r in runs[key]) / wall
        out[f"{key}_cpu_share"] = {n: round(v, 2) for n, v in share.items()}
        out[f"{key}_runs"] = runs[key]
    if "tunnel" in sides and "direct" in sides:
        pairs = zip(runs["tunnel"], runs["direct"], strict=True)
        out["slice_ratios"] = [round(t["p99_ms"] / d["p99_ms"], 2) for t, d in pairs]
    return out


def measure_rate(
    world: World, clients: Clients, sampler: CpuSampler, s: Settings
) -> dict[str, Any]:
    spec = {"mode": "rate", "conns": s.rate_conns, "warmup": s.rate_warmup, "path": "/small"}
    r = interleaved(world, clients, sampler, spec, s.rate_seconds, s.slices)
    out: dict[str, Any] = {"conns": s.rate_conns, "seconds": s.rate_seconds, "slices": s.slices}
    for key in ("tunnel", "direct"):
        out[f"{key}_rps"] = r[f"{key}_rate"]
        for name in ("p50_ms", "p99_ms", "errors", "cpu_share"):
            out[f"{key}_{name}"] = r[f"{key}_{name}"]
    out["slice_rates"] = [
        round(t["rate"] / d["rate"], 3)
        for t, d in zip(r["tunnel_runs"], r["direct_runs"], strict=True)
    ]
    out["ratio"] = round(out["tunnel_rps"] / out["direct_rps"], 3)
    out["target_ratio"] = TARGETS["rate"]
    out["pass"] = out["ratio"] >= TARGETS["rate"]
    return out


def measure_fairness(world: World, clients: Clients, s: Settings) -> dict[str, Any]:
    """p99 of paced small requests through the tunnel, alone and beside a bulk download."""
    probe = {
        "mode": "rate",
        "conns": s.fair_conns,
        "duration": s.fair_seconds,
        "warmup": 0.5,
        "think": s.fair_think,
        "path": "/small",
    }
    timeout = s.fair_seconds + 120
    alone = clients.run(True, probe, timeout)
    bulk = clients.start_load(
        "bulk", {"mode": "download", "size": 16 * MIB, "duration": s.fair_seconds + 2.0}
    )
    loaded = clients.run(True, probe, timeout)
    bulk_result = clients.result(bulk, timeout)
    ratio = loaded["p99_ms"] / alone["p99_ms"]
    return {
        "conns": s.fair_conns,
        "think_ms": s.fair_think * 1000,
        "seconds": s.fair_seconds,
        "p50_ms_alone": round(alone["p50_ms"], 2),
        "p99_ms_alone": round(alone["p99_ms"], 2),
        "p50_ms_with_bulk": round(loaded["p50_ms"], 2),
        "p99_ms_with_bulk": round(loaded["p99_ms"], 2),
        "requests_alone": alone["requests"],
        "requests_with_bulk": loaded["requests"],
        "bulk_mbps": round(bulk_result["mbps"], 1),
        "ratio": round(ratio, 2),
        "target_ratio": TARGETS["fairness"],
        "pass": ratio <= TARGETS["fairness"],
    }


def measure_ws(world: World, clients: Clients, sampler: CpuSampler, s: Settings) -> dict[str, Any]:
    """WebSocket echo round trips (64 B messages, closed loop), tunnel vs direct TLS."""
    spec = {
        "mode": "ws",
        "conns": s.ws_conns,
        "size": 64,
        "warmup": s.ws_warmup,
        "path": "/ws/echo",
    }
    r = interleaved(world, clients, sampler, spec, s.ws_seconds, s.ws_slices)
    out: dict[str, Any] = {
        "conns": s.ws_conns,
        "size": 64,
        "seconds": s.ws_seconds,
        "slices": s.ws_slices,
    }
    for key in ("tunnel", "direct"):
        out[f"{key}_mps"] = r[f"{key}_rate"]
        out[f"{key}_messages"] = r[f"{key}_count"]
        for name in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "errors", "cpu_share"):
            out[f"{key}_{name}"] = r[f"{key}_{name}"]
        out[f"{key}_unclean_closes"] = sum(x["unclean_closes"] for x in r[f"{key}_runs"])
    out["slice_ratios"] = r["slice_ratios"]
    out["ratio"] = round(out["tunnel_p99_ms"] / out["direct_p99_ms"], 2)
    out["target_ratio"] = TARGETS["ws"]
    # A connection lost under load fails the figure whatever the latency of the others.
    out["pass"] = out["ratio"] <= TARGETS["ws"] and out["tunnel_errors"] == 0
    return out


def run_profile(world: World, clients: Clients, s: Settings, out_dir: Path) -> dict[str, Any]:
    """py-spy on the relay and the daemon under a bulk download, then under small requests."""
    py_spy = profile.find_py_spy()
    if py_spy is None:
        raise RuntimeError("--profile needs py-spy: /work/venv/bin/pip install py-spy")
    out_dir.mkdir(parents=True, exist_ok=True)
    loads = {
        "bulk": {"mode": "download", "size": 32 * MIB},
        "small": {"mode": "rate", "conns": s.rate_conns, "warmup": 0.5, "path": "/small"},
    }
    out: dict[str, Any] = {"dir": str(out_dir)}
    for load, spec in loads.items():
        seconds = s.profile_seconds + s.perf_seconds + 3.0
        client = clients.start_load(f"profile-{load}", {**spec, "duration": seconds})
        recorders = {
            name: profile.start_record(
                py_spy, world.procs[name].pid, s.profile_seconds, out_dir / f"{name}-{load}.raw"
            )
            for name in ("relay", "home")
        }
        try:
            for rec in recorders.values():
                rec.wait(s.profile_seconds + 30)
        finally:
            for rec in recorders.values():
                if rec.poll() is None:
                    rec.kill()
                    rec.wait(5)
        perf_runs = {
            name: profile.start_perf(
                world.procs[name].pid, s.perf_seconds, out_dir / f"{name}-{load}.perf"
            )
            for name in ("relay", "home")
        }
        try:
            for perf_run in perf_runs.values():
                if perf_run is not None:
                    perf_run.wait(s.perf_seconds + 30)
        finally:
            for perf_run in perf_runs.values():
                if perf_run is not None and perf_run.poll() is None:
                    perf_run.kill()
                    perf_run.wait(5)
        result = clients.result(client, seconds + 120)
        figure = ("mbps", result["mbps"]) if load == "bulk" else ("rps", result["rate"])
        out[load] = {figure[0]: round(figure[1], 1)}
        for name in recorders:
            raw = out_dir / f"{name}-{load}.raw"
            if not raw.exists():
                continue
            summary = profile.summarize(raw)
            print(profile.format_summary(f"{name}, {load} load", summary), flush=True)
            out[load][name] = {
                "samples": summary.samples,
                "categories": {c: round(v, 3) for c, v in summary.categories},
                "top_self": {f: round(v, 3) for f, v in summary.top_self},
            }
            data = out_dir / f"{name}-{load}.perf"
            dsos = profile.perf_shares(data, "dso", 6)
            if dsos:
                syms = profile.perf_shares(data, "sym", 10)
                print(profile.format_perf(f"{name}, {load} load", dsos, syms), flush=True)
                out[load][name]["perf_dso"] = {d: round(v, 3) for d, v in dsos}
                out[load][name]["perf_sym"] = {d: round(v, 3) for d, v in syms}
    return out


def measure_wan(
    links: tuple[wanfigures.Link, ...],
    quick: bool,
    keep: bool,
    configure: Callable[[World], None],
    step: Callable[[str], None],
    snitun_python: str = "",
) -> list[dict[str, Any]]:
    """The WAN figures, one world per link (bench/wan.py between daemon and relay), and
    with `snitun_python` SniTun's rows too (its own bench/wan.py, the same link)."""
    s = wanfigures.WAN_QUICK if quick else wanfigures.WAN_FULL
    out = []
    for link in links:

        def with_link(world: World, link: wanfigures.Link = link) -> None:
            configure(world)
            world.wan = link.args()

        def with_snitun(world: World, link: wanfigures.Link = link) -> None:
            world.start_snitun(snitun_python, wan=link.args())

        step(f"wan: {link.label}")
        with running(
            f"wan ({link.label})",
            "tunneld-bench-wan-",
            keep=keep,
            configure=with_link,
            setup=with_snitun if snitun_python else None,
        ) as (world, clients, _):
            out.append(wanfigures.measure_link(world, clients, link, s))
            if snitun_python:
                step(f"wan: {link.label}, SniTun")
                one = dataclasses.replace(s, streams=0)
                r = wanfigures.measure_link(world, clients, link, one, world.snitun_target())
                out.append({**r, "side": "SniTun 0.47"})
    return out


def measure_snitun(
    python: str, quick: bool, keep: bool, configure: Callable[[World], None]
) -> dict[str, Any]:
    """tunneld, SniTun and direct TLS with the same aiohttp app, in one world."""
    s = snitunfigures.SNITUN_QUICK if quick else snitunfigures.SNITUN_FULL

    def with_aiohttp(world: World) -> None:
        configure(world)
        world.aiohttp_python = python

    with running(
        "snitun",
        "tunneld-bench-snitun-",
        keep=keep,
        configure=with_aiohttp,
        setup=lambda world: world.start_snitun(python),
    ) as (world, clients, sampler):
        return snitunfigures.measure(world, clients, sampler, s)


# ---------------------------------------------------------------------------
# Output


def _ok(flag: bool) -> str:
    return "yes" if flag else "NO"


def table(r: dict[str, Any]) -> str:
    """The figures measured in `r` (any subset of FIGURES) as rows, then the CPU lines."""
    b, q, f, m, w = (r.get(name) for name in ("bulk", "rate", "fairness", "memory", "ws"))
    rows = [("figure", "tunnel", "baseline", "ratio", "target", "ok")]
    if b:
        rows.append(
            (
                f"bulk download MB/s ({b['bytes'] // MIB} MiB, median of {b['runs']})",
                f"{b['tunnel_mbps']:.1f}",
                f"{b['direct_mbps']:.1f} direct TLS",
                f"{b['ratio']:.1%}",
                f">= {b['target_ratio']:.0%}",
                _ok(b["pass"]),
            )
        )
    if q:
        rows += [
            (
                f"GET /small req/s ({q['conns']} keep-alive conns, {q['seconds']:g} s)",
                f"{q['tunnel_rps']:.0f}",
                f"{q['direct_rps']:.0f} direct TLS",
                f"{q['ratio']:.1%}",
                f">= {q['target_ratio']:.0%}",
                _ok(q["pass"]),
            ),
            (
                "  latency p50 / p99 ms",
                f"{q['tunnel_p50_ms']:.2f} / {q['tunnel_p99_ms']:.2f}",
                f"{q['direct_p50_ms']:.2f} / {q['direct_p99_ms']:.2f}",
                "",
                "",
                "",
            ),
        ]
    if w:
        lost = w["tunnel_errors"] + w["direct_errors"]
        unclean = w["tunnel_unclean_closes"] + w["direct_unclean_closes"]
        trouble = f" ({lost} conns lost, {unclean} unclean closes)" if lost or unclean else ""
        rows += [
            (
                f"WebSocket echo p99 ms ({w['conns']} conns, {w['size']} B)",
                f"{w['tunnel_p99_ms']:.2f}",
                f"{w['direct_p99_ms']:.2f} direct TLS",
                f"{w['ratio']:.2f}x",
                f"<= {w['target_ratio']:g}x",
                _ok(w["pass"]),
            ),
            (
                "  latency p50 ms",
                f"{w['tunnel_p50_ms']:.2f}",
                f"{w['direct_p50_ms']:.2f}",
                "",
                "",
                "",
            ),
            (
                "  messages/s" + trouble,
                f"{w['tunnel_mps']:.0f}",
                f"{w['direct_mps']:.0f}",
                "",
                "",
                "",
            ),
        ]
    if f:
        rows.append(
            (
                f"small p99 ms beside a bulk download ({f['conns']} conns)",
                f"{f['p99_ms_with_bulk']:.2f}",
                f"{f['p99_ms_alone']:.2f} no bulk",
                f"{f['ratio']:.2f}x",
                f"<= {f['target_ratio']:g}x",
                _ok(f["pass"]),
            )
        )
    if m:
        for name, label in (("home", "daemon"), ("relay", "relay")):
            rows.append(
                (
                    f"{label} KiB per idle stream ({m['streams']} streams)",
                    f"{m[f'{name}_kib_per_stream']:.1f}",
                    f"{m[f'{name}_kib_before'] / 1024:.1f} MiB at 0",
                    "",
                    f"<= {m['target_kib']:g}",
                    _ok(m[f"{name}_kib_per_stream"] <= m["target_kib"]),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))

    def cpu(d: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in d.items())

    lines.append("")
    if b:
        lines.append(f"bulk CPU ms per MiB, tunnel: {cpu(b['tunnel_cpu_ms_per_mib'])}")
        lines.append(f"bulk CPU ms per MiB, direct: {cpu(b['direct_cpu_ms_per_mib'])}")
    for d, label in ((q, "req/s"), (w, "ws")):
        if d:
            lines.append(f"{label} CPU (1.0 = one core), tunnel: {cpu(d['tunnel_cpu_share'])}")
            lines.append(f"{label} CPU (1.0 = one core), direct: {cpu(d['direct_cpu_share'])}")
    if q and q.get("slice_rates"):
        lines.append(
            f"req/s in {q['slices']} alternating slices per side; rate ratio of each pair: "
            + ", ".join(f"{x:.0%}" for x in q["slice_rates"])
        )
    if w and w.get("slice_ratios"):
        lines.append(
            f"ws in {w['slices']} alternating slices per side; p99 ratio of each pair: "
            + ", ".join(f"{x:g}x" for x in w["slice_ratios"])
        )
    notes = []
    if f:
        notes.append(f"bulk download beside the probe: {f['bulk_mbps']:.1f} MB/s")
    if b:
        notes.append(f"TLS {b['cipher']} (tunnel) / {b['direct_cipher']} (direct)")
    notes.append(f"{r['cpus']} CPUs, Python {platform.python_version()}")
    lines += [
        "; ".join(notes),
        f"1-min load average before/after: {r['loadavg_before']} / {r['loadavg_after']} "
        "(anything else running on the machine skews every figure)",
    ]
    return "\n".join(lines)


def _toml_value(text: str) -> Any:
    """A TOML value (1048576, "4MiB", true, 1.5); anything else is taken as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _home_setting(value: str) -> tuple[str, str, Any]:
    """TABLE.KEY=VALUE for the daemon's config, e.g. daemon.stream_window=4194304."""
    key, sep, text = value.partition("=")
    table, dot, name = key.strip().partition(".")
    if not sep or not dot or not table or not name:
        raise argparse.ArgumentTypeError(f"expected TABLE.KEY=VALUE, got {value!r}")
    return table, name, _toml_value(text.strip())


def _relay_setting(value: str) -> tuple[str, Any]:
    """KEY=VALUE for the relay's [relay] table, e.g. stream_window=4194304."""
    key, sep, text = value.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key.strip(), _toml_value(text.strip())


def _wan_link(value: str) -> wanfigures.Link:
    try:
        return wanfigures.Link.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _figures(value: str) -> tuple[str, ...]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = sorted(set(names) - set(FIGURES))
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown figure(s) {', '.join(unknown) or '(none given)'}; choose from {FIGURES}"
        )
    return tuple(n for n in FIGURES if n in names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    parser.add_argument("--profile", action="store_true", help="also py-spy the bulk path")
    parser.add_argument(
        "--profile-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "tunneld-bench-profile",
        help="where the raw py-spy stacks go (speedscope.app opens them)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    parser.add_argument(
        "--only",
        type=_figures,
        default=FIGURES,
        metavar="FIGURES",
        help=f"comma-separated subset of {','.join(FIGURES)} (default: all)",
    )
    parser.add_argument(
        "--ws-conns",
        type=int,
        metavar="N",
        help=f"WebSocket connections in flight (default {FULL.ws_conns}; the target is set at 10)",
    )
    parser.add_argument(
        "--home-set",
        type=_home_setting,
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="a daemon config value for every world, e.g. daemon.stream_window=4194304",
    )
    parser.add_argument(
        "--relay-set",
        type=_relay_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a relay config value ([relay] table) for every world",
    )
    parser.add_argument(
        "--wan-link",
        type=_wan_link,
        action="append",
        metavar="RTT_MS/MBIT[/BUFFER_KIB]",
        help="the links of the wan figures (default: 50/100/512 and 100/40/512)",
    )
    parser.add_argument(
        "--no-snitun", action="store_true", help="leave SniTun out (the snitun figure, WAN rows)"
    )
    args = parser.parse_args(argv)
    only: tuple[str, ...] = args.only
    links: tuple[wanfigures.Link, ...] = tuple(args.wan_link or wanfigures.LINKS)

    def configure(world: World) -> None:
        for table, name, value in args.home_set:
            world.home_extra.setdefault(table, {})[name] = value
        world.relay_extra.update(dict(args.relay_set))

    s = QUICK if args.quick else FULL
    if args.ws_conns is not None:
        if args.ws_conns < 1:
            parser.error("--ws-conns must be at least 1")
        s = dataclasses.replace(s, ws_conns=args.ws_conns)
    started = time.monotonic()
    results: dict[str, Any] = {
        "quick": args.quick,
        "only": list(only),
        "cpus": os.cpu_count(),
        "loadavg_before": round(os.getloadavg()[0], 2),
        "home_set": [f"{t}.{k}={v!r}" for t, k, v in args.home_set],
        "relay_set": [f"{k}={v!r}" for k, v in args.relay_set],
    }

    def step(name: str) -> None:
        print(f"[{time.monotonic() - started:5.1f}s] {name}", file=sys.stderr, flush=True)

    loopback = [f for f in only if f not in ("wan", "snitun")]
    snitun_python = ""
    if ("snitun" in only or "wan" in only) and not args.no_snitun:
        step("the SniTun venv")
        snitun_python, why = snitunenv.ensure()
        if not snitun_python:
            print(f"SniTun left out: {why}", file=sys.stderr, flush=True)
            results["snitun_skipped"] = why
    with contextlib.ExitStack() as stack:
        if loopback or args.profile:
            world, clients, sampler = stack.enter_context(
                running("bench", "tunneld-bench-", keep=args.keep, configure=configure)
            )
        if "memory" in only:
            step("memory: idle streams")
            results["memory"] = measure_memory(world, clients, s)
        if "bulk" in only:
            step("bulk download")
            results["bulk"] = measure_bulk(world, clients, sampler, s)
        if "rate" in only:
            step("small requests")
            results["rate"] = measure_rate(world, clients, sampler, s)
        if "ws" in only:
            step("WebSocket echo")
            results["ws"] = measure_ws(world, clients, sampler, s)
        if "fairness" in only:
            step("fairness")
            results["fairness"] = measure_fairness(world, clients, s)
        if args.profile:
            step("profile")
            results["profile"] = run_profile(world, clients, s, args.profile_dir)
    if "snitun" in only and snitun_python:
        step("SniTun beside tunneld and direct TLS")
        results["snitun"] = measure_snitun(snitun_python, args.quick, args.keep, configure)
    if "wan" in only:
        results["wan"] = measure_wan(
            links, args.quick, args.keep, configure, step, snitun_python or ""
        )
    results["seconds"] = round(time.monotonic() - started, 1)
    results["loadavg_after"] = round(os.getloadavg()[0], 2)
    if loopback:
        print(table(results))
    if results.get("snitun"):
        print(("\n" if loopback else "") + snitunfigures.table(results["snitun"]))
    if "wan" in only:
        print(("\n" if loopback else "") + wanfigures.table(results["wan"]))
    if results.get("snitun_skipped"):
        print(f"SniTun left out: {results['snitun_skipped']}")
    print("RESULT " + json.dumps(results, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
