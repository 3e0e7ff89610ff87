"""A/B of two code trees in the same run: `python -m bench.ab BASE [--rounds N] [--seconds S]
[--only rate,ws,bulk]`.

BASE is a directory holding another copy of the `tunneld` package (for instance
`git archive HEAD tunneld | tar -x -C /tmp/base`). Two complete worlds start side by side
(bench/world.py): A imports tunneld from BASE, B from this checkout. Short runs of each
figure alternate between them (ABBA...), and the medians are printed with each process's
CPU per operation, read from /proc like the main benchmark. On a machine whose speed
drifts by a third between minutes, only such same-run comparisons show a 5% change.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.run import REPO, Clients, running
from bench.world import CpuSampler, World

MIB = 1024 * 1024
SPECS: dict[str, dict[str, Any]] = {
    "rate": {"mode": "rate", "conns": 50, "warmup": 0.5, "path": "/small"},
    "ws": {"mode": "ws", "conns": 10, "size": 64, "warmup": 0.5, "path": "/ws/echo"},
    # Repeated 16 MiB GETs on one connection for the round's seconds; an "op" is a MiB.
    "bulk": {"mode": "download", "size": 16 * MIB},
}
COLUMNS = ("ops/s", "p99 ms", "home ms/op", "relay ms/op", "app ms/op", "cores busy")


def measure(
    world: World, clients: Clients, sampler: CpuSampler, spec: dict[str, Any]
) -> tuple[float, ...]:
    r = clients.run(True, spec, timeout=float(spec["duration"]) + 60)
    if spec["mode"] == "download":  # no latencies: MiB/s and CPU per MiB
        r["rate"], r["p99_ms"] = r["mbps"] * 1e6 / MIB, 0.0
    share = sampler.share(r["t0"], r["t1"])
    per_op = {name: 1000 * share[name] / r["rate"] for name in ("home", "relay", "app")}
    busy = sum(share[n] for n in ("home", "relay", "app")) + r["cpu"] / r["seconds"]
    return (r["rate"], r["p99_ms"], per_op["home"], per_op["relay"], per_op["app"], busy)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    parser.add_argument("base", type=Path, help="directory with the baseline tunneld package")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--only", default="rate,ws", help="figures: rate,ws,bulk")
    args = parser.parse_args(argv)
    if not (args.base / "tunneld" / "__init__.py").exists():
        parser.error(f"{args.base} holds no tunneld package")
    figures = [f for f in args.only.split(",") if f]
    unknown = set(figures) - set(SPECS)
    if unknown:
        parser.error(f"unknown figure(s): {', '.join(sorted(unknown))}")
    worlds: dict[str, tuple[World, Clients, CpuSampler]] = {}
    rows: dict[tuple[str, str], list[tuple[float, ...]]] = {}
    base = args.base.resolve()
    # `python -m tunneld` looks in the working directory first: run the worlds from
    # one without a tunneld package, so PYTHONPATH alone decides which code runs.
    os.chdir(tempfile.mkdtemp(prefix="tunneld-ab-"))
    with contextlib.ExitStack() as stack:
        for name, path in (("A", base), ("B", REPO)):
            os.environ["PYTHONPATH"] = str(path)
            worlds[name] = stack.enter_context(running("bench.ab", f"tunneld-ab-{name}-"))
        os.environ.pop("PYTHONPATH", None)
        for i in range(args.rounds):
            for figure in figures:
                spec = {**SPECS[figure], "duration": args.seconds}
                for name in "AB" if i % 2 == 0 else "BA":
                    row = measure(*worlds[name], spec)
                    rows.setdefault((figure, name), []).append(row)
                    print(f"{figure:4} {name} " + "  ".join(f"{v:8.3f}" for v in row), flush=True)
        print(f"\nmedians of {args.rounds} ({', '.join(COLUMNS)}):")
        for figure in figures:
            for name in "AB":
                med = [statistics.median(col) for col in zip(*rows[(figure, name)], strict=True)]
                print(f"{figure:4} {name} " + "  ".join(f"{v:8.3f}" for v in med))
    return 0


if __name__ == "__main__":
    sys.exit(main())
