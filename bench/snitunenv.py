"""The Python 3.13 venv that runs SniTun for the comparison figures, made on first use.

`snitun==0.47.0` needs Python 3.13. The venv goes in bench/.snitun-venv (gitignored; or
$TUNNELD_BENCH_SNITUN_VENV), from $TUNNELD_BENCH_PYTHON313, pyenv's 3.13.0 or
`python3.13` on PATH. If it cannot be made, `ensure` says why and the bench goes on
without SniTun.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

BENCH = Path(__file__).resolve().parent
PACKAGES = ("snitun==0.47.0", "aiohttp")
PYENV_313 = Path.home() / ".pyenv" / "versions" / "3.13.0" / "bin" / "python3.13"


def venv_dir() -> Path:
    return Path(os.environ.get("TUNNELD_BENCH_SNITUN_VENV", BENCH / ".snitun-venv"))


def find_python313() -> str | None:
    on_path = shutil.which("python3.13")
    for candidate in (
        os.environ.get("TUNNELD_BENCH_PYTHON313"),
        str(PYENV_313) if PYENV_313.exists() else None,
        on_path if on_path and "/shims/" not in on_path else None,  # a pyenv shim may refuse
    ):
        if candidate:
            return candidate
    return None


def ensure() -> tuple[str | None, str]:
    """(the venv's python, "") once it has snitun and aiohttp, else (None, why not)."""
    root = venv_dir()
    python = root / "bin" / "python"
    marker = root / "installed.txt"  # written last: a half-made venv is made again
    if marker.exists() and marker.read_text().split() == list(PACKAGES) and python.exists():
        return str(python), ""
    base = find_python313()
    if base is None:
        return None, "no Python 3.13 (set TUNNELD_BENCH_PYTHON313, or pyenv install 3.13.0)"
    shutil.rmtree(root, ignore_errors=True)
    steps = (
        [base, "-m", "venv", str(root)],
        [str(python), "-m", "pip", "install", "-q", *PACKAGES],
    )
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"{' '.join(step[:3])}: {exc}"
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            return None, f"{' '.join(step[:4])} failed: {tail}"
    marker.write_text("\n".join(PACKAGES) + "\n")
    return str(python), ""
