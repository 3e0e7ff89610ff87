"""tunneld beside SniTun 0.47 and direct TLS, on loopback, in one world (issue 16).

The same aiohttp app (bench/aioapp.py) is behind all three: it terminates TLS itself
(direct), it is tunneld's plain-HTTP upstream, and it runs in SniTun's home process,
which terminates TLS on SniTun's channels, as Home Assistant does. So SniTun's home
process holds tunnel, TLS and app; to compare tunnel CPU with tunneld's (relay + daemon,
the daemon terminating TLS), the app's own plain-HTTP CPU for the same work, measured on
the tunneld side in the same run, is subtracted from SniTun's home process (the raw
figure is printed too).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Any

from bench.world import World, rss_kib, wait_for

MIB = 1024 * 1024
GB = 1e9
SIDES = ("direct", "snitun", "tunneld")
HOME = {"direct": "direct", "snitun": "snihome", "tunneld": "home"}


@dataclass(frozen=True)
class SnitunSettings:
    bulk_bytes: int = 256 * MIB
    bulk_runs: int = 3
    rate_conns: int = 50
    rate_seconds: float = 10.0
    rate_slices: int = 4
    mixed_seconds: float = 5.0  # small requests with and without a download beside them
    idle_conns: int = 500


SNITUN_FULL = SnitunSettings()
SNITUN_QUICK = dataclasses.replace(
    SNITUN_FULL, bulk_bytes=64 * MIB, bulk_runs=2, rate_seconds=3.0, rate_slices=2,
    mixed_seconds=3.0, idle_conns=200,
)  # fmt: skip


def sides(world: World) -> dict[str, Any]:
    """interleaved() sides: where each client goes, whose CPU counts."""
    from bench.run import Side  # bench.run imports this module

    return {
        "tunneld": Side(True, ("relay", "home", "app")),
        "snitun": Side(True, ("snitun", "snihome"), world.snitun_target()),
        "direct": Side(False, ("direct",)),
    }


def tunnel_cpu(side: str, cpu: dict[str, float], app: float) -> float:
    """CPU of the tunnel alone: relay + home, less the app's share inside SniTun's home."""
    if side == "tunneld":
        return cpu["relay"] + cpu["home"]
    if side == "snitun":
        return cpu["snitun"] + cpu["snihome"] - app
    return cpu["direct"]


def measure(world: World, clients: Any, sampler: Any, s: SnitunSettings) -> dict[str, Any]:
    from bench.run import interleaved

    sd = sides(world)
    out: dict[str, Any] = {"settings": dataclasses.asdict(s)}

    # Idle client connections first, on fresh processes: RSS growth of the home side's
    # process (later, memory that bulk runs freed would absorb part of the growth).
    for key in SIDES:
        out[f"{key}_kib_per_idle_conn"] = idle_memory(world, clients, key, sd[key], s)

    # One download, alternating sides; CPU per GB of each process over each run.
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in SIDES}
    for i in range(s.bulk_runs):
        for key in SIDES if i % 2 == 0 else SIDES[::-1]:
            spec = {"mode": "download", "size": s.bulk_bytes, **sd[key].spec}
            r = clients.run(sd[key].tunnel, spec, timeout=300)
            r["cpu_seconds"] = sampler.seconds(r["t0"], r["t1"])
            runs[key].append(r)

    def per_gb(key: str, name: str) -> float:
        return statistics.median(r["cpu_seconds"][name] for r in runs[key]) * GB / s.bulk_bytes

    app_per_gb = per_gb("tunneld", "app")
    for key in SIDES:
        out[f"{key}_bulk_mbps"] = round(statistics.median(r["mbps"] for r in runs[key]), 1)
        cpu = {n: per_gb(key, n) for n in sd[key].procs}
        out[f"{key}_bulk_cpu_s_per_gb"] = {n: round(v, 2) for n, v in cpu.items()}
        out[f"{key}_tunnel_s_per_gb"] = round(tunnel_cpu(key, cpu, app_per_gb), 2)
    out["app_plain_s_per_gb"] = round(app_per_gb, 2)
    out["snitun_home_raw_s_per_gb"] = round(
        per_gb("snitun", "snitun") + per_gb("snitun", "snihome"), 2
    )

    # Small GETs over keep-alive connections, the three sides in alternating slices.
    spec = {"mode": "rate", "conns": s.rate_conns, "warmup": 0.5, "path": "/small"}
    r = interleaved(world, clients, sampler, spec, s.rate_seconds, s.rate_slices, sd)
    app_share = r["tunneld_cpu_share"]["app"]
    app_ms = 1000 * app_share / r["tunneld_rate"]
    for key in SIDES:
        rate = r[f"{key}_rate"]
        out[f"{key}_rps"] = rate
        out[f"{key}_rate_p99_ms"] = r[f"{key}_p99_ms"]
        share = r[f"{key}_cpu_share"]
        out[f"{key}_cpu_share"] = share
        app = app_ms * rate / 1000 if key == "snitun" else 0.0  # the app's cores at this rate
        out[f"{key}_tunnel_ms_per_request"] = round(1000 * tunnel_cpu(key, share, app) / rate, 3)
    out["app_plain_ms_per_request"] = round(app_ms, 3)
    raw = r["snitun_cpu_share"]
    out["snitun_home_raw_ms_per_request"] = round(
        1000 * (raw["snitun"] + raw["snihome"]) / r["snitun_rate"], 3
    )

    # Small requests alone, then beside a download on another connection.
    for key in SIDES:
        out.update(mixed(world, clients, key, sd[key], s))
    return out


def mixed(world: World, clients: Any, key: str, side: Any, s: SnitunSettings) -> dict[str, Any]:
    """p99 of `rate_conns` busy connections alone and with a download running beside them,
    and that download's MB/s over (about) their measured window."""
    probe = {
        "mode": "rate",
        "conns": s.rate_conns,
        "duration": s.mixed_seconds,
        "warmup": 1.0,
        "path": "/small",
        "count_unfinished": True,
        **side.spec,
    }
    timeout = s.mixed_seconds + 120
    alone = clients.run(side.tunnel, probe, timeout)
    start_at = time.time() + 0.5
    bulk = clients.start(
        side.tunnel,
        {
            "mode": "stream",
            "size": 8 * 1024**3,
            "start_at": start_at,
            "duration": s.mixed_seconds + 1.5,  # covers the probe's window (after its warmup)
            **side.spec,
        },
    )
    loaded = clients.run(side.tunnel, probe, timeout)
    beside = clients.result(bulk, timeout)
    return {
        f"{key}_p99_ms_alone": round(alone["p99_ms"], 2),
        f"{key}_p99_ms_with_download": round(loaded["p99_ms"], 2),
        f"{key}_p99_ratio": round(loaded["p99_ms"] / alone["p99_ms"], 2),
        f"{key}_rps_with_download": round(loaded["rate"], 1),
        f"{key}_download_mbps_beside_rate": round(beside["mbps"], 1),
    }


