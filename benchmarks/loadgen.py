"""The load generator: an aiohttp S3 client that signs with SigV4, plus bounded load loops.

Every loop here is bounded both in requests and in time.  Only loopback endpoints are
accepted.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from benchmarks.sigv4 import SigV4Signer, canonical_query, uri_encode_path

_S3NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_READ_CHUNK = 1 << 20
MAX_LIST_PAGES = 10_000


class S3RequestError(RuntimeError):
    """An S3 request got an unexpected status."""

    def __init__(self, method: str, path: str, status: int, body: bytes) -> None:
        snippet = body[:300].decode("utf-8", "replace")
        super().__init__(f"{method} {path} -> HTTP {status}: {snippet}")
        self.status = status


def _require_loopback(endpoint: str) -> tuple[str, int]:
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    if parts.scheme != "http" or not (host.startswith("127.") or host in ("localhost", "::1")):
        raise ValueError(f"benchmark endpoints must be http on loopback, got {endpoint!r}")
    if parts.port is None:
        raise ValueError(f"endpoint needs an explicit port: {endpoint!r}")
    return host, parts.port


class S3Client:
    """Path-style S3 client over one aiohttp session (connection pool sized to the load)."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        region: str = "us-east-1",
        max_connections: int = 128,
        request_timeout: float = 600.0,
    ) -> None:
        host, port = _require_loopback(endpoint)
        self._base = f"http://{host}:{port}"
        self._host = f"{host}:{port}"
        self._signer = SigV4Signer(access_key, secret_key, region)
        self._max_connections = max_connections
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0

    async def __aenter__(self) -> S3Client:
        conn = aiohttp.TCPConnector(limit=self._max_connections, force_close=False)
        self._session = aiohttp.ClientSession(
            connector=conn, timeout=self._timeout, auto_decompress=False, skip_auto_headers=()
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        query: list[tuple[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        data: bytes | memoryview | None = None,
        ok: tuple[int, ...] = (200,),
        keep_body: bool = True,
    ) -> tuple[int, dict[str, str], bytes, int]:
        """Send one signed request; returns (status, lower-cased headers, body, body length).

        With ``keep_body=False`` the body is streamed and only counted.
        """
        if self._session is None:
            raise RuntimeError("S3Client used outside 'async with'")
        epath = uri_encode_path(path)
        equery = canonical_query(query or [])
        signed = self._signer.sign(method, self._host, epath, equery, headers)
        if data is not None:
            signed["Content-Length"] = str(len(data))
        url = URL(self._base + epath + (f"?{equery}" if equery else ""), encoded=True)
        self.requests += 1
        async with self._session.request(method, url, headers=signed, data=data) as resp:
            if keep_body or resp.status not in ok:
                body = await resp.read()
                n = len(body)
            else:
                body = b""
                n = 0
                async for chunk in resp.content.iter_chunked(_READ_CHUNK):
                    n += len(chunk)
            if resp.status not in ok:
                raise S3RequestError(method, path, resp.status, body)
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, body, n

    async def create_bucket(self, bucket: str) -> None:
        await self.request("PUT", f"/{bucket}", ok=(200, 409))

    async def put_object(self, bucket: str, key: str, data: bytes | memoryview) -> None:
        await self.request("PUT", f"/{bucket}/{key}", data=data)

    async def get_object(self, bucket: str, key: str, keep_body: bool = False) -> tuple[int, bytes]:
        _, _, body, n = await self.request("GET", f"/{bucket}/{key}", keep_body=keep_body)
        return n, body

    async def get_range(self, bucket: str, key: str, start: int, length: int) -> int:
        hdr = {"Range": f"bytes={start}-{start + length - 1}"}
        _, _, _, n = await self.request(
            "GET", f"/{bucket}/{key}", headers=hdr, ok=(200, 206), keep_body=False
        )
        return n

    async def delete_object(self, bucket: str, key: str) -> None:
        await self.request("DELETE", f"/{bucket}/{key}", ok=(200, 204, 404))

    async def multipart_upload(
        self, bucket: str, key: str, data: bytes, part_size: int, parallel: int
    ) -> int:
        """Upload ``data`` in parts of ``part_size`` (``parallel`` at a time); returns parts."""
        _, _, body, _ = await self.request("POST", f"/{bucket}/{key}", query=[("uploads", "")])
        upload_id = _xml_text(body, "UploadId")
        view = memoryview(data)
        offsets = list(range(0, len(data), part_size))
        etags: dict[int, str] = {}
        sem = asyncio.Semaphore(parallel)

        async def one(num: int, off: int) -> None:
            async with sem:
                _, hdrs, _, _ = await self.request(
                    "PUT",
                    f"/{bucket}/{key}",
                    query=[("partNumber", str(num)), ("uploadId", upload_id)],
                    data=view[off : off + part_size],
                )
                etag = hdrs.get("etag")
                if not etag:
                    raise RuntimeError(f"UploadPart {num} of {bucket}/{key} returned no ETag")
                etags[num] = etag

        await asyncio.gather(*(one(i + 1, off) for i, off in enumerate(offsets)))
        parts = "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>{etags[n]}</ETag></Part>"
            for n in sorted(etags)
        )
        doc = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
        _, _, body, _ = await self.request(
            "POST", f"/{bucket}/{key}", query=[("uploadId", upload_id)], data=doc
        )
        if b"<Error>" in body:
            raise S3RequestError("POST", f"/{bucket}/{key}", 200, body)
        return len(offsets)

    async def list_all(self, bucket: str, prefix: str, page_size: int) -> tuple[int, int]:
        """List every key under ``prefix`` with ListObjectsV2; returns (keys, pages)."""
        token: str | None = None
        keys = 0
        for page in range(1, MAX_LIST_PAGES + 1):
            q = [("list-type", "2"), ("prefix", prefix), ("max-keys", str(page_size))]
            if token:
                q.append(("continuation-token", token))
            _, _, body, _ = await self.request("GET", f"/{bucket}", query=q)
            root = ET.fromstring(body)
            keys += len(root.findall(f"{_S3NS}Contents")) or len(root.findall("Contents"))
            truncated = (_find_text(root, "IsTruncated") or "false").lower() == "true"
            token = _find_text(root, "NextContinuationToken")
            if not truncated or not token:
                return keys, page
        raise RuntimeError(f"listing of {bucket}/{prefix} exceeded {MAX_LIST_PAGES} pages")


def _find_text(root: ET.Element, tag: str) -> str | None:
    el = root.find(f"{_S3NS}{tag}")
    if el is None:
        el = root.find(tag)
    return None if el is None else el.text


def _xml_text(body: bytes, tag: str) -> str:
    text = _find_text(ET.fromstring(body), tag)
    if not text:
        raise RuntimeError(f"no <{tag}> in S3 response")
    return text


@dataclass
class LoadResult:
    """Outcome of one bounded load loop."""

    requests: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    bytes: int = 0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, p: float) -> float:
        """Latency percentile (nearest rank), seconds."""
        if not self.latencies:
            return 0.0
        s = sorted(self.latencies)
        idx = min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))
        return s[idx]


