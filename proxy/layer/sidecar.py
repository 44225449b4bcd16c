"""The sidecar envelope store: envelopes in small objects under the reserved prefix, keyed
by the data's ETag (``envelopes.py`` tells when it is used, ``docs/FORMAT.md`` section 7.1)."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Final

from proxy import crypto
from proxy.backend.client import BackendClient, parse_error
from proxy.errors import FormatError, IntegrityError
from proxy.layer.bodies import read_prefix
from proxy.layer.envelope_names import (
    KEY_FIELD,
    OpenKey,
    StoreKind,
    current_names,
    etag_core,
    pending_prefix,
    sidecar_prefix,
)
from proxy.wire.xmldoc import parse_backend

_MAX_PENDING: Final = 16
_CACHE_ENTRIES: Final = 50_000


class SidecarEnvelopes:
    """Envelopes in small objects under the reserved prefix, keyed by the data's ETag."""

    kind: StoreKind = "sidecar"
    needs_stored_md5 = True
    files_completed_by_etag = True

    def __init__(
        self,
        backend: BackendClient,
        cache_entries: int = _CACHE_ENTRIES,
        cache_ttl: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backend = backend
        # (bucket, key, etag) -> envelope and the time it was read. Bounded in size and
        # age: a rewrap replaces the envelope of an unchanged body (same ETag).
        self._cache: OrderedDict[tuple[str, str, str], tuple[crypto.Envelope, float]] = (
            OrderedDict()
        )
        self._max = cache_entries
        self._ttl = cache_ttl
        self._clock = clock

    def put_headers(self, env: crypto.Envelope) -> dict[str, str]:
        return {}

    def clear_cache(self) -> None:
        """Forget every cached envelope (tests; an operator tool after restoring a backup)."""
        self._cache.clear()

    def invalidate(self, bucket: str, key: str) -> None:
        """Drop cached envelopes of one object (its key was denied or did not open)."""
        for ck in [ck for ck in self._cache if ck[0] == bucket and ck[1] == key]:
            del self._cache[ck]

    def _remember(self, ck: tuple[str, str, str], env: crypto.Envelope) -> None:
        self._cache[ck] = (env, self._clock())
        self._cache.move_to_end(ck)
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)

    async def _write(self, bucket: str, key: str, etag: str, env: crypto.Envelope) -> None:
        await self.write_named(bucket, key, etag, env)

    async def write_named(self, bucket: str, key: str, name: str, env: crypto.Envelope) -> None:
        """Store ``env`` as the envelope ``name`` (an ETag, or an ``upload_record``) of ``key``."""
        doc = {**crypto.to_metadata(env), KEY_FIELD: key}
        body = json.dumps(doc, sort_keys=True).encode()
        await self._backend.call(
            "PUT",
            bucket,
            sidecar_prefix(key) + name,
            headers={"content-type": "application/json"},
            body=body,
        )
        self._remember((bucket, key, name), env)

    async def before_commit(
        self, bucket: str, key: str, env: crypto.Envelope, stored_md5: str
    ) -> None:
        await self._write(bucket, key, stored_md5, env)

    async def after_commit(
        self, bucket: str, key: str, env: crypto.Envelope, backend_etag: str | None
    ) -> None:
        etag = etag_core(backend_etag)
        if etag is None:
            resp, _ = await self._backend.call("HEAD", bucket, key)
            etag = etag_core(resp.headers.get("etag"))
        if etag is None:
            raise FormatError("backend gave the stored object no ETag")
        await self._write(bucket, key, etag, env)
        await self.prune(bucket, key, etag, env)

    async def before_complete(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        pending: crypto.Envelope,
        completed: crypto.Envelope,
    ) -> None:
        await self.write_pending(bucket, key, upload_id, completed)

    async def commit_completed(
        self,
        bucket: str,
        key: str,
        pending: crypto.Envelope,
        completed: crypto.Envelope,
        backend_etag: str | None,
    ) -> None:
        await self.after_commit(bucket, key, completed, backend_etag)

    async def read(
        self, bucket: str, key: str, headers: Mapping[str, str]
    ) -> crypto.Envelope | None:
        etag = etag_core(headers.get("etag"))
        if etag is None:
            return None
        return await self.read_named(bucket, key, etag)

    async def read_named(self, bucket: str, key: str, name: str) -> crypto.Envelope | None:
        """The envelope ``name`` of ``key`` (see ``write_named``); None if there is none."""
        ck = (bucket, key, name)
        hit = self._cache.get(ck)
        if hit is not None and self._clock() - hit[1] < self._ttl:
            self._cache.move_to_end(ck)
            return hit[0]
        resp = await self._backend.request("GET", bucket, sidecar_prefix(key) + name)
        try:
            data = await resp.read()
        finally:
            resp.release()
        if resp.status == 404:
            return None  # not cached: the envelope may be written a moment later
        if resp.status != 200:
            raise parse_error(resp.status, data)
        try:
            meta = json.loads(data)
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            raise FormatError("envelope sidecar is not valid JSON") from exc
        env = crypto.from_metadata({str(k): str(v) for k, v in meta.items()})
        if env is None:
            raise FormatError("envelope sidecar holds no envelope")
        self._remember(ck, env)
        return env

    async def forget(self, bucket: str, key: str) -> None:
        await self.prune(bucket, key, None, None)

    async def committed(
        self, bucket: str, key: str, env: crypto.Envelope | None, backend_etag: str | None
    ) -> None:
        await self.prune(bucket, key, etag_core(backend_etag), env)

    async def listed(self, bucket: str, key: str) -> list[str]:
        """The ETags of the envelopes stored for ``key`` (one page: an object has few)."""
        prefix = sidecar_prefix(key)
        _, body = await self._backend.call(
            "GET", bucket, query=(("list-type", "2"), ("prefix", prefix))
        )
        return [
            el.text[len(prefix) :]
            for el in parse_backend(body).iter()
            if el.tag.endswith("Key") and el.text and el.text.startswith(prefix)
        ]

    async def prune(
        self, bucket: str, key: str, keep: str | None, env: crypto.Envelope | None
    ) -> int:
        """Delete every envelope of ``key`` but the one of ETag ``keep``; returns how many.

        Safe against a writer racing on the same key: a writer whose envelope was written
        but whose data had not committed yet when it was deleted finds it missing when it
        calls this after its commit (its own listing) and writes it again; and after
        deleting, the object is read once more - if the version now stored is one whose
        envelope was just deleted, that envelope is put back. So a current object never
        stays without its envelope.
        """
        stored = await self.listed(bucket, key)
        if keep is not None and env is not None and keep not in stored:
            await self._write(bucket, key, keep, env)  # a racing prune removed it
        removed: dict[str, bytes] = {}
        for etag in stored:
            if etag == keep:
                continue
            name = sidecar_prefix(key) + etag
            resp, data = await self._backend.call("GET", bucket, name, ok=(200, 404))
            if resp.status == 404:
                continue  # another remover took it (and keeps its bytes to put back)
            removed[etag] = data
            await self._backend.call("DELETE", bucket, name, ok=(200, 204, 404))
        self.invalidate(bucket, key)
        if keep is not None and env is not None:
            self._remember((bucket, key, keep), env)
        if removed:
            head, _ = await self._backend.call("HEAD", bucket, key, ok=(200, 404))
            for current in current_names(head.headers) if head.status == 200 else ():
                if current in removed:
                    await self._backend.call(
                        "PUT",
                        bucket,
                        sidecar_prefix(key) + current,
                        headers={"content-type": "application/json"},
                        body=removed[current],
                    )
        return len(removed)

    # A multipart object's ETag is known only after the backend's Complete (rclone's is the
    # MD5 of the whole body, not computable from the parts), so its sidecar cannot be written
    # before it. The envelope is written first under the key's pending prefix instead; a
    # reader that finds no sidecar tries the pending envelopes of that key, accepts the one
    # whose object key authenticates the object's first stored segment, and writes the
    # sidecar itself. A Complete killed half-way thus leaves an object that reads as the old
    # one (backend not completed) or the new one, never one without an envelope.
    async def write_pending(
        self, bucket: str, key: str, upload_id: str, env: crypto.Envelope
    ) -> None:
        body = json.dumps(crypto.to_metadata(env), sort_keys=True).encode()
        await self._backend.call(
            "PUT",
            bucket,
            pending_prefix(key) + upload_id,
            headers={"content-type": "application/json"},
            body=body,
        )

    async def drop_pending(self, bucket: str, key: str, upload_id: str) -> None:
        await self._backend.call(
            "DELETE", bucket, pending_prefix(key) + upload_id, ok=(200, 204, 404)
        )

    async def recover(
        self, bucket: str, key: str, headers: Mapping[str, str], open_key: OpenKey
    ) -> crypto.Envelope | None:
        etag = etag_core(headers.get("etag"))
        try:
            total = crypto.segment_count(int(headers.get("content-length", "")))
        except (ValueError, FormatError):
            return None
        if etag is None:
            return None
        prefix = pending_prefix(key)
        _, listing = await self._backend.call(
            "GET",
            bucket,
            query=(("list-type", "2"), ("prefix", prefix), ("max-keys", str(_MAX_PENDING))),
        )
        names = [
            el.text
            for el in parse_backend(listing).iter()
            if el.tag.endswith("Key") and el.text and el.text.startswith(prefix)
        ]
        if not names:
            return None
        first = await self._first_segment(bucket, key, etag)
        for name in names:
            resp, data = await self._backend.call("GET", bucket, name, ok=(200, 404))
            if resp.status != 200:
                continue
            try:
                meta = json.loads(data)
                env = crypto.from_metadata({str(k): str(v) for k, v in dict(meta).items()})
            except (ValueError, TypeError, FormatError):
                continue
            if env is None or not env.multipart or env.pending:
                continue  # a pending one: a Complete whose layout is being rewritten
            try:
                object_key = await open_key(env)
            except IntegrityError:
                continue
            if crypto.opens_first_segment(object_key, first, total, multipart=True):
                await self._write(bucket, key, etag, env)
                return env
        return None

    async def _first_segment(self, bucket: str, key: str, etag: str) -> bytes:
        return await first_segment(self._backend, bucket, key, etag)


async def first_segment(backend: BackendClient, bucket: str, key: str, etag: str) -> bytes:
    """The first stored segment of the object version ``etag`` (empty if it changed)."""
    hdrs = {"range": f"bytes=0-{crypto.STORED_SEGMENT_SIZE - 1}", "if-match": f'"{etag}"'}
    resp = await backend.request("GET", bucket, key, headers=hdrs)
    try:
        if resp.status not in (200, 206):
            return b""
        return await read_prefix(resp, crypto.STORED_SEGMENT_SIZE)
    finally:
        resp.close()
