"""Shared fixtures: real backends (moto server, rclone serve s3) and a proxy in front."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import (
    BACKEND_AK,
    BACKEND_SK,
    ProxyThread,
    Server,
    envelope_store,
    moto_server,
    new_keyfile,
    proxy_config,
    rclone_server,
    s3_client,
)


@pytest.fixture(scope="session")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def moto(logdir: Path) -> Iterator[Server]:
    with moto_server(logdir) as s:
        yield s


@pytest.fixture(scope="session")
def rclone_backend(tmp_path_factory: pytest.TempPathFactory, logdir: Path) -> Iterator[Server]:
    with rclone_server(tmp_path_factory.mktemp("rclone-root"), logdir) as s:
        yield s


@pytest.fixture(scope="session", params=["moto", "rclone"])
def backend(request: pytest.FixtureRequest) -> Server:
    """Each end-to-end test runs against both real backends."""
    name = "moto" if request.param == "moto" else "rclone_backend"
    server: Server = request.getfixturevalue(name)
    return server


@pytest.fixture(scope="session")
def keyfile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return new_keyfile(tmp_path_factory.mktemp("keys") / "keys.json")


@pytest.fixture(scope="session")
def proxy(backend: Server, keyfile: Path) -> Iterator[ProxyThread]:
    with ProxyThread(
        proxy_config(backend.url, keyfile, envelope_store=envelope_store(backend))
    ) as p:
        yield p


@pytest.fixture(scope="session")
def direct(backend: Server) -> Any:
    """A boto3 client straight to the backend (to look at what is really stored)."""
    return s3_client(backend.url, BACKEND_AK, BACKEND_SK)


@pytest.fixture(scope="session")
def client(proxy: ProxyThread) -> Any:
    """A boto3 client with default settings (checksums, aws-chunked) through the proxy."""
    return proxy.client()


_bucket_counter = iter(range(1_000_000))


@pytest.fixture
def bucket(client: Any) -> str:
    name = f"test-{next(_bucket_counter)}"
    client.create_bucket(Bucket=name)
    return name
