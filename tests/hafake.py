"""An upstream that treats forwarded headers as Home Assistant's http integration does.

Home Assistant answers 400 to a request carrying X-Forwarded-For when
`use_x_forwarded_for` is off, and when the connecting peer is not in
`trusted_proxies`. Here `--trusted-file F` plays configuration.yaml: its lines are the
trusted proxies (read on every request, so a test "fixes" it by writing the file); an
empty or missing file = `use_x_forwarded_for: false`. Otherwise 200, with the client
address it believes in the body (`client <ip>`).

    python -m tests.hafake --port-file F --trusted-file T
"""

from __future__ import annotations

import argparse
import ipaddress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--trusted-file", type=Path, required=True)
    args = parser.parse_args()

    def trusted() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        try:
            text = args.trusted_file.read_text()
        except FileNotFoundError:
            return []
        return [ipaddress.ip_network(line.strip()) for line in text.splitlines() if line.strip()]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            peer = ipaddress.ip_address(self.client_address[0])
            forwarded = self.headers.get_all("X-Forwarded-For") or []
            if forwarded and not any(peer in net for net in trusted()):
                self._answer(400, b"400: Bad Request")
                return
            client = forwarded[-1].split(",")[-1].strip() if forwarded else str(peer)
            self._answer(200, f"client {client}\n".encode())

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    tmp = args.port_file.with_suffix(".tmp")
    tmp.write_text(str(server.server_address[1]))
    tmp.rename(args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
