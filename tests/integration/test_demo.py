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
    body = result.stdout.strip().splitlines()[-1]
    echoed = json.loads(body)
    assert echoed["path"] == "/headers"
    assert "Traceback" not in result.stderr
