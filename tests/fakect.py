"""A local fake of crt.sh's search API, for the CT watch's tests (docs/ct-watch.md).

    python -m tests.fakect --certs certs.json --port-file port

`certs.json` is re-read on every request, so a test adds a certificate while the
server runs: a list of {"id": int, "pem": str} (the names are the certificate's
DNS SANs). Answers:

    GET /?q=NAME&output=json[&exclude=expired]  -> crt.sh's JSON list
    GET /?d=ID                                  -> the certificate, PEM

Every request is appended to `requests.log` beside certs.json.
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509


def entries(certs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    out = []
    for item in certs:
        cert = x509.load_pem_x509_certificate(item["pem"].encode())
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            names = sans.value.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            names = []
        if name.lower() not in [n.lower() for n in names]:
            continue
        out.append(
            {
                "issuer_ca_id": 1,
                "issuer_name": cert.issuer.rfc4514_string(),
                "common_name": names[0] if names else "",
                "name_value": "\n".join(names),
                "id": item["id"],
                "entry_timestamp": cert.not_valid_before_utc.isoformat(),
                "not_before": cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%S"),
                "not_after": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%S"),
                "serial_number": format(cert.serial_number, "040x"),
                "result_count": 1,
            }
        )
    return out


def serve(certs_file: Path, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    log_file = certs_file.parent / "requests.log"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            with log_file.open("a") as out:
                out.write(self.path + "\n")
            query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
            certs = json.loads(certs_file.read_text()) if certs_file.exists() else []
            if "d" in query:
                found = [c for c in certs if str(c["id"]) == query["d"]]
                if not found:
                    return self._answer(404, b"not found", "text/plain")
                return self._answer(200, found[0]["pem"].encode(), "application/x-pem-file")
            if query.get("output") == "json" and "q" in query:
                body = json.dumps(entries(certs, query["q"])).encode()
                return self._answer(200, body, "application/json")
            return self._answer(400, b"bad request", "text/plain")

        def _answer(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--certs", type=Path, required=True)
    parser.add_argument("--port-file", type=Path, required=True)
    args = parser.parse_args()
    server = serve(args.certs)
    tmp = args.port_file.with_suffix(".tmp")
    tmp.write_text(str(server.server_address[1]))
    tmp.replace(args.port_file)
    threading.Event().wait()


if __name__ == "__main__":
    main()
