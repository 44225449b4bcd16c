"""``rewrap``: move objects to another key without rewriting their data.

Only the sealed keys change: the object's data key is unwrapped with the old key, its
object key opened, and sealed again under a data key of the new key (``crypto.reseal``);
the stored segments are untouched. Before anything is replaced, the new form is checked:
the new wrapped data key is unwrapped by the KMS itself (once per data key, not from the
cache) and the new sealed key must open to the same object key.

Replacing the envelope:

* ``metadata`` store - a backend CopyObject of the object onto itself with
  ``x-amz-metadata-directive: REPLACE`` (no data is rewritten by the backend either), carrying
  the object's content headers and user metadata unchanged and the new envelope, with
  ``x-amz-copy-source-if-match`` = the ETag the envelope was read from. AWS S3 (and MinIO,
  Ceph) evaluate that condition atomically, so a client write that lands meanwhile is never
  given the wrong envelope; moto and ``rclone serve s3`` ignore it, so the job also re-reads
  the ETag right before the copy (a window of one round trip remains there) and checks the
  copy's result. ``rclone serve s3`` merges old metadata into a REPLACE copy; every envelope
  name is rewritten, and the result is read back and compared.
* ``sidecar`` store - the envelope object of this exact object version (named by its ETag)
  is overwritten; a concurrent client write makes a new version with its own envelope, so
  nothing can be lost.

Re-running finishes the work: objects already under the target key and exactly its
configured replicas are skipped (``already``); an object whose envelope lacks a replica of
the target key, or holds one no longer configured, is rewrapped - that is how replicas are
added to and removed from existing objects (the data is not touched). Objects stored as
sent are skipped (``plaintext``). Data keys of the old key
stay cached in a running proxy for at most ``kms.cache_ttl``.
"""

from __future__ import annotations

import hmac
from dataclasses import replace

from proxy import crypto
from proxy.control.jobs.common import (
    ConcurrentWrite,
    JobContext,
    JobOptions,
    JobProgress,
    Listed,
    run_job,
)
from proxy.errors import IntegrityError
from proxy.layer.envelopes import etag_core
from proxy.layer.headers import copy_source, storable_headers


async def rewrap(
    ctx: JobContext, opts: JobOptions, progress: JobProgress | None = None
) -> JobProgress:
    checked: dict[tuple[str, bytes], bytes] = {}

    async def kms_unwrap(uri: str, wrapped: bytes) -> bytes:
        ck = (uri, wrapped)
        if ck not in checked:
            checked[ck] = await ctx.keys.kek(uri).unwrap(wrapped, {"bucket": opts.bucket})
        return checked[ck]

    async def step(obj: Listed, prog: JobProgress) -> None:
        bucket, key = opts.bucket, obj.key
        head, _ = await ctx.backend.call("HEAD", bucket, key)
        etag = etag_core(head.headers.get("etag")) or ""
        env = await ctx.envelopes.read(bucket, key, head.headers)
        if env is None:
            prog.outcome("plaintext")
            return
        target = opts.target_key or ctx.policy().decide(bucket, key).key_uri
        if target is None:
            prog.outcome("skipped-not-encrypted-by-policy")
            return
        group = ctx.keys.groups.members(target)
        if env.kek_uri in group and {env.kek_uri, *(r.kek_uri for r in env.replicas)} == set(
            group
        ):  # under the key and exactly its configured replicas
            prog.by_key[target] += 1
            prog.outcome("already")
            return
        if opts.dry_run:
            prog.planned_bytes += obj.size
            prog.by_key[f"{env.kek_uri} -> {target}"] += 1
            prog.outcome("would-rewrap")
            return
        binding = env.binding(bucket, key)
        old = await ctx.keys.unwrap(env.kek_uri, env.wrapped_data_key, bucket, env.replicas)
        object_key = crypto.open_object_key(old, env.sealed_object_key, binding)
        new = await ctx.keys.data_key_for_write(target, bucket)
        sealed = crypto.seal_object_key(new.plaintext, object_key, binding)
        # the new form must open through the KMS before it replaces anything
        main = new.kek_uri or target  # a replica, if the key itself was unreachable
        back = await kms_unwrap(main, new.wrapped)
        if not hmac.compare_digest(crypto.open_object_key(back, sealed, binding), object_key):
            raise IntegrityError(f"{key}: the resealed key does not open to the object key")
        new_env = replace(
            env,
            kek_uri=main,
            kek_version=new.key_version,
            wrapped_data_key=new.wrapped,
            sealed_object_key=sealed,
            replicas=new.replicas,  # adds and removes replicas: only the envelope changes
        )
        if ctx.envelopes.kind == "sidecar":
            await ctx.envelopes.before_commit(bucket, key, new_env, etag)
        else:
            recheck, _ = await ctx.backend.call("HEAD", bucket, key)
            if etag_core(recheck.headers.get("etag")) != etag:
                raise ConcurrentWrite(key)
            headers = storable_headers(head.headers)
            headers.update(crypto.to_metadata(new_env))
            headers["x-amz-copy-source"] = copy_source(bucket, key)
            headers["x-amz-metadata-directive"] = "REPLACE"
            headers["x-amz-copy-source-if-match"] = f'"{etag}"'
            resp, _ = await ctx.backend.call("PUT", bucket, key, headers=headers, ok=(200, 412))
            if resp.status == 412:
                raise ConcurrentWrite(key)
            after, _ = await ctx.backend.call("HEAD", bucket, key)
            got = crypto.from_metadata(after.headers)
            if (
                got is None
                or got.kek_uri != main
                or got.replicas != new.replicas
                or got.wrapped_data_key != new.wrapped
                or got.sealed_object_key != sealed
            ):
                raise IntegrityError(f"{key}: the backend did not keep the new envelope")
        prog.by_key[target] += 1
        prog.outcome("rewrapped")

    return await run_job("rewrap", ctx, opts, step, progress)
