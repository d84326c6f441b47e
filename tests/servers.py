"""Real servers the tests and benchmarks start on this machine: a Ray head (``ray start --head`` on loopback,
dashboard and Jobs API included) and Debian's PostgreSQL on a Unix socket. Stdlib only, no pytest: the
benchmarks start the same servers."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all sockets held open until every port is chosen, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def start_ray_head(tmp: Path, head_env: dict[str, str], num_cpus: int = 2) -> str:
    """``ray start --head`` on 127.0.0.1 with the dashboard on loopback; returns the dashboard address."""
    ray_bin = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    port, dash, *rest = free_ports(7)
    # every port of its own, so two heads on this machine (the module's and an auth-off one) do not collide
    agent_ports = [f"--{name}={p}" for name, p in zip(
        ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
         "ray-client-server-port"), rest, strict=True)]
    start = subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", *agent_ports,
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                            f"--num-cpus={num_cpus}", "--object-store-memory=200000000", f"--temp-dir={tmp}"],
                           capture_output=True, text=True, env=head_env, timeout=120)
    if start.returncode != 0:
        raise RuntimeError(f"ray start failed: {start.stderr[-2000:]}")
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # it answers (401 when the head wants a token): it is up
            break
        except Exception:  # noqa: BLE001 - dashboard still starting
            time.sleep(1)
    return address


def stop_ray_head(temp_dir: Path) -> None:
    """Kill only the processes of the head started with ``temp_dir`` (`ray stop` would stop every Ray here)."""
    marker = str(temp_dir).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def _as_postgres(*argv: str) -> subprocess.CompletedProcess[str]:
    user = [] if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--"]
    return subprocess.run([*user, *argv], capture_output=True, text=True, timeout=120, check=True)


@contextlib.contextmanager
def postgres_server(port: int = 55432) -> Iterator[tuple[str, str]]:
    """Debian's PostgreSQL, started on a Unix socket only (no TCP listener) with a database ``optuna``;
    yields (SQLAlchemy URL, server version). Raises when no server is installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")) or [shutil.which("pg_ctl") or ""]
    pg_ctl = found[-1]
    if not (pg_ctl and Path(pg_ctl).is_file()):
        raise RuntimeError("no PostgreSQL server (apt-get install postgresql)")
    bin_dir = Path(pg_ctl).parent
    # the server runs as the postgres user, which cannot enter pytest's private temporary directories
    root = Path(tempfile.mkdtemp(prefix="minidisc-pg-"))
    root.chmod(0o755)
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
    _as_postgres(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust")
    _as_postgres(pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                 f"-k {sock} -c listen_addresses='' -p {port} -c max_connections=200", "start")
    try:
        _as_postgres(str(bin_dir / "createdb"), "-h", str(sock), "-p", str(port), "-U", "postgres", "optuna")
        version = _as_postgres(str(bin_dir / "postgres"), "--version").stdout.strip()
        yield f"postgresql+psycopg2://postgres@/optuna?host={sock}&port={port}", version
    finally:
        _as_postgres(pg_ctl, "-D", str(data), "-m", "fast", "stop")
        shutil.rmtree(root, ignore_errors=True)  # the temporary directory made above
