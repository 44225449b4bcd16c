"""Pytest fixtures that start KMS servers on 127.0.0.1 for provider and end-to-end tests.

Use them from a test module (or a conftest) by importing the fixture names::

    from tests.kms_servers import moto_server, aws_front, openbao, gcp_kms, azure_kv

Fixtures and what they yield:

``moto_server`` (session)  ``MotoServer``: a ``python -m moto.server`` process.
    ``.endpoint_url``, ``.region``, ``.create_key() -> key ARN``,
    ``.create_alias(name, key_arn) -> alias ARN``, ``.boto3()`` (a sync KMS client),
    ``.session()`` (an aiobotocore session with the fake credentials).
``aws_front`` (function)  ``ErrorFront``: an aiohttp HTTP front forwarding to
    moto that answers chosen KMS operations with real AWS JSON errors
    (``.inject(op, error_type, status, times)``), can hold calls
    (``.inject_hang(op, seconds, times)``) and counts calls per operation
    (``.calls["Decrypt"]``); ``.endpoint_url`` is what the client should use.
``openbao`` (session)  ``OpenBaoServer``: ``bao server -dev`` with Transit mounted at
    ``transit``.  ``.addr``, ``.host`` (``host:port``), ``.root_token``,
    ``.create_key(name) -> app token`` (a derived key plus a policy ``<name>`` that
    allows datakey/encrypt/decrypt on it, and a token carrying that policy),
    ``.deny(name)`` / ``.allow(name)`` (rewrite that policy), ``.rotate(name)``,
    ``.set_min_decryption_version(name, v)``, ``.delete_key(name)``.
``vault_front`` (function)  ``ErrorFront`` forwarding to the OpenBao server; inject
    with ``.inject_json("/v1/transit/decrypt/<name>", 503, {"errors": [...]}, times)``;
    ``.host`` is the ``host:port`` for ``vault-transit://`` URIs.
``gcp_kms`` (function)  ``tests.fakes.gcp_kms.FakeGcpKms`` serving gRPC at
    ``.target``; build an SDK client with ``gcp_async_client(fake.target)`` inside
    the test's event loop.
``azure_tls`` (session)  ``tests.fakes.azure_kv.TlsMaterial`` (CA + server cert).
``azure_kv`` (function)  ``tests.fakes.azure_kv.FakeKeyVault`` serving HTTPS at
    ``.vault_url``; SDK options in ``azure_client_kwargs(azure_tls)``; credential
    ``StaticTokenCredential(fake.token)``.

Processes are started on a free ephemeral port, awaited with a bounded readiness
loop and stopped by their own PID (terminate, wait, kill).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import grpc
import pytest
import requests
from aiobotocore.session import AioSession, get_session
from aiohttp import web
from azure.core.credentials import AccessToken, AccessTokenInfo
from google.cloud import kms_v1
from google.cloud.kms_v1.services.key_management_service.transports import (
    KeyManagementServiceGrpcAsyncIOTransport,
)

from tests.fakes import LoopThread
from tests.fakes.azure_kv import FakeKeyVault, TlsMaterial, tls_material
from tests.fakes.gcp_kms import FakeGcpKms

AWS_REGION = "eu-west-1"
AWS_ACCESS_KEY = "testing"
AWS_SECRET_KEY = "testing"  # moto accepts any credentials

# ---- process helpers ----------------------------------------------------------------


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Stop one child by its own PID: terminate, wait, then kill."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def wait_ready(
    proc: subprocess.Popen[bytes], check: Callable[[], bool], what: str, timeout: float = 30.0
) -> None:
    """Poll ``check`` until it is true; bounded in time and attempts."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        try:
            if check():
                return
        except (requests.RequestException, OSError):
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise RuntimeError(f"{what} was not ready within {timeout}s")


