"""Shared fixtures: real backends (moto server, rclone serve s3, Ceph RGW) and a proxy in front."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.rgw import revive, rgw_server
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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "xfail_backend(name, reason): strict xfail for that `backend` param only "
        "(a known proxy limitation on that server)",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None:
            continue
        for mark in item.iter_markers("xfail_backend"):
            if callspec.params.get("backend") == mark.args[0]:
                item.add_marker(pytest.mark.xfail(strict=True, reason=mark.kwargs["reason"]))


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


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory, logdir: Path) -> Iterator[Server]:
    """Ceph RGW (one mon, one memstore OSD, radosgw); fails, never skips, if it cannot start."""
    with rgw_server(tmp_path_factory.mktemp("ceph"), logdir) as s:
        yield s


@pytest.fixture(autouse=True)
def _ceph_alive(request: pytest.FixtureRequest) -> Iterator[None]:
    """Restart a radosgw that died (16.2 aborts on some requests), and say which test did it."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("backend") != "ceph":
        yield
        return
    server: Server = request.getfixturevalue("ceph")
    if revive(server):
        warnings.warn("radosgw was dead before this test; restarted", stacklevel=1)
    yield
    if revive(server):
        warnings.warn(f"radosgw died during {request.node.nodeid}; restarted", stacklevel=1)


_BACKEND_FIXTURES = {"moto": "moto", "rclone": "rclone_backend", "ceph": "ceph"}


@pytest.fixture(scope="session", params=list(_BACKEND_FIXTURES))
def backend(request: pytest.FixtureRequest) -> Server:
    """Each end-to-end test runs against every real backend."""
    server: Server = request.getfixturevalue(_BACKEND_FIXTURES[request.param])
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
