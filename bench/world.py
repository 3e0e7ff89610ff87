"""The processes under test, all real and on loopback, all on port 0.

`tunneld relay` + `tunneld run` in front of the demo app (plain HTTP), and the
baseline: a second demo app terminating TLS itself with an equivalent P-256
certificate. Only the command line, the config files and `tunneld status` are
used: the tunnel is a black box. Every wait is bounded; `stop_all` ends
everything that was started.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from tunneld.pki import (
    generate_private_key,
    issue_certificate,
    make_ca,
    write_certificate,
    write_private_key,
)

PY = sys.executable
AIOAPP = Path(__file__).resolve().parent / "aioapp.py"
RELAY_HOST = "relay.bench.test"
HOME_HOST = "home.bench.test"
# Client source addresses: per-IP limits are part of the product, not of the benchmark.
SOURCES = tuple(f"127.0.0.{i}" for i in range(2, 41))
MAX_STREAMS = 4000
CLK_TCK = os.sysconf("SC_CLK_TCK")

T = TypeVar("T")


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def raise_nofile() -> None:
    """Open-file limit to the hard limit (1,000 idle streams need a few thousand fds)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_ticks(pid: int) -> int:
    # Fields after the ")" of the command name: utime and stime are the 12th and 13th.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


class CpuSampler:
    """Samples the CPU ticks of some processes every `interval` on a thread, so the CPU
    share of each over any window a client reports (wall-clock t0..t1) can be read later."""

    def __init__(self, pids: dict[str, int], interval: float = 0.1) -> None:
        self.pids = pids
        self.interval = interval
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            ticks: dict[str, int] = {}
            for name, pid in self.pids.items():
                try:
                    ticks[name] = cpu_ticks(pid)
                except OSError:
                    pass
            self.samples.append((time.time(), ticks))
            self._stop.wait(self.interval)

    def _at(self, name: str, t: float) -> float:
        points = [(ts, ticks[name]) for ts, ticks in self.samples if name in ticks]
        if not points:
            return 0.0
        prev = points[0]
        for point in points:
            if point[0] >= t:
                span = point[0] - prev[0]
                if span <= 0:
                    return float(point[1])
                return prev[1] + (point[1] - prev[1]) * (t - prev[0]) / span
            prev = point
        return float(points[-1][1])

    def share(self, t0: float, t1: float) -> dict[str, float]:
        """Per process: CPU seconds used per wall second over t0..t1 (1.0 = one core)."""
        wall = max(t1 - t0, 1e-9)
        return {
            name: (self._at(name, t1) - self._at(name, t0)) / CLK_TCK / wall for name in self.pids
        }

    def seconds(self, t0: float, t1: float) -> dict[str, float]:
        return {name: share * (t1 - t0) for name, share in self.share(t0, t1).items()}