async def run_load(
    op: Callable[[int, random.Random], Awaitable[int]],
    concurrency: int,
    duration: float,
    max_requests: int,
    seed: int = 1,
) -> LoadResult:
    """Run ``op(i, rng)`` from ``concurrency`` workers until ``duration`` s or ``max_requests``.

    ``op`` returns the number of payload bytes it moved.  Each request's latency is recorded.
    """
    latencies: list[float] = []
    moved = 0
    counter = 0
    start = time.perf_counter()
    deadline = start + duration

    async def worker(w: int) -> None:
        nonlocal counter, moved
        rng = random.Random(seed * 1000 + w)
        while counter < max_requests and time.perf_counter() < deadline:
            i = counter
            counter += 1
            t0 = time.perf_counter()
            moved += await op(i, rng)
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return LoadResult(len(latencies), time.perf_counter() - start, latencies, moved)


async def run_bounded(
    items: int, concurrency: int, op: Callable[[int], Awaitable[None]], timeout: float
) -> float:
    """Run ``op(i)`` for i in range(items) with ``concurrency`` workers; returns seconds.

    ``op(0)`` runs alone first, so that servers mapping keys to directories (rclone) create
    the common prefix once instead of racing on it.
    """
    start = time.perf_counter()
    if items <= 0:
        return 0.0
    await asyncio.wait_for(op(0), timeout)
    counter = 1

    async def worker() -> None:
        nonlocal counter
        while counter < items:
            i = counter
            counter += 1
            await op(i)

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout)
    return time.perf_counter() - start
