"""The backend client against a real S3 server (moto): what it sends for streamed bodies.

A small streamed body is gathered and sent in one piece (benchmarks/README.md: the CPU it
saves per small PUT); these tests pin what that must never change: the bytes stored are the
bytes streamed, and a stream whose length differs from the declared one is never sent - not
clipped to a silently short object, not left hanging for bytes that never come.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.backend.client import COALESCE_BYTES, BackendClient
from proxy.config import Backend
from proxy.errors import S3Error
from tests.servers import BACKEND_AK, BACKEND_SK, REGION, Server


async def _chunks(data: bytes, step: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), step):
        yield data[i : i + step]


def _client(url: str) -> BackendClient:
    # A short read timeout: a request left waiting for body bytes fails fast instead of hanging.
    cfg = Backend(
        endpoint=url, region=REGION, access_key=BACKEND_AK, secret_key=BACKEND_SK, read_timeout=5
    )
    return BackendClient(cfg, BackendClient.make_session(cfg))


@pytest.fixture
async def backend_client(moto: Server) -> AsyncIterator[BackendClient]:
    bc = _client(moto.url)
    await bc.call("PUT", "bc-test")
    yield bc
    await bc.session.close()


async def _stored(bc: BackendClient, key: str) -> bytes | None:
    resp = await bc.request("GET", "bc-test", key)
    try:
        return await resp.read() if resp.status == 200 else None
    finally:
        resp.release()


@pytest.mark.parametrize(
    "size", [0, 1, 4096, COALESCE_BYTES, COALESCE_BYTES + 1, 3 * COALESCE_BYTES]
)
async def test_streamed_body_stored_whole(backend_client: BackendClient, size: int) -> None:
    data = os.urandom(size)
    key = f"whole-{size}"
    await backend_client.call("PUT", "bc-test", key, body=_chunks(data, 1000), content_length=size)
    assert await _stored(backend_client, key) == data


@pytest.mark.parametrize("declared", [4096, 2 * COALESCE_BYTES])
@pytest.mark.parametrize("delta", [-1, 1, 1000])
async def test_stream_of_wrong_length_is_never_stored(
    backend_client: BackendClient, declared: int, delta: int
) -> None:
    key = f"wrong-{declared}-{delta}"
    body: Any = _chunks(os.urandom(declared + delta), 700)
    with pytest.raises(S3Error) as err:
        await backend_client.call("PUT", "bc-test", key, body=body, content_length=declared)
    # A small body is refused before sending; a large one aborts the request mid-body
    # (send_put re-raises the iterator's own error; a bare call sees the aborted request).
    assert err.value.code in (
        ("InternalError",)
        if declared <= COALESCE_BYTES
        else ("InternalError", "ServiceUnavailable")
    )
    assert await _stored(backend_client, key) is None