@dataclass
class World:
    root: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    relay_port: int = 0
    app_port: int = 0
    direct_port: int = 0
    # Extra daemon config, {"table": {"key": value}}, for experiments (the bench uses defaults).
    home_extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    relay_extra: dict[str, Any] = field(default_factory=dict)
    # bench.wan arguments (delay, rate, buffer): the daemon then reaches the relay
    # through that emulated link instead of straight over loopback.
    wan: tuple[str, ...] = ()
    wan_port: int = 0
    # The SniTun venv's python (bench/snitunenv.py): then the app behind tunneld and the
    # direct baseline are bench/aioapp.py's aiohttp app, the one SniTun serves.
    aiohttp_python: str = ""
    snitun_port: int = 0

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        ca_key, ca_pem = make_ca("tunneld bench CA")
        self.ca_file = self.root / "ca.pem"
        write_certificate(ca_pem, self.ca_file)
        for name, host in (("relay", RELAY_HOST), ("direct", HOME_HOST)):
            key = generate_private_key("ec256")  # the same key type as the daemon's bootstrap
            write_private_key(key, self.root / f"{name}.key")
            write_certificate(
                issue_certificate(ca_key, ca_pem, key, [host]), self.root / f"{name}.crt"
            )
        self.relay_config = self.root / "relay.toml"
        self.home_config = self.root / "tunneld.toml"
        self.home_cert = self.root / "state" / "certificate.pem"

    # -- processes ---------------------------------------------------------------
    def spawn(self, name: str, args: list[str]) -> Proc:
        log_path = self.root / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                args,
                cwd=Path(__file__).resolve().parent.parent,  # bench.* runs as modules too
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=raise_nofile,  # servers start before the sampler thread exists
            )
        proc = Proc(name, popen, log_path)
        self.procs[name] = proc
        return proc

    def tunneld(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PY, "-m", "tunneld", *args], capture_output=True, text=True, timeout=timeout
        )

    def status(self, config: Path, proc: Proc) -> dict[str, Any] | None:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
        result = self.tunneld("status", "-c", str(config), "--json", timeout=15)
        try:
            value = json.loads(result.stdout)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def home_status(self) -> dict[str, Any]:
        return self.status(self.home_config, self.procs["home"]) or {}

    def start_app(self, name: str, *tls: str) -> int:
        port_file = self.root / f"{name}.port"
        if self.aiohttp_python:
            role = ["direct", "--cert", tls[1], "--key", tls[3]] if tls else ["plain"]
            self.spawn(
                name, [self.aiohttp_python, str(AIOAPP), *role, "--port-file", str(port_file)]
            )
        else:
            self.spawn(
                name,
                [PY, "-m", "tunneld.demoapp", "--host", "127.0.0.1", "--port", "0"]
                + ["--port-file", str(port_file), *tls],
            )
        wait_for(lambda: self.started(name, port_file), 20, f"{name} port file")
        return int(port_file.read_text().strip())

    def started(self, name: str, ready_file: Path) -> bool:
        if not self.procs[name].alive():
            raise RuntimeError(f"{name} exited:\n{self.procs[name].log_tail()}")
        return ready_file.exists()

    def start_snitun(self, python: str, wan: tuple[str, ...] = ()) -> None:
        """SniTun as Home Assistant runs it: `SniTunServerSingle` as the relay, and the
        aiohttp app with `SniTunClientAioHttp` at home (bench/aioapp.py), optionally with
        bench.wan between them. `python`: the SniTun venv's (bench/snitunenv.py)."""
        made = subprocess.run(
            [python, str(AIOAPP), "token", "--hostname", HOME_HOST],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if made.returncode != 0:
            raise RuntimeError(f"SniTun token: {made.stderr.strip()}")
        token = json.loads(made.stdout)
        token_file = self.root / "snitun-token.json"
        token_file.write_text(json.dumps(token))
        port_file = self.root / "snitun.port"
        self.spawn(
            "snitun",
            [python, str(AIOAPP), "server", "--port-file", str(port_file)]
            + [f"--fernet-key={token['fernet_key']}"],  # it may start with "-"
        )
        wait_for(lambda: self.started("snitun", port_file), 30, "the SniTun server")
        self.snitun_port = int(port_file.read_text())
        server_port = self.snitun_port
        if wan:
            server_port = self.start_wan("snitun-wan", self.snitun_port, wan)
        ready = self.root / "snihome.ready"
        self.spawn(
            "snihome",
            [python, str(AIOAPP), "home", "--server", f"127.0.0.1:{server_port}"]
            + ["--token-file", str(token_file), "--port-file", str(ready)]
            + ["--cert", str(self.root / "direct.crt"), "--key", str(self.root / "direct.key")],
        )
        wait_for(lambda: self.started("snihome", ready), 60, "the SniTun client to connect")

    def start_relay(self) -> None:
        relay = {
            "hostname": RELAY_HOST,
            "listen": ["127.0.0.1:0"],
            "certificate": "relay.crt",
            "private_key": "relay.key",
            "token_public_key": "token.pub",
            "token_private_key": "token.key",
            "control_socket": str(self.root / "relay.sock"),
            "log_level": "info",
            "drain_timeout": "2s",
            "max_streams_per_session": MAX_STREAMS,
            **self.relay_extra,
        }
        self.relay_config.write_text(tomli_w.dumps({"relay": relay}))
        keygen = self.tunneld(
            "keygen",
            "--private-key",
            str(self.root / "token.key"),
            "--public-key",
            str(self.root / "token.pub"),
        )
        if keygen.returncode != 0:
            raise RuntimeError(f"tunneld keygen failed: {keygen.stderr}")
        proc = self.spawn("relay", [PY, "-m", "tunneld", "relay", "-c", str(self.relay_config)])
        status = wait_for(
            lambda: (self.status(self.relay_config, proc) or {}).get("listen"), 30, "relay status"
        )
        self.relay_port = int(status[0].rsplit(":", 1)[1])

    def start_wan(self, name: str, target_port: int, args: tuple[str, ...]) -> int:
        """bench.wan in front of `target_port`; its port (it prints it first)."""
        proc = self.spawn(
            name, [PY, "-m", "bench.wan", "--target", f"127.0.0.1:{target_port}", *args]
        )

        def listening() -> str | None:
            if not proc.alive():
                raise RuntimeError(f"bench.wan exited:\n{proc.log_tail()}")
            for line in proc.log_path.read_text().splitlines():
                if line.startswith("LISTENING "):
                    return line
            return None

        return int(wait_for(listening, 20, "bench.wan").rsplit(":", 1)[1])

    def start_home(self) -> None:
        issued = self.tunneld(
            "token", "issue", "-c", str(self.relay_config), "--hostname", HOME_HOST, "--ttl", "1d"
        )
        if issued.returncode != 0:
            raise RuntimeError(f"tunneld token issue failed: {issued.stderr}")
        cfg: dict[str, dict[str, Any]] = {
            "relay": {
                # connect_to takes an address only, so the URL carries the port: the
                # link emulator's when there is one (TLS still checks RELAY_HOST).
                "url": f"wss://{RELAY_HOST}:{self.wan_port or self.relay_port}/v1/tunnel",
                "token": issued.stdout.strip(),
                "ca_file": str(self.ca_file),
                "connect_to": "127.0.0.1",
                "backoff_initial": "0.2s",
                "drain_timeout": "2s",
            },
            "tls": {"hostnames": [HOME_HOST]},
            "acme": {"enabled": False},
            "upstream": {"url": f"http://127.0.0.1:{self.app_port}"},
            "daemon": {
                "state_directory": str(self.root / "state"),
                "control_socket": str(self.root / "home.sock"),
                "log_level": "info",
                "max_streams": MAX_STREAMS,
            },
        }
        for table, values in self.home_extra.items():
            cfg.setdefault(table, {}).update(values)
        self.home_config.write_text(tomli_w.dumps(cfg))
        proc = self.spawn("home", [PY, "-m", "tunneld", "run", "-c", str(self.home_config)])
        wait_for(
            lambda: (self.status(self.home_config, proc) or {}).get("state") == "connected",
            30,
            "the daemon's session",
        )

    def start_all(self) -> None:
        self.app_port = self.start_app("app")
        self.direct_port = self.start_app(
            "direct",
            "--tls-cert",
            str(self.root / "direct.crt"),
            "--tls-key",
            str(self.root / "direct.key"),
        )
        self.start_relay()
        if self.wan:  # between the daemon and the relay
            self.wan_port = self.start_wan("wan", self.relay_port, self.wan)
        self.start_home()

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()

    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.procs.items()}

    def check_alive(self) -> None:
        for proc in self.procs.values():
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")

    # -- where clients go ----------------------------------------------------------
    def snitun_target(self) -> dict[str, Any]:
        """Client spec fields for SniTun (its home terminates TLS with direct.crt)."""
        return {"port": self.snitun_port, "cafile": str(self.ca_file)}

    def target(self, tunnel: bool) -> dict[str, Any]:
        """The client spec fields for the tunnel or the direct TLS baseline."""
        return {
            "host": "127.0.0.1",
            "port": self.relay_port if tunnel else self.direct_port,
            "sni": HOME_HOST,
            "cafile": str(self.home_cert if tunnel else self.ca_file),
            "sources": list(SOURCES),
        }
