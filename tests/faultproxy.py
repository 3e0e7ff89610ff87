"""A TCP proxy that injects faults between the daemon and the relay (tests only).

`python -m tests.faultproxy --target HOST:PORT --port-file F [--control-port-file C]`
forwards every connection to the target.

With `--control-port-file`, a second loopback port (written to C) takes one
command per line and answers one line (`ok ...` or `error ...`):

    pass            forward freely (no delay, no throttle, not stalled)
    delay MS        hold every chunk MS milliseconds (a delay line: latency, not a rate cap)
    throttle BPS    at most BPS bytes per second each way (0: unlimited)
    stall           blackhole: nothing forwarded, nothing closed (new connections too)
    resume          end a stall, keeping delay and throttle
    cut             end every open connection cleanly both ways (FIN, no reset)
    reset           end every open connection with a TCP reset (RST)
    status          `ok delay=MS throttle=BPS stalled=0|1 conns=N`

Modes apply to open and new connections; cut and reset act once on the open
ones. Signals still work for older callers: SIGUSR1 stalls, SIGUSR2 resumes,
SIGHUP resets every open connection, SIGTERM exits.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from tunneld.transport.splice import STREAM_ERRORS, abort_socket, aclose_quietly

CHUNK = 65536
QUEUED_CHUNKS = 8  # per direction: bounds what a stalled or delayed link holds
FIN_GRACE = 5.0  # a cut waits this long for both peers to close after our FIN


@dataclass(eq=False)  # identity: kept in a set
class Conn:
    """One proxied connection: its two sockets and what ends it."""

    client: trio.SocketStream
    upstream: trio.SocketStream
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    fate: str = ""  # "cut" or "reset" once the control channel ends it


class FaultProxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.delay = 0.0  # seconds
        self.rate = 0.0  # bytes/s per direction; 0 = unlimited
        self.flowing = trio.Event()
        self.flowing.set()
        self.conns: set[Conn] = set()

    # -- data path -----------------------------------------------------------
    async def pump(self, conn: Conn, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        """src -> dst through a bounded delay line: a reader stamps chunks on arrival,
        a writer releases them after the delay, at the throttled rate, unless stalled.
        A peer that breaks (reset) is passed on as a reset to the other peer."""
        send, receive = trio.open_memory_channel[tuple[float, bytes]](QUEUED_CHUNKS)

        def broken() -> None:
            conn.fate = conn.fate or "reset"
            conn.scope.cancel()

        async def reader() -> None:
            async with send:
                try:
                    while data := await src.receive_some(CHUNK):
                        await send.send((trio.current_time(), data))
                except STREAM_ERRORS:
                    broken()

        async def writer() -> None:
            next_send = 0.0  # token bucket: when the throttle lets the next byte go
            try:
                async with receive:
                    async for stamp, data in receive:
                        # Read the delay now, so lowering it releases what is queued.
                        await trio.sleep_until(stamp + self.delay)
                        view = memoryview(data)
                        while view:
                            await self.flowing.wait()
                            piece = view
                            if self.rate:
                                # Small pieces keep a throttled stream smooth.
                                piece = view[: max(1, int(self.rate / 20))]
                                await trio.sleep_until(next_send)
                                now = trio.current_time()
                                next_send = max(next_send, now) + len(piece) / self.rate
                            await dst.send_all(piece)
                            view = view[len(piece) :]
                await dst.send_eof()
            except STREAM_ERRORS:
                broken()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(writer)

    async def handle(self, client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream(*self.target)
        except OSError:
            await aclose_quietly(client)
            return
        conn = Conn(client, upstream)
        self.conns.add(conn)
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.pump, conn, client, upstream)
                    nursery.start_soon(self.pump, conn, upstream, client)
            if conn.fate == "cut":
                await self._close_cleanly(conn)
        finally:
            self.conns.discard(conn)
            for sock in (client, upstream):
                if conn.fate == "reset":
                    abort_socket(sock)
                await aclose_quietly(sock)

    async def _close_cleanly(self, conn: Conn) -> None:
        """FIN to both peers, then read and drop until they close too: closing with
        unread bytes would make the kernel send RST, and this fault is the clean one."""

        async def fin(sock: trio.SocketStream) -> None:
            try:
                await sock.send_eof()
                while await sock.receive_some(CHUNK):
                    pass
            except STREAM_ERRORS:
                pass

        with trio.move_on_after(FIN_GRACE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fin, conn.client)
                nursery.start_soon(fin, conn.upstream)

    def end_all(self, fate: str) -> int:
        conns = list(self.conns)
        for conn in conns:
            conn.fate = fate
            conn.scope.cancel()
        return len(conns)

    # -- control ---------------------------------------------------------------
    def stall(self) -> None:
        if self.flowing.is_set():
            self.flowing = trio.Event()

    def command(self, line: str) -> str:
        """Apply one control command; returns the answer line."""
        words = line.split()
        if not words:
            return "error empty command"
        name, args = words[0].lower(), words[1:]
        try:
            if name in ("delay", "throttle"):
                if len(args) != 1:
                    return f"error {name} takes one number"
                value = float(args[0])
                if not math.isfinite(value) or value < 0:
                    return f"error {name} must be >= 0"
                if name == "delay":
                    self.delay = value / 1000
                else:
                    self.rate = value
            elif args:
                return f"error {name} takes no argument"
            elif name == "pass":
                self.delay, self.rate = 0.0, 0.0
                self.flowing.set()
            elif name == "stall":
                self.stall()
            elif name == "resume":
                self.flowing.set()
            elif name in ("cut", "reset"):
                return f"ok {name} {self.end_all(name)}"
            elif name != "status":
                return f"error unknown command {name!r}"
        except ValueError:
            return f"error {name} takes a number"
        return (
            f"ok delay={self.delay * 1000:g} throttle={self.rate:g}"
            f" stalled={int(not self.flowing.is_set())} conns={len(self.conns)}"
        )

    async def serve_control(self, stream: trio.SocketStream) -> None:
        buffer = b""
        try:
            while data := await stream.receive_some(4096):
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    answer = self.command(line.decode("ascii", "replace"))
                    await stream.send_all(answer.encode() + b"\n")
                if len(buffer) > 4096:
                    return
        except STREAM_ERRORS:
            pass
        finally:
            await aclose_quietly(stream)

    async def signals(self) -> None:
        with trio.open_signal_receiver(
            signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGTERM
        ) as received:
            async for signum in received:
                if signum == signal.SIGUSR1:
                    self.stall()
                elif signum == signal.SIGUSR2:
                    self.flowing.set()
                elif signum == signal.SIGHUP:
                    self.end_all("reset")
                else:
                    return


async def _listen(
    nursery: trio.Nursery,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    port_file: str,
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    bound = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, handler, listeners)
    # Written last and atomically: a reader that sees the file can connect.
    tmp = trio.Path(port_file + ".tmp")
    await tmp.write_text(str(bound))
    await tmp.replace(port_file)


async def main(target: str, port_file: str, control_port_file: str | None = None) -> None:
    host, port = target.rsplit(":", 1)
    proxy = FaultProxy(host, int(port))
    async with trio.open_nursery() as nursery:
        if control_port_file:
            await _listen(nursery, proxy.serve_control, control_port_file)
        await _listen(nursery, proxy.handle, port_file)
        await proxy.signals()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--control-port-file")
    args = parser.parse_args()
    trio.run(main, args.target, args.port_file, args.control_port_file)
    sys.exit(0)
