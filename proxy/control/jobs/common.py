"""What every key lifecycle job shares: listing, bounded concurrency, progress, summary.

A job walks the objects of ``bucket`` (under ``prefix``) from a streamed listing, hands each
to at most ``concurrency`` workers, counts an outcome per object (and the bytes it read),
shows a tqdm progress bar when asked, and ends with a ``JobSummary``. Object bodies are
streamed in bounded chunks, never held whole. Per-object failures are counted and named
(the first ``MAX_ERRORS``), never raised, so one bad object does not stop a job.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from proxy import crypto
from proxy.backend.client import BackendClient, BackendUnavailable, parse_error
from proxy.backend.http import HttpError, Response
from proxy.control.audit import AuditLog
from proxy.control.jobs.progress import Bar, human_bytes
from proxy.control.policy import Policy
from proxy.crypto import Envelope
from proxy.errors import CmekError, FormatError, IntegrityError, S3Error
from proxy.kms.keys import KeyService
from proxy.layer.envelopes import EnvelopeStore, etag_core
from proxy.wire.reserved import RESERVED_PREFIX
from proxy.wire.xmldoc import parse_backend

MAX_ERRORS: Final = 100
CHUNK: Final = 1024 * 1024
MAX_SINGLE_PUT: Final = 5 * 1024**3
"""Largest object a job rewrites with one PUT / CopyObject (the S3 single-request limit)."""
_MAX_PAGES: Final = 1_000_000
TMP_PREFIX: Final = RESERVED_PREFIX + "jobs/tmp/"


class ConcurrentWrite(S3Error):
    """A client wrote the object during the job: the client's version is kept as is."""

    def __init__(self, key: str) -> None:
        super().__init__("PreconditionFailed", f"{key} changed during the job; left as is", 412)


@dataclass(frozen=True)
class JobOptions:
    bucket: str
    prefix: str = ""
    dry_run: bool = False
    concurrency: int = 8
    sample: float | None = None
    """verify: the fraction of objects to check (chosen by a hash of the key), None: all."""
    target_key: str | None = None
    """rewrap: the key URI to move to; None: the one the policy names for each object."""
    progress: bool = False
    limit: int | None = None
    """gc: at most this many reserved objects examined (None: all)."""
    start_after: str = ""
    """gc: go on after this reserved key (where a bounded run stopped)."""
    min_age: float = 3600.0
    """gc: only state older than this many seconds (backend clock) is removed."""


@dataclass(frozen=True)
class JobContext:
    backend: BackendClient
    keys: KeyService
    envelopes: EnvelopeStore
    policy: Callable[[], Policy]
    audit: AuditLog | None = None


@dataclass(frozen=True)
class Listed:
    key: str
    etag: str
    size: int
    last_modified: float | None


@dataclass
class JobProgress:
    """Live counters of a running job (read by the admin API)."""

    kind: str
    options: JobOptions
    objects: int = 0
    bytes: int = 0
    """Object bytes read from the backend (a dry run reads none)."""
    planned_bytes: int = 0
    """Dry run: stored bytes of the objects the job would process."""
    outcomes: Counter[str] = field(default_factory=Counter)
    by_key: Counter[str] = field(default_factory=Counter)
    errors: list[dict[str, str]] = field(default_factory=list)
    done: bool = False
    last_key: str = ""
    """gc: the last reserved key examined when the run stopped at its limit ("" at the end)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Job-specific report sections (``inventory``), included in ``to_json``."""

    def outcome(self, what: str) -> None:
        self.objects += 1
        self.outcomes[what] += 1

    def error(self, key: str, exc: BaseException) -> None:
        self.outcome("error")
        name = type(exc).__name__
        self.outcomes[f"error:{name}"] += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"key": key, "error": name, "message": str(exc)[:500]})

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.kind,
            "bucket": self.options.bucket,
            "prefix": self.options.prefix,
            "dry_run": self.options.dry_run,
            "objects": self.objects,
            "bytes": self.bytes,
            "planned_bytes": self.planned_bytes,
            "outcomes": dict(sorted(self.outcomes.items())),
            "by_key": dict(sorted(self.by_key.items())),
            "errors": list(self.errors),
            "done": self.done,
            **({"last_key": self.last_key} if self.last_key else {}),
            **self.extra,
        }

    def summary(self) -> str:
        lines = [
            f"{self.kind} s3://{self.options.bucket}/{self.options.prefix}"
            f"{' (dry run)' if self.options.dry_run else ''}: "
            f"{self.objects} objects, {human_bytes(self.bytes)} read"
            + (f", {human_bytes(self.planned_bytes)} to process" if self.options.dry_run else "")
        ]
        lines += [f"  {k}: {v}" for k, v in sorted(self.outcomes.items())]
        if self.by_key:
            lines.append("  per key and version:")
            lines += [f"    {k}: {v}" for k, v in sorted(self.by_key.items())]
        inv = self.extra.get("inventory")
        if inv:
            lines.append("  per key (objects, stored bytes):")
            for uri, k in sorted(inv["keys"].items()):
                lines.append(f"    {uri} [{k['provider']}]: {k['objects']} objects, {k['bytes']} B")
                lines += [
                    f"      version {v}: {n['objects']} objects, {n['bytes']} B"
                    for v, n in sorted(k["versions"].items())
                ]
            for kind in ("plaintext_legacy", "plaintext_allowed"):
                lines.append(f"  {kind}: {inv[kind]['objects']} objects, {inv[kind]['bytes']} B")
        lines += [f"  ! {e['key']}: {e['error']}: {e['message']}" for e in self.errors[:20]]
        return "\n".join(lines)


def sampled(key: str, fraction: float | None) -> bool:
    if fraction is None or fraction >= 1:
        return True
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:4], "big")
    return h < fraction * 2**32


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


