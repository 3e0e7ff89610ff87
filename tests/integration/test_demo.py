"""`tunneld demo --check`: the README's first command works as printed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_demo_check_runs_the_printed_curl() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tunneld", "demo", "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "curl -sS --cacert" in result.stdout
    # It never waits for Ctrl-C, and it ends with one line: what it checked, and its status.
    assert "Press Ctrl-C" not in result.stdout
    *before, body, last = result.stdout.strip().splitlines()
    echoed = json.loads(body)
    assert echoed["path"] == "/headers"
    assert last.startswith("demo check passed: GET https://home.demo.test/headers by curl")
    assert "X-Forwarded-For 127.0.0.1" in last and last.endswith("; exit status 0")
    assert "Traceback" not in result.stderr


def test_demo_stops_cleanly_on_ctrl_c() -> None:
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "tunneld", "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        seen = ""
        while "Press Ctrl-C" not in seen and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
        assert "Press Ctrl-C" in seen, seen
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