def start_on_free_port(
    argv_for: Callable[[int], list[str]],
    ready_url_for: Callable[[int], str],
    what: str,
    log: Path,
    env: dict[str, str] | None = None,
    verify: str | bool = True,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server on a free port (output to ``log``), retrying 3x if the port was taken."""
    last: RuntimeError | None = None
    for _ in range(3):
        port = free_port()
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv_for(port), env=env, stdout=out, stderr=subprocess.STDOUT)
        url = ready_url_for(port)

        def ready(url: str = url) -> bool:
            return requests.get(url, timeout=1, verify=verify).status_code < 500

        try:
            wait_ready(proc, ready, what)
            return proc, port
        except RuntimeError as exc:
            stop_process(proc)
            last = exc
    assert last is not None
    raise last


# ---- AWS: moto ----------------------------------------------------------------------


@dataclass
class MotoServer:
    endpoint_url: str
    region: str
    pid: int

    def boto3(self) -> Any:
        return boto3.client(
            "kms",
            region_name=self.region,
            endpoint_url=self.endpoint_url,
            aws_access_key_id=AWS_ACCESS_KEY,
            aws_secret_access_key=AWS_SECRET_KEY,
        )

    def create_key(self) -> str:
        """A new symmetric key; returns its ARN."""
        return str(self.boto3().create_key(KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["Arn"])

    def create_alias(self, alias: str, key_arn: str) -> str:
        self.boto3().create_alias(AliasName=f"alias/{alias}", TargetKeyId=key_arn)
        account = key_arn.split(":")[4]
        return f"arn:aws:kms:{self.region}:{account}:alias/{alias}"

    def session(self) -> AioSession:
        s = get_session()
        s.set_credentials(AWS_ACCESS_KEY, AWS_SECRET_KEY)
        return s


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc, port = start_on_free_port(
        lambda p: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(p)],
        lambda p: f"http://127.0.0.1:{p}/moto-api/",
        "moto server",
        log=log,
    )
    try:
        yield MotoServer(f"http://127.0.0.1:{port}", AWS_REGION, proc.pid)
    finally:
        stop_process(proc)


class ErrorFront:
    """HTTP front for a KMS server that injects chosen error responses and counts calls.

    A request's *operation* is the AWS ``X-Amz-Target`` operation (``"Decrypt"``)
    when present, else the URL path (``"/v1/transit/decrypt/k"``).
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.calls: Counter[str] = Counter()
        self._rules: dict[str, list[tuple[int, dict[str, Any], str]]] = {}
        self._hangs: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        self._thread = LoopThread("kms-error-front")
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def inject(
        self, op: str, error_type: str, status: int = 400, times: int = 1, message: str = ""
    ) -> None:
        """Answer the next ``times`` calls of ``op`` (e.g. ``"Decrypt"``) with an error."""
        payload = {"__type": error_type, "message": message or f"{error_type} (injected)"}
        self.inject_json(op, status, payload, times, "application/x-amz-json-1.1")

    def inject_json(
        self,
        op: str,
        status: int,
        payload: dict[str, Any],
        times: int = 1,
        content_type: str = "application/json",
    ) -> None:
        """Answer the next ``times`` calls of ``op`` with ``status`` and a JSON body."""
        with self._lock:
            self._rules.setdefault(op, []).extend([(status, payload, content_type)] * times)

    def inject_hang(self, op: str, seconds: float, times: int = 1) -> None:
        """Hold the next ``times`` calls of ``op`` for ``seconds`` before forwarding them."""
        with self._lock:
            self._hangs.setdefault(op, []).extend([seconds] * times)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self._hangs.clear()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        target = request.headers.get("X-Amz-Target", "")
        op = target.rpartition(".")[2] if target else request.path
        body = await request.read()
        with self._lock:
            self.calls[op] += 1
            rules = self._rules.get(op)
            rule = rules.pop(0) if rules else None
            hangs = self._hangs.get(op)
            hang = hangs.pop(0) if hangs else 0.0
        if hang:
            await asyncio.sleep(hang)
        if rule is not None:
            status, payload, content_type = rule
            return web.json_response(payload, status=status, content_type=content_type)
        assert self._session is not None
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
        }
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=body, headers=headers
        ) as resp:
            answer = await resp.read()
            return web.Response(
                status=resp.status,
                body=answer,
                headers={"Content-Type": resp.headers.get("Content-Type", "application/json")},
            )

    def start(self, port: int = 0) -> None:
        """Listen on 127.0.0.1:<port> (0: ephemeral); ``start(front.port)`` after ``stop()``
        brings a stopped front back on its old address."""
        self._thread.start()

        async def up() -> int:
            self._session = aiohttp.ClientSession()
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", port)
            await site.start()
            self._runner = runner
            server: Any = site._server
            return int(server.sockets[0].getsockname()[1])

        self.port = self._thread.run(up())

    def stop(self) -> None:
        if self._runner is None:
            return  # already stopped

        async def down() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
                self._runner = None
            if self._session is not None:
                await self._session.close()
                self._session = None

        self._thread.run(down())
        self._thread.stop()