def idle_memory(world: World, clients: Any, key: str, side: Any, s: SnitunSettings) -> float:
    pid = world.procs[HOME[key]].pid

    def rss() -> float:
        samples = []
        for _ in range(3):
            samples.append(rss_kib(pid))
            time.sleep(0.2)
        return float(statistics.median(samples))

    before = rss()
    ready = world.root / f"hold-{key}.ready"
    ready.unlink(missing_ok=True)
    spec = {"mode": "hold", "conns": s.idle_conns, "ready_file": str(ready), **side.spec}
    hold = clients.start(side.tunnel, spec)
    wait_for(lambda: ready.exists() or hold.poll() is not None, 240, f"{key} idle conns")
    if not ready.exists():
        clients.result(hold, 5)  # raises with the client's error
    time.sleep(1.5)  # the last handshakes settle at home
    after = rss()
    clients.result(hold, 60)
    time.sleep(1.0)
    return round((after - before) / s.idle_conns, 1)


def _ratio(a: float, b: float) -> str:
    if not b:
        return "-"
    return f"{a / b:.2f}x"


def table(r: dict[str, Any]) -> str:
    rows = [("figure", "direct TLS", "SniTun 0.47", "tunneld", "tunneld/SniTun", "tunneld/direct")]

    def row(label: str, field: str, fmt: str, direct: bool = True) -> None:
        values = {k: r.get(f"{k}_{field}") for k in SIDES}
        d, sn, t = values["direct"], values["snitun"], values["tunneld"]
        rows.append(
            (
                label,
                format(d, fmt) if direct and d is not None else "-",
                format(sn, fmt),
                format(t, fmt),
                _ratio(t, sn),
                _ratio(t, d) if direct and d else "-",
            )
        )

    mib = r["settings"]["bulk_bytes"] // MIB
    conns = r["settings"]["rate_conns"]
    row(f"one {mib} MiB download, MB/s", "bulk_mbps", ".1f")
    row("tunnel CPU per GB (relay + home), s", "tunnel_s_per_gb", ".2f")
    row(f"small GETs over {conns} keep-alive conns, req/s", "rps", ".0f")
    row("tunnel CPU per small request, ms", "tunnel_ms_per_request", ".3f")
    row(f"a download's MB/s while those {conns} conns run", "download_mbps_beside_rate", ".1f")
    row("small p99 ms, alone", "p99_ms_alone", ".2f")
    row("small p99 ms, with a download running", "p99_ms_with_download", ".2f")
    row("small p99, with a download / without", "p99_ratio", ".2f")
    row("KiB per idle client connection at home", "kib_per_idle_conn", ".1f")
    widths = [max(len(x[i]) for x in rows) for i in range(6)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)) for x in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(
        "direct's CPU figures are the whole app (TLS + HTTP); SniTun's have the app's own "
        f"plain-HTTP CPU subtracted ({r['app_plain_s_per_gb']:.2f} s/GB, "
        f"{r['app_plain_ms_per_request']:.3f} ms/request, measured as tunneld's upstream); "
        f"SniTun's server + home unsubtracted: {r['snitun_home_raw_s_per_gb']:.2f} s/GB, "
        f"{r['snitun_home_raw_ms_per_request']:.3f} ms/request"
    )
    for key in SIDES:
        cpu = ", ".join(f"{n} {v:g}" for n, v in r[f"{key}_bulk_cpu_s_per_gb"].items())
        lines.append(f"bulk CPU s per GB, {key}: {cpu}")
    return "\n".join(lines)
