"""README's first command, run as written by a root shell with no sudo (issue 22).

A fresh Debian has no sudo, and its first user is often root: the command must
work there as it does for a user with sudo. It runs in a copy of the repository
(a fresh `.venv`, a real `pip install -e .`), with `demo --check` in place of
`demo` so that it ends by itself. Slow (a venv and an install): about a minute.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def first_command() -> str:
    """The command under "# 1." in README's first sh block."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.DOTALL)
    assert block is not None, "README has no sh block"
    lines = block.group(1).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# 1."))
    command = next(line for line in lines[start:] if line and not line.startswith("#"))
    return command


def test_the_first_command_does_not_start_with_sudo() -> None:
    command = first_command()
    assert not command.startswith("sudo"), command
    assert not re.search(r"(^|[;&|]\s*)sudo\s", command), command
    assert command.endswith(".venv/bin/tunneld demo"), command


def path_without_sudo(tmp: Path) -> str:
    """PATH as it is, but each folder holding sudo replaced by a copy (symlinks) without it."""
    out = []
    for n, folder in enumerate(os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)):
        if not folder or not (Path(folder) / "sudo").exists():
            out.append(folder)
            continue
        farm = tmp / f"bin{n}"
        farm.mkdir()
        for entry in Path(folder).iterdir():
            if entry.name != "sudo":
                (farm / entry.name).symlink_to(entry.resolve())
        out.append(str(farm))
    return os.pathsep.join(out)


@pytest.mark.skipif(os.geteuid() != 0, reason="as a user, apt-get needs the sudo this test removes")
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="not Debian: no apt-get")
def test_readme_first_command_runs_as_root_without_sudo(tmp_path: Path) -> None:
    command = first_command()
    assert command.endswith(" demo")
    command = command + " --check"  # the demo, run once: ends by itself
    checkout = tmp_path / "tunneld"
    shutil.copytree(
        ROOT,
        checkout,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", "*.egg-info", ".*_cache", "build", "dist"
        ),
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env["PATH"] = path_without_sudo(tmp_path)
    env["DEBIAN_FRONTEND"] = "noninteractive"
    no_sudo = subprocess.run(["sh", "-c", "command -v sudo"], env=env, capture_output=True)
    assert no_sudo.returncode != 0, no_sudo.stdout
    result = subprocess.run(
        ["sh", "-c", command],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("demo check passed:") and last.endswith("exit status 0"), last
    assert (checkout / ".venv" / "bin" / "tunneld").exists()


def setup_blocks() -> list[str]:
    """The sh blocks of README's "Setting it up": install, relay, home."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Setting it up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.DOTALL)


def runnable(block: str, etc: Path, binary: Path) -> str:
    """A README block as a script for this test: the same commands in the same order,
    with /etc and /opt/tunneld in tmp_path, and without what needs a real system (users,
    groups, systemd)."""
    out = ["set -eu"]
    text = block.replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split("  #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("useradd ", "cp systemd/", "chgrp ")):
            continue
        if " doctor " in line:
            continue  # needs the running processes: tests/integration/test_doctor.py
        if " token issue " in line and line.endswith(" --join"):
            line += " > join.txt"  # the line the user copies
        if " join - " in line:
            # pasted on stdin; the names resolve to a closed port here, so doctor is quick
            line += " --resolve relay.example.com:127.0.0.1 --resolve home.example.com:127.0.0.1"
            line += " < join.txt"
        line = line.replace("/opt/tunneld/bin/tunneld", str(binary))
        line = line.replace("/etc/", f"{etc}/")
        line = re.sub(r" -g tunneld(-relay)?\b", "", line)
        line = line.replace("chgrp tunneld-relay ", ": ")
        out.append(line)
    return "\n".join(out) + "\n"


def test_setting_it_up_runs_in_the_order_given(tmp_path: Path) -> None:
    from tunneld.pki import (
        generate_private_key,
        issue_certificate,
        make_ca,
        write_certificate,
        write_private_key,
    )
    from tunneld.tokens import decode_claims_unverified

    install, relay, home = setup_blocks()
    assert "/opt/tunneld/bin/pip install ." in install and "ln -sf" in install
    for block in (relay, home):
        calls = re.findall(
            r"(?:^|[\s;&])((?:\S*/)?tunneld) "
            r"(?:init|keygen|token issue|check-config|status|join|doctor)\b",
            block,
        )
        assert calls and set(calls) == {"/opt/tunneld/bin/tunneld"}, calls
    assert "useradd --system" in relay and "tunneld-relay" in relay
    order = [
        relay.index(s)
        for s in (
            "init --role relay",
            "keygen",
            'token_private_key = "token.key"',
            "tunneld doctor",
            "tunneld token issue",
        )
    ]
    assert order == sorted(order), order

    binary = Path(sys.executable).parent / "tunneld"  # this environment's console script
    assert binary.exists(), binary
    etc = tmp_path / "etc"
    etc.mkdir()
    ca_key, ca_pem = make_ca("test CA")
    key = generate_private_key()
    write_certificate(
        issue_certificate(ca_key, ca_pem, key, ["relay.example.com"]), tmp_path / "fullchain.pem"
    )
    write_private_key(key, tmp_path / "privkey.pem")

    script = runnable(relay, etc, binary)
    result = subprocess.run(
        ["sh", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, (script, result.stdout, result.stderr)
    joined = (tmp_path / "join.txt").read_text().strip()
    assert joined.startswith("tunneld join tunneld1.") and joined.endswith("@relay.example.com")
    claims = decode_claims_unverified(joined.split()[2].rsplit("@", 1)[0])
    assert claims.hostnames == ("home.example.com",)

    lines = [line for line in runnable(home, etc, binary).splitlines() if " status " not in line]
    result = subprocess.run(
        ["sh", "-c", "\n".join(lines)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, (lines, result.stdout, result.stderr)
    assert "valid home daemon config" in result.stdout and "warning" not in result.stderr
    assert "agree_tos = true" in (etc / "tunneld" / "tunneld.toml").read_text()
    assert (etc / "tunneld" / "token").read_text().strip() == joined.split()[2].rsplit("@", 1)[0]
    assert "next: `systemctl enable --now tunneld`" in result.stdout
