"""``encrypt-existing``: encrypt in place the plaintext objects of a bucket turned on late.

For each object stored as sent on a path the policy now encrypts (objects the policy lets
through - unencrypted paths, the TTL rule, passthrough specs - are left alone):

1. the plaintext is streamed from the backend (``If-Match`` its listed ETag), hashed, and
   encrypted as a new single-part object under the policy's key, bound to the object's own
   bucket and key, into a temporary object under the reserved prefix
   (``.cmek-proxy/jobs/tmp/<sha256 of the key>``) with the object's content type, content
   headers, user metadata and tags;
2. the temporary object is read back whole and decrypted; its plaintext hash must equal the
   original's - the new form opens;
3. the original is replaced by a streamed PUT of the checked ciphertext with
   ``If-Match: <original ETag>`` and ``Content-MD5`` of the checked bytes: AWS S3 and moto
   refuse it atomically if a client wrote the object meanwhile (the client's write wins and
   the object is counted ``conflict``); ``rclone serve s3`` ignores ``If-Match``, so the job
   re-reads the ETag right before the PUT there (a window of one round trip remains);
4. the temporary object is deleted.

A failure at any step leaves the original as it was. A killed run leaves at most temporary
objects, which the next run removes first; objects already encrypted are skipped
(``already``), so a re-run finishes the work and repeats nothing. Objects over 5 GiB (the
single-request limit) are reported, not rewritten.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator
from urllib.parse import urlencode

from proxy import crypto
from proxy.backend.client import parse_error
from proxy.backend.http import Response
from proxy.control.jobs.common import (
    MAX_SINGLE_PUT,
    TMP_PREFIX,
    ConcurrentWrite,
    JobContext,
    JobOptions,
    JobProgress,
    Listed,
    decrypt_stream,
    get_ok,
    iter_body,
    list_objects,
    run_job,
)
from proxy.errors import FormatError, IntegrityError
from proxy.layer.envelopes import etag_core, sidecar_prefix
from proxy.layer.headers import storable_headers
from proxy.wire.xmldoc import parse_backend


def tmp_key(key: str) -> str:
    return TMP_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


async def _tags(ctx: JobContext, bucket: str, key: str) -> str | None:
    _, body = await ctx.backend.call("GET", bucket, key, query=(("tagging", ""),))
    pairs: list[tuple[str, str]] = []
    for el in parse_backend(body).iter():
        if el.tag.endswith("Tag"):
            k = v = ""
            for child in el:
                if child.tag.endswith("Key"):
                    k = child.text or ""
                elif child.tag.endswith("Value"):
                    v = child.text or ""
            pairs.append((k, v))
    return urlencode(pairs) if pairs else None


_KEEP = TMP_PREFIX + "keep"


async def _sweep_tmp(ctx: JobContext, bucket: str, *, keep: bool = True) -> int:
    """Remove what a killed run left; while the job runs, keep a marker so the folder never
    empties (``rclone serve s3`` removes an emptied folder, racing a concurrent PUT into it).
    At the end (``keep=False``) the marker goes too: a job leaves nothing behind."""
    removed = 0
    async for obj in list_objects(ctx.backend, bucket, TMP_PREFIX, reserved=True):
        if obj.key != _KEEP or not keep:
            await ctx.backend.call("DELETE", bucket, obj.key, ok=(200, 204, 404))
            removed += obj.key != _KEEP
    if keep:
        await ctx.backend.call("PUT", bucket, _KEEP, body=b"")
    return removed


async def _drop_sidecar(ctx: JobContext, bucket: str, key: str, md5: str) -> None:
    """Remove the sidecar written for a replacement that did not happen - unless the object
    now stored is, against all odds, that very version."""
    head, _ = await ctx.backend.call("HEAD", bucket, key, ok=(200, 404))
    if head.status == 200 and etag_core(head.headers.get("etag")) == md5:
        return
    await ctx.backend.call("DELETE", bucket, sidecar_prefix(key) + md5, ok=(200, 204, 404))
    ctx.envelopes.invalidate(bucket, key)


async def encrypt_existing(
    ctx: JobContext, opts: JobOptions, progress: JobProgress | None = None
) -> JobProgress:
    if not opts.dry_run:
        await _sweep_tmp(ctx, opts.bucket)

    async def step(obj: Listed, prog: JobProgress) -> None:
        bucket, key = opts.bucket, obj.key
        head, _ = await ctx.backend.call("HEAD", bucket, key)
        etag = etag_core(head.headers.get("etag")) or ""
        env = await ctx.envelopes.read(bucket, key, head.headers)
        if env is not None:
            prog.outcome("already")
            return
        if ctx.envelopes.kind == "sidecar":
            # an encrypted object whose envelope is not written yet looks like plaintext
            sidecar, _ = await ctx.backend.call(
                "HEAD", bucket, sidecar_prefix(key) + etag, ok=(200, 404)
            )
            if sidecar.status == 200:
                prog.outcome("already")
                return
        decision = ctx.policy().decide(bucket, key, head.headers)
        if not decision.encrypt or decision.key_uri is None:
            prog.outcome(f"skipped-{decision.rule}")
            return
        size = int(head.headers.get("content-length") or 0)
        if crypto.ciphertext_size(size) > MAX_SINGLE_PUT:
            raise FormatError(f"{key}: {size} bytes is over the single-request limit")
        if opts.dry_run:
            prog.planned_bytes += size
            prog.outcome("would-encrypt")
            return
        headers = storable_headers(head.headers)
        if int(head.headers.get("x-amz-tagging-count") or 0) > 0:
            tags = await _tags(ctx, bucket, key)
            if tags:
                headers["x-amz-tagging"] = tags
        dk = await ctx.keys.data_key_for_write(decision.key_uri, bucket)
        object_key = crypto.new_object_key()
        binding = crypto.Binding(bucket=bucket, key=key, multipart=False)
        env = crypto.Envelope(
            kek_uri=dk.kek_uri or decision.key_uri,
            kek_version=dk.key_version,
            wrapped_data_key=dk.wrapped,
            replicas=dk.replicas,
            sealed_object_key=crypto.seal_object_key(dk.plaintext, object_key, binding),
            multipart=False,
        )
        tmp = tmp_key(key)
        stored_size = crypto.ciphertext_size(size)

        # 1. stream the original into an encrypted temporary object
        plain_hash = hashlib.sha256()
        stored_md5 = hashlib.md5(usedforsecurity=False)
        src = await get_ok(ctx.backend, bucket, key, {"if-match": f'"{etag}"'})
        try:
            if etag_core(src.headers.get("etag")) != etag:
                raise ConcurrentWrite(key)

            async def encrypted() -> AsyncIterator[bytes | bytearray]:
                enc = crypto.StreamEncryptor(object_key)
                seen = 0
                async for chunk in iter_body(src):
                    seen += len(chunk)
                    plain_hash.update(chunk)
                    out = enc.update(chunk)
                    if out:
                        stored_md5.update(out)
                        yield out
                if seen != size:
                    raise ConcurrentWrite(key)
                out = enc.finalize()
                stored_md5.update(out)
                yield out

            await ctx.backend.call(
                "PUT",
                bucket,
                tmp,
                headers={**headers, **ctx.envelopes.put_headers(env)},
                body=encrypted(),
                content_length=stored_size,
            )
        finally:
            src.release()
        prog.bytes += size

        # 2. the new form must open and give back the same plaintext
        check = hashlib.sha256()
        back = await get_ok(ctx.backend, bucket, tmp)
        try:
            async for chunk in decrypt_stream(back, object_key, env):
                check.update(chunk)
        finally:
            back.release()
        if check.digest() != plain_hash.digest():
            raise IntegrityError(f"{key}: the encrypted copy does not decrypt to the original")

        # 3. replace the original only if it is still the version that was read
        md5 = stored_md5.hexdigest()
        await ctx.envelopes.before_commit(bucket, key, env, md5)
        recheck, _ = await ctx.backend.call("HEAD", bucket, key)
        if etag_core(recheck.headers.get("etag")) != etag:
            if ctx.envelopes.kind == "sidecar":
                await _drop_sidecar(ctx, bucket, key, md5)
            raise ConcurrentWrite(key)
        put_headers = {
            **headers,
            **ctx.envelopes.put_headers(env),
            "content-md5": base64.b64encode(bytes.fromhex(md5)).decode(),
        }

        async def replace(if_match: str) -> tuple[Response, bytes]:
            checked = await get_ok(ctx.backend, bucket, tmp)
            try:
                resp = await ctx.backend.request(
                    "PUT",
                    bucket,
                    key,
                    headers={**put_headers, "if-match": if_match},
                    body=iter_body(checked),
                    content_length=stored_size,
                )
                try:
                    return resp, await resp.read()
                finally:
                    resp.release()
            finally:
                checked.release()

        resp, data = await replace(f'"{etag}"')
        if resp.status == 412:
            # Ceph RGW 16 compares a PUT's If-Match without the quotes HTTP puts around an
            # entity tag, so the quoted form never matches there: when the object is still
            # the version that was read, the unquoted form is the same condition.
            again, _ = await ctx.backend.call("HEAD", bucket, key)
            if etag_core(again.headers.get("etag")) == etag:
                resp, data = await replace(etag)
        if resp.status != 200:
            if ctx.envelopes.kind == "sidecar":  # the envelope written for the lost race goes
                await _drop_sidecar(ctx, bucket, key, md5)
            if resp.status == 412:
                raise ConcurrentWrite(key)
            raise parse_error(resp.status, data)
        if etag_core(resp.headers.get("etag")) != md5:
            await ctx.envelopes.after_commit(bucket, key, env, resp.headers.get("etag"))

        # 4. the temporary object is no longer needed
        await ctx.backend.call("DELETE", bucket, tmp, ok=(200, 204, 404))
        prog.by_key[decision.key_uri] += 1
        prog.outcome("encrypted")

    try:
        return await run_job("encrypt-existing", ctx, opts, step, progress)
    finally:
        if not opts.dry_run:
            await _sweep_tmp(ctx, opts.bucket, keep=False)
