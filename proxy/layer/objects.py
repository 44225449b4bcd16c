"""The encryption layer: PUT, GET, HEAD and listing rewrites with envelope encryption.

This is the one place where plaintext meets ciphertext.  It takes plaintext
bodies as async iterators (already de-framed and verified by the S3 front end),
encrypts them segment by segment into a streaming backend request, and turns
backend responses back into plaintext streams that release a segment only after
it authenticated.  It knows nothing of HTTP servers, SigV4 or XML errors
beyond raising ``S3Error``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Final

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from proxy import crypto
from proxy.backend.client import BackendClient, BackendUnavailable, parse_error
from proxy.errors import FormatError, IntegrityError, KeyUnavailableError, S3Error
from proxy.kms.keys import KeyService
from proxy.layer.bodies import READ_CHUNK, is_partial, iter_body, slice_body, stored_extent
from proxy.layer.checksum_store import StoredChecksum, open_checksum, seal_checksum
from proxy.layer.decision import Decision, KeyPolicy
from proxy.layer.envelopes import EnvelopeStore, MetadataEnvelopes
from proxy.layer.headers import (
    CHECKSUM_HEADERS,
    GET_PASS_HEADERS,
    SSE_HEADER,
    SSE_KEY_HEADER,
    client_storable_headers,
    copy_source,
    sse_headers,
)
from proxy.layer.ranges import (
    ETAG_SUFFIX,
    ClientRange,
    backend_conditions,
    backend_etag,
    check_preconditions,
    client_etag,
    http_time,
    invalid_range,
    parse_range,
    precondition_failed,
    stored_range_for,
)
from proxy.metrics import Metrics
from proxy.wire import checksums

log = logging.getLogger(__name__)

OFFLOAD_BYTES: Final = 128 * 1024
"""Chunks at least this large are encrypted/decrypted in a worker thread (measured: PUT +~15%)."""
RULE_HEADER: Final = "x-cmek-rule"
"""Which policy rule decided how a written object was stored (debugging aid, bounded values)."""

__all__ = [
    "ETAG_SUFFIX",
    "ClientRange",
    "GetResult",
    "ObjectLayer",
    "PutResult",
    "backend_etag",
    "check_preconditions",
    "client_etag",
    "invalid_range",
    "parse_range",
    "precondition_failed",
    "stored_range_for",
]


@dataclass
class PutResult:
    etag: str | None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class GetResult:
    status: int
    headers: CIMultiDict[str]
    body: AsyncGenerator[bytes, None] | None
    content_length: int


class _BodyFailure:
    """Holds an error raised while streaming a request body to the backend."""

    def __init__(self) -> None:
        self.error: BaseException | None = None


class ObjectLayer:
    def __init__(
        self,
        backend: BackendClient,
        keys: KeyService,
        policy: KeyPolicy,
        metrics: Metrics,
        envelopes: EnvelopeStore | None = None,
    ) -> None:
        self.backend = backend
        self.keys = keys
        self.policy = policy
        self.metrics = metrics
        self.envelopes: EnvelopeStore = envelopes or MetadataEnvelopes()

    # ------------------------------------------------------------------ PUT
    async def put_object(
        self,
        bucket: str,
        key: str,
        headers: Mapping[str, str],
        body: AsyncIterator[bytes],
        length: int,
        verified_checksums: Callable[[], Mapping[str, str]] = dict,
        *,
        stored_checksum: StoredChecksum | None = None,
    ) -> PutResult:
        """Store ``length`` plaintext bytes from ``body`` (verified by the caller's iterator).

        A checksum the client declared in a header is stored (encrypted) with the object at
        once; one that arrives in the aws-chunked trailer is known only after the body, so it
        is added by a metadata-only self-copy (``verified_checksums`` gives it then).
        """
        decision = self.decide_write(bucket, key, headers)
        out_headers = client_storable_headers(headers)
        for name in ("if-match", "if-none-match"):
            if name in headers:
                out_headers[name] = (
                    backend_etag(headers[name]) if name == "if-match" else headers[name]
                )
        if not decision.encrypt:
            self.metrics.passthrough_writes.labels(rule=decision.rule).inc()
            res = await self.send_put(bucket, key, out_headers, body, length, encrypted=False)
            res.headers[RULE_HEADER] = decision.rule
            return res
        assert decision.key_uri is not None
        dk = await self.keys.data_key_for_write(decision.key_uri, bucket)
        object_key = crypto.new_object_key()
        sealed = crypto.seal_object_key(
            dk.plaintext, object_key, crypto.Binding(bucket=bucket, key=key, multipart=False)
        )
        declared = checksums.from_headers(headers).flexible
        sealed_ck: str | None = None
        if stored_checksum is not None:
            declared = None
            sealed_ck = seal_checksum(object_key, bucket, key, stored_checksum)
        elif declared is not None and declared.value is not None:
            ck = StoredChecksum(declared.algorithm, declared.value)
            sealed_ck = seal_checksum(object_key, bucket, key, ck)
        env = crypto.Envelope(
            kek_uri=decision.key_uri,
            kek_version=dk.key_version,
            wrapped_data_key=dk.wrapped,
            sealed_object_key=sealed,
            multipart=False,
            checksum=sealed_ck,
        )
        trailer = declared if declared is not None and declared.in_trailer else None

        def final_envelope() -> crypto.Envelope:
            """The envelope with a trailer checksum, known once the body has verified."""
            value = verified_checksums().get(trailer.header) if trailer is not None else None
            if trailer is None or value is None:
                return env
            ck = StoredChecksum(trailer.algorithm, value)
            return replace(env, checksum=seal_checksum(object_key, bucket, key, ck))

        async def before_final(stored_md5: str) -> None:
            await self.envelopes.before_commit(bucket, key, final_envelope(), stored_md5)

        encrypted_body = self.encrypt_stream(
            object_key,
            body,
            length,
            before_final=before_final if self.envelopes.needs_stored_md5 else None,
        )
        res = await self.send_put(
            bucket,
            key,
            {**out_headers, **self.envelopes.put_headers(env)},
            encrypted_body,
            crypto.ciphertext_size(length),
            encrypted=True,
        )
        if trailer is not None and not self.envelopes.needs_stored_md5 and res.etag is not None:
            done = final_envelope()
            if done is not env:
                await self.update_envelope(bucket, key, out_headers, done, res.etag)
        res.headers.update(sse_headers(decision.key_uri))
        res.headers[RULE_HEADER] = decision.rule
        return res

    async def update_envelope(
        self,
        bucket: str,
        key: str,
        metadata: Mapping[str, str],
        env: crypto.Envelope,
        client_etag_value: str,
    ) -> None:
        """Store a changed envelope of an unchanged body (e.g. with a checksum added)."""
        if self.envelopes.kind == "sidecar":
            await self.envelopes.after_commit(bucket, key, env, backend_etag(client_etag_value))
            return
        await self.replace_metadata(
            bucket, key, {**metadata, **self.envelopes.put_headers(env)}, client_etag_value
        )

    async def commit_envelope(
        self, bucket: str, key: str, env: crypto.Envelope, etag: str | None
    ) -> None:
        """After a multipart completion or a copy: the envelope of the object now stored."""
        await self.envelopes.after_commit(bucket, key, env, etag)

    async def replace_metadata(
        self, bucket: str, key: str, metadata: Mapping[str, str], client_etag_value: str
    ) -> None:
        """Metadata-only self-copy (the body is not re-encrypted), if the object is unchanged."""
        headers = {k: v for k, v in metadata.items() if k not in ("if-match", "if-none-match")}
        headers["x-amz-copy-source"] = copy_source(bucket, key)
        headers["x-amz-metadata-directive"] = "REPLACE"
        headers["x-amz-copy-source-if-match"] = backend_etag(client_etag_value)
        await self.backend.call("PUT", bucket, key, headers=headers)

    def decide_write(
        self, bucket: str, key: str, headers: Mapping[str, str] | None = None
    ) -> Decision:
        decision = self.policy.decide(bucket, key, headers)
        if decision.refuse:
            raise S3Error(
                "AccessDenied",
                "no encryption spec covers this bucket and the default refuses writes",
                403,
            )
        return decision

    @staticmethod
    async def encrypt_stream(
        object_key: bytes,
        body: AsyncIterator[bytes],
        length: int,
        part: int = 0,
        *,
        before_final: Callable[[str], Awaitable[None]] | None = None,
    ) -> AsyncIterator[bytes]:
        """Encrypt a verified plaintext stream; the final segment leaves last.

        ``before_final`` (sidecar envelopes) is given the MD5 of the whole stored body -
        the backend's ETag-to-be - and runs before the final segment is released, so the
        object can never be stored without its envelope.
        """
        enc = crypto.StreamEncryptor(object_key, part)
        md5 = hashlib.md5(usedforsecurity=False) if before_final is not None else None
        # MD5 (sidecar envelopes only) runs in a worker thread - hashlib releases the GIL -
        # overlapping the socket write of the same bytes; updates stay in order.
        hashing: asyncio.Future[None] | None = None
        loop = asyncio.get_running_loop()
        seen = 0
        async for chunk in body:
            seen += len(chunk)
            if seen > length:
                raise S3Error("IncompleteBody", "the body is longer than its declared length", 400)
            # AES-GCM releases the GIL too: large chunks are sealed off the event loop, so the
            # loop keeps moving bytes on both sockets meanwhile.
            if len(chunk) >= OFFLOAD_BYTES:
                out = await loop.run_in_executor(None, enc.update, chunk)
            else:
                out = enc.update(chunk)
            if out:
                if md5 is not None:
                    if hashing is not None:
                        await hashing
                    hashing = loop.run_in_executor(None, md5.update, out)
                yield out
        if seen != length:
            raise S3Error(
                "IncompleteBody",
                "You did not provide the number of bytes specified by the Content-Length "
                "HTTP header",
                400,
            )
        # The final segment leaves only now: after the caller's iterator verified the body.
        last = enc.finalize()
        if md5 is not None and before_final is not None:
            if hashing is not None:
                await hashing
            md5.update(last)
            await before_final(md5.hexdigest())
        yield last

    async def send_put(
        self,
        bucket: str,
        key: str,
        headers: dict[str, str],
        body: AsyncIterator[bytes],
        length: int,
        *,
        encrypted: bool,
        query: tuple[tuple[str, str], ...] = (),
    ) -> PutResult:
        failure = _BodyFailure()

        async def guarded() -> AsyncIterator[bytes]:
            try:
                async for chunk in body:
                    yield chunk
            except BaseException as exc:
                failure.error = exc
                raise

        try:
            resp = await self.backend.request(
                "PUT",
                bucket,
                key,
                query=query,
                headers=headers,
                body=guarded(),
                content_length=length,
            )
        except (BackendUnavailable, aiohttp.ClientError) as exc:
            if failure.error is not None:
                raise failure.error from None
            if isinstance(exc, BackendUnavailable):
                raise
            raise BackendUnavailable(f"backend write failed: {type(exc).__name__}") from exc
        if failure.error is not None:
            resp.release()
            raise failure.error
        try:
            data = await resp.read()
        finally:
            resp.release()
        if resp.status != 200:
            raise parse_error(resp.status, data)
        out: dict[str, str] = {}
        if "x-amz-version-id" in resp.headers:
            out["x-amz-version-id"] = resp.headers["x-amz-version-id"]
        return PutResult(etag=client_etag(resp.headers.get("etag"), encrypted), headers=out)

    # ------------------------------------------------------------------ GET / HEAD
    async def head_object(
        self,
        bucket: str,
        key: str,
        cond: Mapping[str, str],
        query: tuple[tuple[str, str], ...],
        *,
        checksum_mode: bool = False,
    ) -> GetResult:
        resp, _ = await self.backend.call(
            "HEAD", bucket, key, query=query, headers=backend_conditions(cond), ok=(200, 304)
        )
        env = await self.envelope(bucket, key, resp.headers)
        size = int(resp.headers.get("content-length", "0"))
        headers = self.response_headers(resp.headers, env)
        if resp.status == 304 or check_preconditions(cond, headers) == 304:
            return GetResult(304, headers, None, 0)
        if env is not None:
            size = self.plaintext_size(size)
            if checksum_mode and env.checksum is not None:
                object_key = await self.object_key_for(bucket, key, env)
                headers.update(self._checksum_headers(bucket, key, object_key, env))
        else:
            self._check_legacy(bucket, key, size, resp.headers)
        return GetResult(resp.status, headers, None, size)

    async def get_object(
        self,
        bucket: str,
        key: str,
        range_header: str | None,
        cond: Mapping[str, str],
        query: tuple[tuple[str, str], ...],
        *,
        checksum_mode: bool = False,
    ) -> GetResult:
        """One backend GET in the common case.

        A range is translated into the stored segments that hold it, guessing from the
        policy whether the object is encrypted; only when the guess was wrong (a legacy
        plaintext object on an encrypted path, or the reverse) is a second request made.
        """
        rng = parse_range(range_header) if range_header else None
        guess = self.policy.may_be_encrypted(bucket, key)
        result = await self._get(
            bucket, key, rng, cond, query, guess_encrypted=guess, checksum_mode=checksum_mode
        )
        if result is None:
            result = await self._get(
                bucket, key, rng, cond, query, guess_encrypted=not guess, checksum_mode=False
            )
            if result is None:
                raise FormatError("object changed between two reads")
        return result

    async def _get(
        self,
        bucket: str,
        key: str,
        rng: ClientRange | None,
        cond: Mapping[str, str],
        query: tuple[tuple[str, str], ...],
        *,
        guess_encrypted: bool,
        checksum_mode: bool = False,
    ) -> GetResult | None:
        """GET with the range fitted to the guess; None when the guess proved wrong."""
        hdrs = backend_conditions(cond)
        if rng is not None:
            hdrs["range"] = stored_range_for(rng) if guess_encrypted else rng.header()
        resp = await self.backend.request("GET", bucket, key, query=query, headers=hdrs)
        keep_open = False
        try:
            if resp.status == 304:
                return GetResult(304, self.response_headers(resp.headers, None), None, 0)
            if resp.status == 416 and rng is not None:
                # Some backends refuse a suffix longer than the object, and a stored range
                # can start past the end: learn the size, then answer or ask precisely.
                concrete = await self._concrete_range(bucket, key, rng, query, guess_encrypted)
                resp.release()
                return await self._get(
                    bucket, key, concrete, cond, query, guess_encrypted=guess_encrypted
                )
            if resp.status not in (200, 206):
                raise parse_error(resp.status, await resp.read())
            env = await self.envelope(bucket, key, resp.headers)
            headers = self.response_headers(resp.headers, env)
            if check_preconditions(cond, headers) == 304:
                return GetResult(304, headers, None, 0)
            if rng is not None and is_partial(resp) and (env is not None) != guess_encrypted:
                return None
            if env is None:
                result = self._plaintext_result(bucket, key, resp, rng, headers)
            else:
                result = await self._decrypt_result(
                    bucket, key, resp, env, rng, headers, checksum_mode
                )
            keep_open = True
            return result
        finally:
            if not keep_open:
                resp.release()

    async def _concrete_range(
        self,
        bucket: str,
        key: str,
        rng: ClientRange,
        query: tuple[tuple[str, str], ...],
        guess_encrypted: bool,
    ) -> ClientRange:
        """The client's range as first-last for the object's real size, or InvalidRange."""
        head, _ = await self.backend.call("HEAD", bucket, key, query=query)
        size = int(head.headers.get("content-length", "0"))
        if await self.envelope(bucket, key, head.headers) is not None:
            size = self.plaintext_size(size)
        start, end = rng.resolve(size)
        if rng.first is not None and rng.last is not None and (start, end) == (rng.first, rng.last):
            raise invalid_range(size)  # already concrete: the backend's 416 stands
        return ClientRange(start, end)

    def _plaintext_result(
        self,
        bucket: str,
        key: str,
        resp: aiohttp.ClientResponse,
        rng: ClientRange | None,
        headers: CIMultiDict[str],
    ) -> GetResult:
        legacy = self._check_legacy(bucket, key, stored_extent(resp)[0], resp.headers)
        self.metrics.plaintext_reads.labels(reason="legacy" if legacy else "passthrough").inc()
        passed = (
            (SSE_HEADER, SSE_KEY_HEADER)
            if rng is not None
            else (*CHECKSUM_HEADERS, SSE_HEADER, SSE_KEY_HEADER)
        )
        for h in passed:
            if h in resp.headers:
                headers[h] = resp.headers[h]
        if is_partial(resp) or rng is None:
            length = int(resp.headers.get("content-length", "0"))
            status = 200
            if is_partial(resp) and rng is not None:
                headers["content-range"] = resp.headers["content-range"]
                status = 206
            return GetResult(status, headers, iter_body(resp, length), length)
        # The backend ignored Range (answered 200 with the whole object).
        total = int(resp.headers.get("content-length", "0"))
        start, end = rng.resolve(total)
        headers["content-range"] = f"bytes {start}-{end}/{total}"
        length = end - start + 1
        return GetResult(206, headers, slice_body(resp, start, length), length)

    async def _decrypt_result(
        self,
        bucket: str,
        key: str,
        resp: aiohttp.ClientResponse,
        env: crypto.Envelope,
        rng: ClientRange | None,
        headers: CIMultiDict[str],
        checksum_mode: bool = False,
    ) -> GetResult:
        # Stored offset and total stored size of what the backend sent.
        stored_total, stored_start = stored_extent(resp)
        plain_total = self.plaintext_size(stored_total)
        object_key = await self.object_key_for(bucket, key, env)
        total_segments = crypto.segment_count(stored_total)
        if rng is None:
            plan = crypto.SegmentRange(
                first_segment=0,
                last_segment=total_segments - 1,
                ct_start=0,
                ct_end=stored_total - 1,
                skip=0,
                length=plain_total,
            )
            status = 200
            if checksum_mode and env.checksum is not None:
                headers.update(self._checksum_headers(bucket, key, object_key, env))
        else:
            start, end = rng.resolve(plain_total)
            plan = crypto.plan_range(plain_total, start, end)
            headers["content-range"] = f"bytes {start}-{end}/{plain_total}"
            status = 206
        if stored_start > plan.ct_start:
            raise FormatError("backend returned a range that starts after the needed segments")
        decryptor = crypto.StreamDecryptor(
            object_key,
            multipart=env.multipart,
            first_segment=plan.first_segment,
            last_segment=plan.last_segment,
            total_segments=total_segments,
        )
        body = self._decrypt_body(resp, decryptor, plan, plan.ct_start - stored_start)
        return GetResult(status, headers, body, plan.length)

    async def _decrypt_body(
        self,
        resp: aiohttp.ClientResponse,
        decryptor: crypto.StreamDecryptor,
        plan: crypto.SegmentRange,
        discard: int,
    ) -> AsyncGenerator[bytes, None]:
        need = plan.ct_end - plan.ct_start + 1
        skip = plan.skip
        remaining = plan.length
        try:
            async for chunk in resp.content.iter_chunked(READ_CHUNK):
                if discard:
                    if len(chunk) <= discard:
                        discard -= len(chunk)
                        continue
                    chunk = chunk[discard:]
                    discard = 0
                if len(chunk) > need:
                    chunk = chunk[:need]
                need -= len(chunk)
                plain = decryptor.update(chunk)
                if need == 0:
                    plain += decryptor.finalize()
                if plain:
                    if skip:
                        cut = min(skip, len(plain))
                        plain = plain[cut:]
                        skip -= cut
                    if len(plain) > remaining:
                        plain = plain[:remaining]
                    remaining -= len(plain)
                    if plain:
                        yield plain
                if need == 0:
                    break
            if need or remaining:
                raise IntegrityError("stored object ended early")
        except IntegrityError:
            self.metrics.integrity_failures.inc()
            raise
        finally:
            resp.release() if need == 0 else resp.close()

    # ------------------------------------------------------------------ helpers
    async def object_key_for(self, bucket: str, key: str, env: crypto.Envelope) -> bytes:
        try:
            data_key = await self.keys.unwrap(env.kek_uri, env.wrapped_data_key, bucket)
        except (KeyUnavailableError, IntegrityError):
            self.envelopes.invalidate(bucket, key)  # a rewrap may have replaced it
            raise
        try:
            return crypto.open_object_key(
                data_key,
                env.sealed_object_key,
                crypto.Binding(bucket=bucket, key=key, multipart=env.multipart),
            )
        except IntegrityError:
            self.metrics.integrity_failures.inc()
            raise

    def _checksum_headers(
        self, bucket: str, key: str, object_key: bytes, env: crypto.Envelope
    ) -> dict[str, str]:
        assert env.checksum is not None
        try:
            return open_checksum(object_key, bucket, key, env.checksum).headers()
        except IntegrityError:
            self.metrics.integrity_failures.inc()
            raise

    async def envelope(
        self, bucket: str, key: str, headers: Mapping[str, str]
    ) -> crypto.Envelope | None:
        try:
            return await self.envelopes.read(bucket, key, headers)
        except FormatError:
            self.metrics.integrity_failures.inc()
            raise

    def _expected_encrypted(self, bucket: str, key: str, stored: Mapping[str, str]) -> bool:
        """Whether the policy expects this stored object (its response headers) encrypted."""
        modified = http_time(stored.get("last-modified", ""))
        return self.policy.may_be_encrypted(bucket, key, modified, stored)

    def _check_legacy(
        self, bucket: str, key: str, stored_size: int, stored: Mapping[str, str]
    ) -> bool:
        """May an object without an envelope be served as stored? True if it is legacy.

        Returns whether the policy expected this object encrypted (a legacy plaintext
        object), raising when it must not be served: strict mode refuses legacy objects;
        with sidecar envelopes an object on an encrypted path whose envelope is missing
        cannot be told from a legacy plaintext object unless its size is one no v1 object
        can have, so it is refused too - serving ciphertext as if it were plaintext would
        be silent corruption.
        """
        if not self._expected_encrypted(bucket, key, stored):
            return False
        if self.policy.strict:
            raise _strict_refusal()
        if self.envelopes.kind == "sidecar":
            try:
                crypto.plaintext_size(stored_size)
            except FormatError:
                return True  # cannot be ours: stored as sent
            raise S3Error(
                "InternalError",
                "no envelope was found for this object on an encrypted path; it is not "
                "served (see envelope_store: sidecar)",
                500,
            )
        return True

    def plaintext_size(self, stored: int) -> int:
        try:
            return crypto.plaintext_size(stored)
        except FormatError:
            self.metrics.integrity_failures.inc()
            raise

    @staticmethod
    def response_headers(
        backend: CIMultiDictProxy[str], env: crypto.Envelope | None
    ) -> CIMultiDict[str]:
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in backend.items():
            lname = name.lower()
            if lname in GET_PASS_HEADERS or (
                lname.startswith(crypto.META_PREFIX) and not crypto.is_internal(lname)
            ):
                out.add(lname, value)
        out["accept-ranges"] = "bytes"
        if env is not None:
            etag = client_etag(backend.get("etag"), True)
            if etag:
                out["etag"] = etag
            out.update(sse_headers(env.kek_uri))
        elif "etag" in backend:
            out["etag"] = backend["etag"]
        return out


def _strict_refusal() -> S3Error:
    return S3Error(
        "AccessDenied",
        "strict mode: this object is stored unencrypted on a path that requires encryption",
        403,
    )
