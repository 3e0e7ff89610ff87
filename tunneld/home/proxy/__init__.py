"""The reverse proxy: `core` (one client connection), `http1` (sans-IO HTTP/1.1),
`http` (header rewriting, error pages), `upstream` (the pool of upstream connections)."""

from tunneld.home.proxy.core import Proxy

__all__ = ["Proxy"]
