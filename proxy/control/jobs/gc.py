"""``gc``: remove the proxy's own state that no longer belongs to anything.

It walks the reserved prefix of a bucket (``.cmek-proxy/``), at most ``limit`` objects per
run (the next run goes on after ``last_key``), and removes - only when older than
``min_age`` on the backend's clock, so a write, upload or job in flight keeps its own:

* ``removed-envelope`` - a sidecar envelope whose object is gone or now has another ETag (or,
  for a multipart object's completed envelope in the metadata store, another upload's)
  (an overwrite or delete that happened while the proxy could not clean up, or a write
  that failed after its envelope was stored). Kept: ``envelope-live``. The envelope names
  its object (``key``); one written before it did is counted ``envelope-unnamed`` and kept.
  After deleting, the object is read once more: if a write committed meanwhile with that
  very ETag, its envelope is put back.
* ``removed-upload-state`` - the state of a multipart upload the backend no longer knows
  (aborted, completed elsewhere, or expired by a lifecycle rule). Kept: ``upload-live``.
* ``removed-job-tmp`` - a temporary object of a killed ``encrypt-existing`` run.

``--dry-run`` counts ``would-remove-*`` instead and changes nothing. Specs and operations of
the control bucket are never touched.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime
from typing import Final

from proxy.config import Gc
from proxy.control.jobs.common import (
    TMP_PREFIX,
    JobContext,
    JobOptions,
    JobProgress,
    Listed,
    _parse_time,
)
from proxy.errors import CmekError
from proxy.layer.envelopes import KEY_FIELD, SIDECAR_PREFIX, current_names, etag_core
from proxy.layer.uploads import STATE_PREFIX
from proxy.wire.reserved import RESERVED_PREFIX
from proxy.wire.xmldoc import child_text, local, parse_backend

_MAX_PAGES: Final = 1_000_000
log = logging.getLogger(__name__)


async def _reserved(ctx: JobContext, bucket: str, start_after: str) -> AsyncIterator[Listed]:
    token: str | None = None
    for _ in range(_MAX_PAGES):
        query = [("list-type", "2"), ("prefix", RESERVED_PREFIX), ("max-keys", "1000")]
        if token:
            query.append(("continuation-token", token))
        elif start_after:
            query.append(("start-after", start_after))
        _, body = await ctx.backend.call("GET", bucket, query=query)
        root = parse_backend(body)
        for el in root:
            if local(el.tag) != "Contents":
                continue
            key = child_text(el, "Key")
            if key.startswith(RESERVED_PREFIX) and key > start_after:
                yield Listed(
                    key=key,
                    etag=etag_core(child_text(el, "ETag")) or "",
                    size=int(child_text(el, "Size") or 0),
                    last_modified=_parse_time(child_text(el, "LastModified")),
                )
        token = child_text(root, "NextContinuationToken") or None
        if child_text(root, "IsTruncated") != "true" or not token:
            return


async def _backend_now(ctx: JobContext, bucket: str) -> float:
    resp, _ = await ctx.backend.call("HEAD", bucket)
    try:
        return parsedate_to_datetime(resp.headers["date"]).timestamp()
    except (KeyError, TypeError, ValueError, IndexError):
        return 0.0  # no usable clock: nothing counts as old, nothing is removed


class _Gc:
    def __init__(self, ctx: JobContext, opts: JobOptions, prog: JobProgress) -> None:
        self.ctx, self.opts, self.prog = ctx, opts, prog
        self.bucket = opts.bucket

    async def remove(self, key: str, what: str) -> None:
        if self.opts.dry_run:
            self.prog.outcome(f"would-remove-{what}")
            return
        await self.ctx.backend.call("DELETE", self.bucket, key, ok=(200, 204, 404))
        self.prog.outcome(f"removed-{what}")

    async def envelope(self, obj: Listed) -> None:
        folder, _, etag = obj.key[len(SIDECAR_PREFIX) :].partition("/")
        resp, data = await self.ctx.backend.call("GET", self.bucket, obj.key, ok=(200, 404))
        if resp.status == 404:
            return
        try:
            doc = json.loads(data)
            key = doc.get(KEY_FIELD) if isinstance(doc, dict) else None
        except ValueError:
            key = None
        if not isinstance(key, str) or hashlib.sha256(key.encode()).hexdigest() != folder:
            self.prog.outcome("envelope-unnamed")
            return
        head, _ = await self.ctx.backend.call("HEAD", self.bucket, key, ok=(200, 404))
        if head.status == 200 and etag in current_names(head.headers):
            self.prog.outcome("envelope-live")
            return
        await self.remove(obj.key, "envelope")
        if self.opts.dry_run:
            return
        self.ctx.envelopes.invalidate(self.bucket, key)
        again, _ = await self.ctx.backend.call("HEAD", self.bucket, key, ok=(200, 404))
        if again.status == 200 and etag in current_names(again.headers):
            # a write of this very version committed meanwhile: its envelope goes back
            await self.ctx.backend.call(
                "PUT",
                self.bucket,
                obj.key,
                headers={"content-type": "application/json"},
                body=data,
            )

    async def upload_state(self, obj: Listed) -> None:
        upload_id = obj.key[len(STATE_PREFIX) :]
        resp, data = await self.ctx.backend.call("GET", self.bucket, obj.key, ok=(200, 404))
        if resp.status == 404:
            return
        try:
            doc = json.loads(data)
            key = str(doc["key"])
        except (ValueError, KeyError, TypeError):
            self.prog.outcome("upload-state-unreadable")
            return
        parts, _ = await self.ctx.backend.call(
            "GET",
            self.bucket,
            key,
            query=(("uploadId", upload_id), ("max-parts", "1")),
            ok=(200, 404),
        )
        if parts.status == 200:
            self.prog.outcome("upload-live")
            return
        await self.remove(obj.key, "upload-state")


async def gc(ctx: JobContext, opts: JobOptions, progress: JobProgress | None = None) -> JobProgress:
    prog = progress or JobProgress("gc", opts)
    if ctx.audit is not None:
        ctx.audit.append("job.started", job="gc", bucket=opts.bucket, dry_run=opts.dry_run)
    now = await _backend_now(ctx, opts.bucket)
    run = _Gc(ctx, opts, prog)
    seen = 0
    prog.last_key = ""
    async for obj in _reserved(ctx, opts.bucket, opts.start_after):
        if opts.limit is not None and seen >= opts.limit:
            break
        seen += 1
        prog.last_key = obj.key
        young = obj.last_modified is None or now - obj.last_modified < opts.min_age
        if opts.min_age > 0 and young:
            prog.outcome("young")
            continue
        try:
            if obj.key.startswith(SIDECAR_PREFIX):
                await run.envelope(obj)
            elif obj.key.startswith(STATE_PREFIX):
                await run.upload_state(obj)
            elif obj.key.startswith(TMP_PREFIX):
                await run.remove(obj.key, "job-tmp")
            else:
                prog.outcome("kept")  # specs, operations, activation records
        except CmekError as exc:
            prog.error(obj.key, exc)
    else:
        prog.last_key = ""  # walked to the end: the next run starts from the beginning
    prog.done = True
    if ctx.audit is not None:
        ctx.audit.append(
            "job.finished",
            job="gc",
            bucket=opts.bucket,
            dry_run=opts.dry_run,
            objects=prog.objects,
            outcomes=dict(prog.outcomes),
        )
    return prog


class GcRunner:
    """The proxy's own periodic ``gc``: every bucket, ``max_objects`` per run and bucket,
    each run going on where the last stopped."""

    def __init__(self, ctx: JobContext, cfg: Gc) -> None:
        self._ctx = ctx
        self._cfg = cfg
        self._cursor: dict[str, str] = {}

    async def run_once(self) -> list[JobProgress]:
        _, body = await self._ctx.backend.call("GET")
        names = [
            child_text(el, "Name") for el in parse_backend(body).iter() if local(el.tag) == "Bucket"
        ]
        out = []
        for bucket in names:
            opts = JobOptions(
                bucket=bucket,
                limit=self._cfg.max_objects,
                start_after=self._cursor.get(bucket, ""),
                min_age=self._cfg.min_age,
            )
            try:
                prog = await gc(self._ctx, opts)
            except CmekError as exc:
                log.warning("gc of bucket %s failed: %s", bucket, type(exc).__name__)
                continue
            self._cursor[bucket] = prog.last_key
            if any(k.startswith("removed-") for k in prog.outcomes):
                log.info("gc %s: %s", bucket, dict(prog.outcomes))
            out.append(prog)
        return out

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self._cfg.interval)
            try:
                await self.run_once()
            except CmekError as exc:
                log.warning("gc could not list the buckets: %s", type(exc).__name__)
