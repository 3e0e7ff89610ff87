"""A TCP proxy that injects faults between the daemon and the relay (tests only).

`python -m tests.faultproxy --target HOST:PORT --port-file F` forwards every
connection to the target. Signals switch faults at run time:
SIGUSR1 stalls all traffic (blackhole: nothing forwarded, nothing closed),
SIGUSR2 resumes it; SIGHUP cuts every open connection with a TCP reset.
"""

from __future__ import annotations

import argparse
import signal
import sys

import trio

from tunneld.transport.splice import abort_socket, aclose_quietly


class FaultProxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.flowing = trio.Event()
        self.flowing.set()
        self.conns: set[trio.SocketStream] = set()

    async def pump(self, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        try:
            while data := await src.receive_some(65536):
                while not self.flowing.is_set():
                    await self.flowing.wait()
                await dst.send_all(data)
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def handle(self, client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream(*self.target)
        except OSError:
            await aclose_quietly(client)
            return
        self.conns |= {client, upstream}
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.pump, client, upstream)
                nursery.start_soon(self.pump, upstream, client)
        finally:
            self.conns -= {client, upstream}
            await aclose_quietly(client)
            await aclose_quietly(upstream)

    async def cut_all(self) -> None:
        for conn in list(self.conns):
            abort_socket(conn)
            await aclose_quietly(conn)

    async def signals(self) -> None:
        with trio.open_signal_receiver(
            signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGTERM
        ) as received:
            async for signum in received:
                if signum == signal.SIGUSR1:
                    self.flowing = trio.Event()
                elif signum == signal.SIGUSR2:
                    self.flowing.set()
                elif signum == signal.SIGHUP:
                    await self.cut_all()
                else:
                    return


async def main(target: str, port_file: str) -> None:
    host, port = target.rsplit(":", 1)
    proxy = FaultProxy(host, int(port))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    bound = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, proxy.handle, listeners)
        tmp = trio.Path(port_file + ".tmp")
        await tmp.write_text(str(bound))
        await tmp.replace(port_file)
        await proxy.signals()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--port-file", required=True)
    args = parser.parse_args()
    trio.run(main, args.target, args.port_file)
    sys.exit(0)
