"""Logging: one line per event on stderr, level and component first."""

from __future__ import annotations

import logging
import sys

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    # journald adds the time; a terminal user can still read the order.
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("tunneld")
    root.handlers[:] = [handler]
    root.setLevel(LEVELS.get(level, logging.INFO))
    root.propagate = False