@pytest.fixture
def aws_front(moto_server: MotoServer) -> Iterator[ErrorFront]:
    front = ErrorFront(moto_server.endpoint_url)
    front.start()
    try:
        yield front
    finally:
        front.stop()


# ---- Vault / OpenBao Transit ----------------------------------------------------------


@dataclass
class OpenBaoServer:
    addr: str
    root_token: str
    pid: int
    mount: str = "transit"
    ca_file: str | None = None
    """The dev server's CA (``-dev-tls``); None: plain HTTP."""

    @property
    def host(self) -> str:
        return self.addr.removeprefix("http://").removeprefix("https://")

    def api(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        namespace: str | None = None,
    ) -> Any:
        headers = {"X-Vault-Token": self.root_token}
        if namespace:
            headers["X-Vault-Namespace"] = namespace
        resp = requests.request(
            method,
            f"{self.addr}/v1/{path}",
            json=body,
            headers=headers,
            timeout=10,
            verify=self.ca_file or True,
        )
        if resp.status_code >= 400:
            raise RuntimeError(f"bao {method} {path}: {resp.status_code} {resp.text}")
        return resp.json() if resp.content else None

    def _policy(self, name: str, allow: bool) -> str:
        if not allow:
            return f'path "{self.mount}/keys/{name}" {{ capabilities = ["deny"] }}\n'
        return "".join(
            f'path "{self.mount}/{op}/{name}" {{ capabilities = ["update"] }}\n'
            for op in ("datakey/plaintext", "encrypt", "decrypt")
        )

    def create_key(self, name: str) -> str:
        """Derived Transit key ``name``, policy ``name`` on it, and a token with that policy."""
        self.api("POST", f"{self.mount}/keys/{name}", {"derived": True, "type": "aes256-gcm96"})
        self.allow(name)
        out = self.api("POST", "auth/token/create", {"policies": [name], "ttl": "1h"})
        return str(out["auth"]["client_token"])

    def allow(self, name: str) -> None:
        self.api("PUT", f"sys/policies/acl/{name}", {"policy": self._policy(name, True)})

    def deny(self, name: str) -> None:
        """Replace the key's policy with one that grants nothing on it."""
        self.api("PUT", f"sys/policies/acl/{name}", {"policy": self._policy(name, False)})

    def rotate(self, name: str) -> None:
        self.api("POST", f"{self.mount}/keys/{name}/rotate")

    def set_min_decryption_version(self, name: str, version: int) -> None:
        self.api("POST", f"{self.mount}/keys/{name}/config", {"min_decryption_version": version})

    def delete_key(self, name: str) -> None:
        self.api("POST", f"{self.mount}/keys/{name}/config", {"deletion_allowed": True})
        self.api("DELETE", f"{self.mount}/keys/{name}")


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBaoServer]:
    bao = shutil.which("bao") or str(Path(sys.executable).parent / "bao")
    home = tmp_path_factory.mktemp("bao-home")
    root = "root-" + os.urandom(8).hex()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home)}
    proc, port = start_on_free_port(
        lambda p: [
            bao,
            "server",
            "-dev",
            f"-dev-root-token-id={root}",
            f"-dev-listen-address=127.0.0.1:{p}",
        ],
        lambda p: f"http://127.0.0.1:{p}/v1/sys/health",
        "openbao dev server",
        env=env,
        log=home / "bao.log",
    )
    try:
        server = OpenBaoServer(f"http://127.0.0.1:{port}", root, proc.pid)
        server.api("POST", "sys/mounts/transit", {"type": "transit"})
        yield server
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def openbao_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBaoServer]:
    """``bao server -dev -dev-tls``: HTTPS with a CA of its own (``.ca_file``), Transit
    mounted at ``transit`` and AppRole enabled at ``approle``."""
    bao = shutil.which("bao") or str(Path(sys.executable).parent / "bao")
    home = tmp_path_factory.mktemp("bao-tls-home")
    certs = home / "certs"
    certs.mkdir()
    ca = str(certs / "vault-ca.pem")
    root = "root-" + os.urandom(8).hex()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home)}
    proc, port = start_on_free_port(
        lambda p: [
            bao,
            "server",
            "-dev",
            "-dev-tls",
            f"-dev-tls-cert-dir={certs}",
            f"-dev-root-token-id={root}",
            f"-dev-listen-address=127.0.0.1:{p}",
        ],
        lambda p: f"https://127.0.0.1:{p}/v1/sys/health",
        "openbao dev server (TLS)",
        env=env,
        log=home / "bao.log",
        verify=ca,
    )
    try:
        server = OpenBaoServer(f"https://127.0.0.1:{port}", root, proc.pid, ca_file=ca)
        server.api("POST", "sys/mounts/transit", {"type": "transit"})
        server.api("POST", "sys/auth/approle", {"type": "approle"})
        yield server
    finally:
        stop_process(proc)


