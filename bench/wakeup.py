"""What waking another process costs on this machine: `python -m bench.wakeup`.

Two processes ping-pong a 64-byte message over loopback TCP, first both pinned to one
CPU (the baseline: the peer runs when the sender blocks), then on two different CPUs
(each send wakes a sleeping CPU). It prints, per round trip, the wall time and each
side's CPU, and the CPU one send() costs. A tunnel round trip is six such hops
(client, relay, daemon, app, daemon, relay, client) against two for the app alone, so
on a machine where a cross-CPU wake-up is dear, latency under light load is too.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

MESSAGE = b"x" * 64
TIMEOUT = 10.0  # seconds any one wait may take: a dead peer ends the run with an error


def _echo(port: int, cpu: int, rounds: int) -> None:
    os.sched_setaffinity(0, {cpu})
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(rounds):
            data = sock.recv(4096)
            if not data:
                return
            sock.sendall(data)


def measure(cpus: tuple[int, int], rounds: int) -> dict[str, float]:
    """Round trips between a process on cpus[0] and an echo process on cpus[1]."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(TIMEOUT)
        port = listener.getsockname()[1]
        pid = os.fork()
        if pid == 0:  # the echo side
            try:
                _echo(port, cpus[1], rounds)
            finally:
                os._exit(0)
        os.sched_setaffinity(0, {cpus[0]})
        conn, _ = listener.accept()
    with conn:
        conn.settimeout(TIMEOUT)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send_cpu = 0.0
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(rounds):
            before = time.thread_time()
            conn.sendall(MESSAGE)
            send_cpu += time.thread_time() - before
            got = 0
            while got < len(MESSAGE):
                data = conn.recv(4096)
                if not data:
                    raise SystemExit("the echo process went away")
                got += len(data)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    os.waitpid(pid, 0)
    return {
        "round_trip_us": wall / rounds * 1e6,
        "cpu_per_round_trip_us": cpu / rounds * 1e6,
        "cpu_per_send_us": send_cpu / rounds * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wakeup", description=__doc__)
    parser.add_argument("--rounds", type=int, default=20_000)
    args = parser.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    layouts = [("same CPU (baseline)", (cpus[0], cpus[0]))]
    if len(cpus) > 1:
        layouts.append(("two CPUs", (cpus[0], cpus[1])))
    print(f"{'layout':20}  {'round trip':>11}  {'CPU/round trip':>15}  {'CPU/send':>9}")
    for name, pair in layouts:
        try:
            r = measure(pair, args.rounds)
        except OSError as exc:  # a timeout included
            print(f"bench.wakeup: {name}: {exc or type(exc).__name__}", file=sys.stderr)
            return 1
        print(
            f"{name:20}  {r['round_trip_us']:8.1f} us  {r['cpu_per_round_trip_us']:12.1f} us"
            f"  {r['cpu_per_send_us']:6.1f} us"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
