"""How far tunneld is from the least a trio relay and daemon can cost: `python -m bench.floor`.

The floor is the tunnel's shape with everything else taken out: a "relay" process that
splices each client TCP connection to a TCP connection of its own to a "daemon"
process, which terminates TLS with `trio.SSLStream` and splices to the demo app. No
mux, no session TLS, no HTTP, no limits: two pump tasks per connection, what a plain
trio program would do. The WebSocket echo of `bench.run` is measured through the
floor, through tunneld and direct, in alternating slices, each side beside direct.

Where tunneld is near the floor, the rest of its gap to direct is the shape itself: six
process hops instead of two, and four busy processes on this machine's cores instead
of two (`python -m bench.wakeup` shows what a hop costs here).
"""

from __future__ import annotations

import argparse
import array
import json
import os
import shutil
import ssl
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

from bench.run import Clients, sanity
from bench.world import PY, CpuSampler, World, raise_nofile, wait_for

SIDES = ("floor", "tunnel", "direct")
CHUNK = 64 * 1024


# -- the floor's two processes ---------------------------------------------------------
async def _pump(src: trio.abc.Stream, dst: trio.abc.Stream, done: trio.CancelScope) -> None:
    try:
        while data := await src.receive_some(CHUNK):
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    done.cancel()  # either direction ending ends the connection, as a splice would


async def _serve(port_file: Path, to_port: int, tls: ssl.SSLContext | None) -> None:
    async def handle(client: trio.SocketStream) -> None:
        stream: trio.abc.Stream = client
        if tls is not None:
            stream = trio.SSLStream(client, tls, server_side=True)
        try:
            with trio.fail_after(10):
                upstream = await trio.open_tcp_stream("127.0.0.1", to_port)
        except (OSError, trio.TooSlowError):
            await client.aclose()
            return
        async with upstream, stream, trio.open_nursery() as nursery:
            nursery.start_soon(_pump, stream, upstream, nursery.cancel_scope)
            nursery.start_soon(_pump, upstream, stream, nursery.cancel_scope)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await trio.Path(port_file).write_text(str(listeners[0].socket.getsockname()[1]))
    await trio.serve_listeners(handle, listeners)


def serve(kind: str, port_file: Path, to_port: int, cert: str, key: str) -> None:
    tls = None
    if kind == "tls":
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key)
        tls.set_alpn_protocols(["http/1.1"])
    trio.run(_serve, port_file, to_port, tls)


def start_floor(world: World) -> int:
    """The floor's daemon (TLS with the direct side's certificate) and relay; its port."""
    to_port = world.app_port
    for kind in ("tls", "raw"):
        port_file = world.root / f"floor-{kind}.port"
        args = [PY, "-m", "bench.floor", "--serve", kind, str(port_file), str(to_port)]
        world.spawn(
            f"floor-{kind}", [*args, str(world.root / "direct.crt"), str(world.root / "direct.key")]
        )
        wait_for(port_file.exists, 20, f"the floor's {kind} port file")
        to_port = int(port_file.read_text().strip())
    return to_port


# -- the measurement -------------------------------------------------------------------
def measure(
    world: World, clients: Clients, sampler: CpuSampler, floor_port: int, args: argparse.Namespace
) -> dict[str, Any]:
    spec = {"mode": "ws", "conns": args.conns, "size": 64, "warmup": 0.5, "path": "/ws/echo"}
    spec["duration"] = args.seconds / args.slices
    timeout = float(spec["duration"]) + 120
    procs = {
        "floor": ("floor-raw", "floor-tls", "app"),
        "tunnel": ("relay", "home", "app"),
        "direct": ("direct",),
    }
    pooled: dict[str, list[float]] = {side: [] for side in SIDES}
    walls = dict.fromkeys(SIDES, 0.0)
    cpu: dict[str, dict[str, float]] = {
        side: dict.fromkeys((*procs[side], "client"), 0.0) for side in SIDES
    }
    for i in range(args.slices):
        for side in SIDES if i % 2 == 0 else SIDES[::-1]:
            latency_file = world.root / f"latencies-{side}-{i}"
            extra: dict[str, Any] = {"port": floor_port} if side == "floor" else {}
            r = clients.run(
                side == "tunnel", {**spec, **extra, "latency_file": str(latency_file)}, timeout
            )
            pooled[side] += array.array("d", latency_file.read_bytes())
            latency_file.unlink()
            if r["errors"]:
                raise RuntimeError(f"{side}: {r['errors']} WebSocket connections failed")
            walls[side] += r["seconds"]
            for name, busy in sampler.seconds(r["t0"], r["t1"]).items():
                if name in cpu[side]:
                    cpu[side][name] += busy
            cpu[side]["client"] += r["cpu"]  # CPU seconds of the client process
    out: dict[str, Any] = {"conns": args.conns, "seconds": args.seconds, "slices": args.slices}
    for side in SIDES:
        lat = sorted(pooled[side])
        out[side] = {
            "mps": round(len(lat) / walls[side], 1),
            "p50_ms": round(1000 * lat[len(lat) // 2], 2),
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2),
            "cpu_ms_per_message": {
                n: round(1000 * busy / len(lat), 3) for n, busy in cpu[side].items()
            },
        }
    for side in ("floor", "tunnel"):
        out[side]["p99_vs_direct"] = round(out[side]["p99_ms"] / out["direct"]["p99_ms"], 2)
    return out


def table(r: dict[str, Any]) -> str:
    lines = [f"WebSocket echo, {r['conns']} connections, 64 B, {r['slices']} slices per side"]
    lines.append(
        f"{'side':8}{'msg/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'p99/direct':>12}  CPU ms per message"
    )
    for side in SIDES:
        s = r[side]
        ratio = f"{s['p99_vs_direct']:.2f}x" if "p99_vs_direct" in s else ""
        cpu = ", ".join(f"{n} {v:.3f}" for n, v in s["cpu_ms_per_message"].items())
        lines.append(
            f"{side:8}{s['mps']:>8.0f}{s['p50_ms']:>9.2f}{s['p99_ms']:>9.2f}{ratio:>12}  {cpu}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--conns", type=int, default=10, help="WebSocket connections (default 10)")
    parser.add_argument("--seconds", type=float, default=7.5, help="measured seconds per side")
    parser.add_argument("--slices", type=int, default=3, help="alternating slices per side")
    parser.add_argument("--serve", nargs=5, metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        kind, port_file, to_port, cert, key = args.serve
        serve(kind, Path(port_file), int(to_port), cert, key)
        return 0
    if args.conns < 1 or args.slices < 1 or args.seconds <= 0:
        parser.error("--conns and --slices must be at least 1 and --seconds positive")
    raise_nofile()
    root = Path(tempfile.mkdtemp(prefix="tunneld-floor-"))
    world = World(root)
    clients = Clients(world)
    sampler: CpuSampler | None = None
    try:
        world.start_all()
        sanity(world)
        floor_port = start_floor(world)
        sampler = CpuSampler(world.pids())
        sampler.start()
        result = measure(world, clients, sampler, floor_port, args)
        world.check_alive()
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"bench.floor failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if sampler is not None:
            sampler.stop()
        clients.stop_all()
        world.stop_all()
        shutil.rmtree(root, ignore_errors=True)
    result["loadavg"] = round(os.getloadavg()[0], 2)
    print(table(result))
    print("RESULT " + json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
