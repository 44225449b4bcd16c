"""A backend that ignores Range and answers 200 with the whole object: the right bytes anyway."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy import crypto
from tests.servers import ProxyThread, Server, proxy_config

S = crypto.SEGMENT_SIZE


class RangeIgnoringFront:
    """Forwards to moto (which does not check signatures) with the Range header removed."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.loop = asyncio.new_event_loop()
        self.ranges_seen = 0
        self.url = ""
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host",)}
        if headers.pop("Range", None) is not None or headers.pop("range", None) is not None:
            self.ranges_seen += 1
        body = await request.read()
        async with (
            aiohttp.ClientSession(auto_decompress=False) as s,
            s.request(
                request.method,
                self.upstream + request.rel_url.raw_path_qs,
                headers=headers,
                data=body,
            ) as r,
        ):
            data = await r.read()
            out = {k: v for k, v in r.headers.items() if k.lower() not in ("transfer-encoding",)}
            return web.Response(status=r.status, body=data, headers=out)

    async def _start(self) -> None:
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    def __enter__(self) -> RangeIgnoringFront:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture
def ignoring_proxy(moto: Server, keyfile: Path) -> Iterator[tuple[Any, RangeIgnoringFront]]:
    with RangeIgnoringFront(moto.url) as front, ProxyThread(proxy_config(front.url, keyfile)) as p:
        yield p.client(), front


def test_whole_body_answers_to_ranges(ignoring_proxy: tuple[Any, RangeIgnoringFront]) -> None:
    client, front = ignoring_proxy
    client.create_bucket(Bucket="range-ignored")
    size = 3 * S + 123
    data = hashlib.shake_256(b"ignored").digest(size)
    client.put_object(Bucket="range-ignored", Key="enc", Body=data)
    for a, b in [(0, 0), (S - 1, S), (2 * S + 5, size - 1), (10, 3 * S)]:
        got = client.get_object(Bucket="range-ignored", Key="enc", Range=f"bytes={a}-{b}")
        assert got["Body"].read() == data[a : b + 1]
        assert got["ContentRange"] == f"bytes {a}-{b}/{size}"
    got = client.get_object(Bucket="range-ignored", Key="enc", Range="bytes=-100")
    assert got["Body"].read() == data[-100:]
    assert front.ranges_seen >= 5  # the backend really was asked for ranges, and ignored them


def test_whole_body_answers_for_plaintext_objects(
    ignoring_proxy: tuple[Any, RangeIgnoringFront], moto: Server
) -> None:
    from tests.servers import BACKEND_AK, BACKEND_SK, s3_client

    client, _ = ignoring_proxy
    client.create_bucket(Bucket="range-ignored-plain")
    data = hashlib.shake_256(b"plain").digest(200_000)
    s3_client(moto.url, BACKEND_AK, BACKEND_SK).put_object(
        Bucket="range-ignored-plain", Key="legacy", Body=data
    )
    got = client.get_object(Bucket="range-ignored-plain", Key="legacy", Range="bytes=70000-70099")
    assert got["Body"].read() == data[70000:70100]
    assert got["ContentRange"] == f"bytes 70000-70099/{len(data)}"
