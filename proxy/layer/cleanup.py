"""The proxy's own state follows the client's deletions: DeleteObjects and DeleteBucket.

* ``forget_deleted`` - after a backend DeleteObjects, the envelopes of every key the backend
  deleted (named in ``<Deleted>``, or - quiet mode - requested and not in ``<Error>``) go.
* ``purge_reserved`` - before a DeleteBucket: when no client-visible object, object version
  or in-progress upload remains, the reserved prefix (envelopes, upload state, job leftovers)
  is removed, so the backend's DeleteBucket finds the bucket empty. A bucket holding any
  client data keeps its reserved state: the backend then answers BucketNotEmpty as it would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Sequence
from typing import Final
from xml.etree.ElementTree import Element

from proxy.backend.client import BackendClient
from proxy.layer.envelopes import EnvelopeStore
from proxy.wire.reserved import RESERVED_PREFIX
from proxy.wire.xmldoc import child_text, local, parse_backend

CONCURRENCY: Final = 16
CONTROL_STATE: Final = (RESERVED_PREFIX + "specs/", RESERVED_PREFIX + "operations/")
"""The control bucket's specs and operations (``proxy.control.specs``): never purged."""
_MAX_PAGES: Final = 100_000


async def forget_deleted(envelopes: EnvelopeStore, bucket: str, keys: Sequence[str]) -> None:
    """Drop the envelopes of deleted objects, a bounded number at a time."""
    if envelopes.kind != "sidecar" or not keys:
        return
    queue = list(keys)

    async def worker() -> None:
        while queue:
            await envelopes.forget(bucket, queue.pop())

    await asyncio.gather(*(worker() for _ in range(min(CONCURRENCY, len(queue)))))


async def reserved_keys(backend: BackendClient, bucket: str, prefix: str) -> AsyncIterator[str]:
    """Every backend key under ``prefix``, page by page."""
    token: str | None = None
    for _ in range(_MAX_PAGES):
        query = [("list-type", "2"), ("prefix", prefix), ("max-keys", "1000")]
        if token:
            query.append(("continuation-token", token))
        _, body = await backend.call("GET", bucket, query=query)
        root = parse_backend(body)
        for el in root:
            if local(el.tag) == "Contents":
                key = child_text(el, "Key")
                if key.startswith(prefix):
                    yield key
        token = child_text(root, "NextContinuationToken") or None
        if child_text(root, "IsTruncated") != "true" or not token:
            return


async def holds_client_data(backend: BackendClient, bucket: str) -> bool:
    """Whether any client-visible object, version or in-progress upload is in ``bucket``.

    The reserved prefix folds into one common prefix with ``delimiter=/``, so two entries
    of one listing decide. Answers True when the backend cannot tell (conservative).
    """
    _, body = await backend.call(
        "GET", bucket, query=(("list-type", "2"), ("delimiter", "/"), ("max-keys", "2"))
    )
    if _visible(parse_backend(body), ("Contents", "CommonPrefixes")):
        return True
    resp, body = await backend.call(
        "GET", bucket, query=(("delimiter", "/"), ("uploads", "")), ok=(200, 404, 501)
    )
    if resp.status == 200 and _visible(parse_backend(body), ("Upload", "CommonPrefixes")):
        return True
    resp, body = await backend.call("GET", bucket, query=(("versioning", ""),), ok=(200, 404, 501))
    if resp.status == 200 and child_text(parse_backend(body), "Status"):
        resp, body = await backend.call(
            "GET", bucket, query=(("delimiter", "/"), ("versions", "")), ok=(200, 404, 501)
        )
        if resp.status != 200:
            return True
        kinds = ("Version", "DeleteMarker", "CommonPrefixes")
        return _visible(parse_backend(body), kinds)
    return False


def _visible(root: Element, kinds: Collection[str]) -> bool:
    for el in root:
        if local(el.tag) not in kinds:
            continue
        name = child_text(el, "Prefix") if local(el.tag) == "CommonPrefixes" else ""
        name = name or child_text(el, "Key")
        if not name.startswith(RESERVED_PREFIX):
            return True
    return False


async def purge_reserved(backend: BackendClient, envelopes: EnvelopeStore, bucket: str) -> int:
    """Remove the reserved prefix of a bucket that holds no client data; returns how many
    objects went (0 and nothing touched when client data remains)."""
    if await holds_client_data(backend, bucket):
        return 0
    for prefix in CONTROL_STATE:
        _, body = await backend.call(
            "GET", bucket, query=(("list-type", "2"), ("prefix", prefix), ("max-keys", "1"))
        )
        if any(local(el.tag) == "Contents" for el in parse_backend(body)):
            return 0  # the control bucket: its specs outlive any client deletion
    removed = 0
    batch: list[str] = []

    async def delete(key: str) -> None:
        await backend.call("DELETE", bucket, key, ok=(200, 204, 404))

    async for key in reserved_keys(backend, bucket, RESERVED_PREFIX):
        batch.append(key)
        if len(batch) >= CONCURRENCY:
            await asyncio.gather(*(delete(k) for k in batch))
            removed += len(batch)
            batch = []
    await asyncio.gather(*(delete(k) for k in batch))
    removed += len(batch)
    return removed