async def list_objects(
    backend: BackendClient, bucket: str, prefix: str, *, reserved: bool = False
) -> AsyncIterator[Listed]:
    """The bucket's objects under ``prefix``, page by page; reserved keys left out unless
    ``reserved`` (then only they are listed)."""
    token: str | None = None
    for _ in range(_MAX_PAGES):
        query = [("list-type", "2"), ("prefix", prefix), ("max-keys", "1000")]
        if token:
            query.append(("continuation-token", token))
        _, body = await backend.call("GET", bucket, query=query)
        root = parse_backend(body)
        for el in root:
            if not el.tag.endswith("Contents"):
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child.text or "" for child in el}
            key = fields.get("Key", "")
            if not key or key.startswith(RESERVED_PREFIX) != reserved:
                continue
            yield Listed(
                key=key,
                etag=etag_core(fields.get("ETag")) or "",
                size=int(fields.get("Size") or 0),
                last_modified=_parse_time(fields.get("LastModified")),
            )
        token = next((el.text for el in root if el.tag.endswith("NextContinuationToken")), None)
        truncated = next((el.text for el in root if el.tag.endswith("IsTruncated")), "false")
        if truncated != "true" or not token:
            return


async def iter_body(resp: Response) -> AsyncIterator[bytes]:
    """A backend response body in chunks of at most ``CHUNK`` bytes."""
    try:
        async for chunk in resp.content.iter_chunked(CHUNK):
            yield chunk
    except (HttpError, TimeoutError) as exc:
        raise BackendUnavailable(f"backend read failed: {type(exc).__name__}") from exc


async def object_key_of(ctx: JobContext, bucket: str, key: str, env: Envelope) -> bytes:
    dk = await ctx.keys.unwrap(env.kek_uri, env.wrapped_data_key, bucket, env.replicas)
    return crypto.open_object_key(dk, env.sealed_object_key, env.binding(bucket, key))


async def decrypt_stream(
    resp: Response, object_key: bytes, env: Envelope
) -> AsyncIterator[bytes | bytearray]:
    """Authenticate and decrypt a whole stored body as it arrives."""
    if env.pending:
        raise IntegrityError("multipart object without its completed envelope")
    stored = resp.content_length
    if stored is None:
        raise FormatError("backend sent no Content-Length for a stored object")
    total = crypto.segment_count(stored)
    dec = crypto.StreamDecryptor(
        object_key,
        multipart=env.multipart,
        first_segment=0,
        last_segment=total - 1,
        total_segments=total,
        layout=env.layout,
    )
    async for chunk in iter_body(resp):
        out = dec.update(chunk)
        if out:
            yield out
    yield dec.finalize()


async def get_ok(
    backend: BackendClient, bucket: str, key: str, headers: dict[str, str] | None = None
) -> Response:
    """A streaming GET that raised unless it answered 200 (the caller releases it)."""
    resp = await backend.request("GET", bucket, key, headers=headers)
    if resp.status != 200:
        try:
            data = await resp.read()
        finally:
            resp.release()
        raise parse_error(resp.status, data)
    return resp


ObjectStep = Callable[[Listed, JobProgress], Awaitable[None]]


async def run_job(
    kind: str,
    ctx: JobContext,
    opts: JobOptions,
    step: ObjectStep,
    progress: JobProgress | None = None,
) -> JobProgress:
    """List, fan out to ``opts.concurrency`` workers, count; audit start and finish."""
    if opts.concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    prog = progress or JobProgress(kind, opts)
    audit_fields = {"job": kind, "bucket": opts.bucket, "prefix": opts.prefix}
    if ctx.audit is not None:
        ctx.audit.append("job.started", **audit_fields, dry_run=opts.dry_run)
    bar = Bar(kind, sys.stderr) if opts.progress else None
    queue: asyncio.Queue[Listed | None] = asyncio.Queue(maxsize=opts.concurrency * 2)

    async def worker() -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            try:
                await step(item, prog)
            except ConcurrentWrite:
                prog.outcome("conflict")
            except CmekError as exc:
                prog.error(item.key, exc)
            if bar is not None:
                bar.update(prog.bytes, prog.outcomes.get("error", 0))

    async def count(bar: Bar) -> None:
        async for obj in list_objects(ctx.backend, opts.bucket, opts.prefix):
            if sampled(obj.key, opts.sample):
                bar.listed(obj.size)
        bar.counted()

    workers = [asyncio.create_task(worker()) for _ in range(opts.concurrency)]
    counter = asyncio.create_task(count(bar)) if bar is not None else None
    try:
        async for obj in list_objects(ctx.backend, opts.bucket, opts.prefix):
            if sampled(obj.key, opts.sample):
                await queue.put(obj)
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
    except CmekError as exc:
        if ctx.audit is not None:
            ctx.audit.append("job.finished", **audit_fields, error=str(exc))
        raise
    except asyncio.CancelledError:
        # Ctrl-C (or the proxy stopping): record how far the job got, then stop
        if ctx.audit is not None:
            ctx.audit.append(
                "job.interrupted",
                **audit_fields,
                dry_run=opts.dry_run,
                objects=prog.objects,
                outcomes=dict(prog.outcomes),
            )
        raise
    finally:
        for task in [*workers, *([counter] if counter is not None else [])]:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        if counter is not None:
            with contextlib.suppress(asyncio.CancelledError, CmekError):
                await counter
        if bar is not None:
            bar.close()
    prog.done = True
    if ctx.audit is not None:
        ctx.audit.append(
            "job.finished",
            **audit_fields,
            dry_run=opts.dry_run,
            objects=prog.objects,
            outcomes=dict(prog.outcomes),
        )
    return prog
