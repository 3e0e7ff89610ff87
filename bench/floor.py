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
import json
import os
import ssl
from pathlib import Path
from typing import Any

import trio

from bench.run import TUNNEL_AND_DIRECT, Clients, Side, interleaved, running
from bench.world import PY, CpuSampler, World, wait_for

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


def start_floor(world: World) -> None:
    """The floor's daemon (TLS with the direct side's certificate), then its relay."""
    to_port = world.app_port
    for kind in ("tls", "raw"):
        port_file = world.root / f"floor-{kind}.port"
        args = [PY, "-m", "bench.floor", "--serve", kind, str(port_file), str(to_port)]
        world.spawn(
            f"floor-{kind}", [*args, str(world.root / "direct.crt"), str(world.root / "direct.key")]
        )
        wait_for(port_file.exists, 20, f"the floor's {kind} port file")
        to_port = int(port_file.read_text().strip())


# -- the measurement -------------------------------------------------------------------
def measure(
    world: World, clients: Clients, sampler: CpuSampler, args: argparse.Namespace
) -> dict[str, Any]:
    floor_port = int((world.root / "floor-raw.port").read_text().strip())
    sides = {
        "floor": Side(False, ("floor-raw", "floor-tls", "app"), {"port": floor_port}),
        **TUNNEL_AND_DIRECT,
    }
    spec = {"mode": "ws", "conns": args.conns, "size": 64, "warmup": 0.5, "path": "/ws/echo"}
    r = interleaved(world, clients, sampler, spec, args.seconds, args.slices, sides)
    out: dict[str, Any] = {"conns": args.conns, "seconds": args.seconds, "slices": args.slices}
    for side in sides:
        if r[f"{side}_errors"]:
            raise RuntimeError(f"{side}: {r[f'{side}_errors']} WebSocket connections failed")
        rate = r[f"{side}_rate"]
        out[side] = {
            "mps": rate,
            "p50_ms": r[f"{side}_p50_ms"],
            "p99_ms": r[f"{side}_p99_ms"],
            # CPU share (cores) over messages per second: CPU seconds per message.
            "cpu_ms_per_message": {
                n: round(1000 * share / rate, 3) for n, share in r[f"{side}_cpu_share"].items()
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
    with running("bench.floor", "tunneld-floor-", setup=start_floor) as (world, clients, sampler):
        result = measure(world, clients, sampler, args)
    result["loadavg"] = round(os.getloadavg()[0], 2)
    print(table(result))
    print("RESULT " + json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