@pytest.fixture
def vault_front(openbao: OpenBaoServer) -> Iterator[ErrorFront]:
    front = ErrorFront(openbao.addr)
    front.start()
    try:
        yield front
    finally:
        front.stop()


# ---- GCP ----------------------------------------------------------------------------


@pytest.fixture
def gcp_kms() -> Iterator[FakeGcpKms]:
    fake = FakeGcpKms()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


def gcp_async_client(target: str) -> kms_v1.KeyManagementServiceAsyncClient:
    """A real Cloud KMS async client over an insecure gRPC channel to ``target``.

    Call it inside the event loop that will use it (gRPC aio channels are loop-bound);
    close it with ``await client.transport.close()``.
    """
    channel = grpc.aio.insecure_channel(target)
    transport = KeyManagementServiceGrpcAsyncIOTransport(channel=channel)
    return kms_v1.KeyManagementServiceAsyncClient(transport=transport)


# ---- Azure --------------------------------------------------------------------------


class StaticTokenCredential:
    """An async token credential that always returns one fixed bearer token."""

    def __init__(self, token: str) -> None:
        self._token = token
        self.requests = 0

    async def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        self.requests += 1
        return AccessToken(self._token, int(time.time()) + 3600)

    async def get_token_info(self, *scopes: str, options: Any = None) -> AccessTokenInfo:
        self.requests += 1
        return AccessTokenInfo(self._token, int(time.time()) + 3600)

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> StaticTokenCredential:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


def azure_client_kwargs(tls: TlsMaterial) -> dict[str, Any]:
    """SDK options to reach the fake vault: trust its CA, accept the 127.0.0.1 challenge."""
    return {"connection_verify": str(tls.ca_path), "verify_challenge_resource": False}


@pytest.fixture(scope="session")
def azure_tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return tls_material(tmp_path_factory.mktemp("azure-tls"))


@pytest.fixture
def azure_kv(azure_tls: TlsMaterial) -> Iterator[FakeKeyVault]:
    fake = FakeKeyVault(token="token-" + os.urandom(8).hex())
    fake.start(azure_tls)
    try:
        yield fake
    finally:
        fake.stop()


__all__ = [
    "ErrorFront",
    "MotoServer",
    "OpenBaoServer",
    "StaticTokenCredential",
    "aws_front",
    "azure_client_kwargs",
    "azure_kv",
    "azure_tls",
    "gcp_async_client",
    "gcp_kms",
    "moto_server",
    "openbao",
    "openbao_tls",
    "vault_front",
]
