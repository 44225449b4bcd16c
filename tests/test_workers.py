"""``cmek-proxy serve --workers N``: several processes behind one port, one admin listener.

A real ``serve`` subprocess in front of moto: both workers accept connections, /metrics merges
their counters, SIGTERM drains without cutting a transfer, a killed worker comes back.
"""

from __future__ import annotations

import hashlib
import http.client
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import load_config
from proxy.workers import _cgroup_cpu_quota, _worker_main, available_cpus
from tests.servers import (
    BACKEND_AK,
    BACKEND_SK,
    CLIENT_AK,
    CLIENT_SK,
    REGION,
    Server,
    s3_client,
    wait_until,
)


@dataclass
class Served:
    proc: subprocess.Popen[str]
    s3_port: int
    admin_port: int

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def workers(self) -> list[int]:
        """PIDs of the worker processes (spawned children of the parent)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])
            if ppid == self.proc.pid and b"spawn_main" in cmdline:
                found.append(int(entry.name))
        return sorted(found)

    def metric(self, name: str, **labels: str) -> float:
        text = requests.get(f"{self.admin}/metrics", timeout=10).text
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                wanted = all(sample.labels.get(k) == v for k, v in labels.items())
                if sample.name == name and wanted:
                    total += sample.value
        return total


def _config(tmp_path: Path, backend: Server, keyfile: Path) -> Path:
    cfg = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "region": REGION,
        "clients": [{"access_key": CLIENT_AK, "secret_key": CLIENT_SK}],
        "backend": {
            "endpoint": backend.url,
            "region": REGION,
            "access_key": BACKEND_AK,
            "secret_key": BACKEND_SK,
        },
        "encryption": {"default": {"key": f"local://{keyfile}"}},
        "shutdown_grace": 20,
    }
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def served(tmp_path: Path, moto: Server, keyfile: Path) -> Iterator[Served]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--config",
            str(_config(tmp_path, moto, keyfile)),
            "--workers",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "proxy.log", "w"),  # noqa: SIM115 - closed with the process
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.search(
            r"S3 on http://[\d.]+:(\d+), admin on http://[\d.]+:(\d+) \(2 workers\)", line
        )
        assert found, f"unexpected start line {line!r}: {(tmp_path / 'proxy.log').read_text()}"
        served = Served(proc, int(found.group(1)), int(found.group(2)))
        wait_until(lambda: len(served.workers()) == 2, 30, "two workers")
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _established(pid: int, port: int, peers: set[int]) -> int:
    """Connections from ``peers`` (client ports) accepted on ``port`` that ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        local_port = int(cols[1].rpartition(":")[2], 16)
        remote_port = int(cols[2].rpartition(":")[2], 16)
        mine = local_port == port and remote_port in peers
        if mine and cols[3] == "01" and cols[9] in inodes:  # 01: ESTABLISHED
            count += 1
    return count


def test_both_workers_accept_and_metrics_merge(served: Served) -> None:
    conns = []
    try:
        for _ in range(40):
            c = http.client.HTTPConnection("127.0.0.1", served.s3_port, timeout=10)
            c.request("GET", "/")  # no credentials: AccessDenied, from whichever worker
            resp = c.getresponse()
            assert resp.status == 403 and b"<Code>AccessDenied</Code>" in resp.read()
            conns.append(c)  # keep-alive: the connection stays with the worker that took it
        peers = {c.sock.getsockname()[1] for c in conns if c.sock is not None}
        held = {pid: _established(pid, served.s3_port, peers) for pid in served.workers()}
        assert sum(held.values()) == 40, held
        assert all(n > 0 for n in held.values()), f"a worker accepted nothing: {held}"
    finally:
        for c in conns:
            c.close()
    # One scrape of the parent merges the counts of both workers.
    assert (
        served.metric(
            "cmek_s3_request_duration_seconds_count", operation="ListBuckets", status="403"
        )
        == 40
    )
    ready = requests.get(f"{served.admin}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text


def test_sigterm_drains_a_transfer_in_flight(served: Served) -> None:
    client = s3_client(served.endpoint, CLIENT_AK, CLIENT_SK)
    client.create_bucket(Bucket="drain")
    body = os.urandom(24 * 1024 * 1024)
    client.put_object(Bucket="drain", Key="big", Body=body)
    resp = client.get_object(Bucket="drain", Key="big")
    stream: Any = resp["Body"]
    first = stream.read(1024 * 1024)  # the transfer is under way
    served.proc.send_signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", served.s3_port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        return False

    wait_until(refused, 15, "new connections refused while draining")
    rest = stream.read()
    assert hashlib.sha256(first + rest).digest() == hashlib.sha256(body).digest()
    assert served.proc.wait(40) == 0


def test_a_killed_worker_comes_back(served: Served) -> None:
    before = served.workers()
    os.kill(before[0], signal.SIGKILL)
    wait_until(
        lambda: len(served.workers()) == 2 and before[0] not in served.workers(),
        60,
        "the worker restarted",
    )
    wait_until(lambda: served.metric("cmek_worker_restarts_total") == 1, 30, "restart counted")
    wait_until(
        lambda: requests.get(f"{served.admin}/readyz", timeout=5).status_code == 200, 30, "ready"
    )
    client = s3_client(served.endpoint, CLIENT_AK, CLIENT_SK)
    client.create_bucket(Bucket="restarted")
    for i in range(10):  # fresh connections reach either worker, the new one included
        client.put_object(Bucket="restarted", Key=f"k{i}", Body=b"x" * i)
    assert [o["Size"] for o in client.list_objects_v2(Bucket="restarted")["Contents"]] == list(
        range(10)
    )


def test_cpu_count_honours_the_cgroup_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_cpu_quota(tmp_path) == 0.5
    assert 1 <= available_cpus() <= (os.cpu_count() or 1)


def test_sigterm_while_workers_start_stops_them(
    tmp_path: Path, moto: Server, keyfile: Path
) -> None:
    """A SIGTERM that comes before every worker listens stops the parent and every worker."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--config",
            str(_config(tmp_path, moto, keyfile)),
            "--workers",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    served = Served(proc, 0, 0)  # type: ignore[arg-type]
    wait_until(lambda: len(served.workers()) >= 1, 60, "a worker process")
    children = served.workers()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    for pid in children:
        wait_until(lambda p=pid: not Path(f"/proc/{p}").exists(), 30, f"worker {pid} gone")


def test_a_worker_its_parent_stopped_waiting_for_drains_quietly(
    tmp_path: Path, moto: Server, keyfile: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A SIGTERM to the parent while a worker starts closes the pipe the worker reports
    "ready" on; the worker must then close its listener and exit 0, not die on the closed
    pipe with a traceback on stderr (seen in CI: "Process cmek-proxy-worker-1:" among the
    JSON log lines)."""
    ctx = multiprocessing.get_context("spawn")
    parent_end, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_worker_main,
        args=(load_config(_config(tmp_path, moto, keyfile)), 1, child_end, "INFO", "text"),
        name="cmek-proxy-worker-1",
    )
    proc.start()
    child_end.close()
    parent_end.close()  # the parent stopped waiting before the worker listened
    try:
        proc.join(60)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(10)
    assert "Traceback" not in capfd.readouterr().err
