"""The encryption layer: PUT, GET, HEAD and listing rewrites with envelope encryption.

This is the one place where plaintext meets ciphertext.  It takes plaintext
bodies as async iterators (already de-framed and verified by the S3 front end),
encrypts them segment by segment into a streaming backend request, and turns
backend responses back into plaintext streams that release a segment only after
it authenticated.  It knows nothing of HTTP servers, SigV4 or XML errors
beyond raising ``S3Error``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy

from proxy import crypto
from proxy.backend.client import BackendClient, parse_error
from proxy.backend.http import Response
from proxy.errors import FormatError, IntegrityError, KeyUnavailableError
from proxy.kms.keys import KeyService
from proxy.layer.bodies import READ_CHUNK, is_partial, iter_body, slice_body, stored_extent
from proxy.layer.checksum_store import open_checksum
from proxy.layer.decision import KeyPolicy
from proxy.layer.envelopes import EnvelopeStore, MetadataEnvelopes
from proxy.layer.headers import (
    CHECKSUM_HEADERS,
    GET_PASS_HEADERS,
    SSE_HEADER,
    SSE_KEY_HEADER,
    sse_headers,
)
from proxy.layer.legacy import LegacyChecks
from proxy.layer.ranges import (
    ETAG_SUFFIX,
    ClientRange,
    backend_conditions,
    backend_etag,
    check_preconditions,
    client_etag,
    invalid_range,
    parse_range,
    precondition_failed,
    stored_range_for,
)
from proxy.layer.writes import ObjectWrites, PutResult
from proxy.metrics import Metrics

log = logging.getLogger(__name__)

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
class GetResult:
    status: int
    headers: CIMultiDict[str]
    body: AsyncGenerator[bytes | bytearray, None] | None
    content_length: int


class ObjectLayer(ObjectWrites, LegacyChecks):
    """PUT (``writes.py``), GET and HEAD of single objects."""

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
        self.envelopes: EnvelopeStore = envelopes or MetadataEnvelopes(backend)

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
        if resp.status == 304:
            # A 304 carries the backend's ETag and maybe no metadata: decide from the full
            # headers, in client form (the ETag a client sent may differ from the stored one).
            resp, _ = await self.backend.call("HEAD", bucket, key, query=query)
        env = await self.envelope(bucket, key, resp.headers)
        size = int(resp.headers.get("content-length", "0"))
        headers = self.response_headers(resp.headers, env)
        if check_preconditions(cond, headers) == 304:
            return GetResult(304, headers, None, 0)
        if env is not None:
            size = self.plaintext_size(size)
            if checksum_mode and env.checksum is not None:
                object_key = await self.object_key_for(bucket, key, env)
                headers.update(self._checksum_headers(bucket, key, object_key, env))
        else:
            await self._check_legacy(bucket, key, size, resp.headers, query)
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
                return await self._not_modified(bucket, key, rng, cond, query, guess_encrypted)
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
                result = await self._plaintext_result(bucket, key, resp, rng, headers, query)
            else:
                result = await self._decrypt_result(
                    bucket, key, resp, env, rng, headers, checksum_mode
                )
            keep_open = True
            return result
        finally:
            if not keep_open:
                resp.release()

    async def _not_modified(
        self,
        bucket: str,
        key: str,
        rng: ClientRange | None,
        cond: Mapping[str, str],
        query: tuple[tuple[str, str], ...],
        guess_encrypted: bool,
    ) -> GetResult | None:
        """The backend answered 304: answer it with the headers in client form (ETag with
        ``-c``, SSE headers), or - when the client's conditions, compared with client ETags,
        do not hold after all - read the object that was just matched."""
        head = await self.head_object(bucket, key, cond, query)
        if head.status == 304:
            return head
        etag = head.headers.get("etag")
        again = {"if-match": etag} if etag else {}
        return await self._get(bucket, key, rng, again, query, guess_encrypted=guess_encrypted)

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

    async def _plaintext_result(
        self,
        bucket: str,
        key: str,
        resp: Response,
        rng: ClientRange | None,
        headers: CIMultiDict[str],
        query: tuple[tuple[str, str], ...],
    ) -> GetResult:
        stored_size = stored_extent(resp)[0]
        legacy = await self._check_legacy(bucket, key, stored_size, resp.headers, query)
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
        resp: Response,
        env: crypto.Envelope,
        rng: ClientRange | None,
        headers: CIMultiDict[str],
        checksum_mode: bool = False,
    ) -> GetResult:
        # Stored offset and total stored size of what the backend sent.
        stored_total, stored_start = stored_extent(resp)
        plain_total = self.plaintext_size(stored_total)
        if env.pending:  # never read with an upload's envelope (``envelope`` resolves it)
            self.metrics.integrity_failures.inc()
            raise IntegrityError("multipart object without its completed envelope")
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
        try:
            decryptor = crypto.StreamDecryptor(
                object_key,
                multipart=env.multipart,
                first_segment=plan.first_segment,
                last_segment=plan.last_segment,
                total_segments=total_segments,
                layout=env.layout,
            )
        except IntegrityError:
            self.metrics.integrity_failures.inc()
            raise
        body = self._decrypt_body(resp, decryptor, plan, plan.ct_start - stored_start)
        return GetResult(status, headers, body, plan.length)

    async def _decrypt_body(
        self,
        resp: Response,
        decryptor: crypto.StreamDecryptor,
        plan: crypto.SegmentRange,
        discard: int,
    ) -> AsyncGenerator[bytes | bytearray, None]:
        need = plan.ct_end - plan.ct_start + 1
        skip = plan.skip
        remaining = plan.length
        # One buffer per body, read into again and again (the socket reads land in it
        # directly: Body.readinto); the decryptor is done with it when update returns.
        buf = memoryview(bytearray(min(READ_CHUNK, need + discard)))
        try:
            while discard:
                n = await resp.content.readinto(buf[: min(discard, len(buf))])
                if not n:
                    break
                discard -= n
            while need:
                n = await resp.content.readinto(buf[: min(need, len(buf))])
                if not n:
                    break
                need -= n
                plain = decryptor.update(buf[:n])
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
            data_key = await self.keys.unwrap(
                env.kek_uri, env.wrapped_data_key, bucket, env.replicas
            )
        except (KeyUnavailableError, IntegrityError):
            self.envelopes.invalidate(bucket, key)  # a rewrap may have replaced it
            raise
        try:
            return crypto.open_object_key(
                data_key,
                env.sealed_object_key,
                env.binding(bucket, key),
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
            env = await self.envelopes.read(bucket, key, headers)
            if (env is None and self.envelopes.kind == "sidecar") or (
                env is not None and env.pending
            ):
                found = await self.envelopes.recover(
                    bucket, key, headers, lambda found: self.object_key_for(bucket, key, found)
                )
                if env is not None and found is None:
                    raise IntegrityError(
                        "this multipart object has no completed envelope: its upload was "
                        "completed without cmek-proxy, or a Complete that rewrites its parts "
                        "is unfinished (retry the CompleteMultipartUpload)"
                    )
                env = found
            return env
        except (FormatError, IntegrityError):
            self.metrics.integrity_failures.inc()
            raise

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
