"""The write half of the encryption layer: PUT with envelope encryption, streamed.

Plaintext arrives as an async iterator already de-framed and verified by the S3 front end;
it leaves as segments of ciphertext in one streaming backend request whose final segment is
released only after the body verified, so a failed check never becomes a stored object.
``ObjectLayer`` (``objects.py``) adds the read half.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Final

from proxy import crypto
from proxy.backend.client import BackendClient, BackendUnavailable, parse_error
from proxy.backend.http import HttpError
from proxy.errors import S3Error
from proxy.kms.keys import KeyService
from proxy.layer.checksum_store import StoredChecksum, seal_checksum
from proxy.layer.decision import Decision, KeyPolicy
from proxy.layer.envelopes import EnvelopeStore
from proxy.layer.headers import (
    client_storable_headers,
    copy_source,
    sse_headers,
)
from proxy.layer.ranges import (
    backend_etag,
    client_etag,
)
from proxy.metrics import Metrics
from proxy.wire import checksums

RULE_HEADER: Final = "x-cmek-rule"
"""Which policy rule decided how a written object was stored (debugging aid, bounded values)."""


@dataclass
class PutResult:
    etag: str | None
    headers: dict[str, str] = field(default_factory=dict)


class _BodyFailure:
    """Holds an error raised while streaming a request body to the backend."""

    def __init__(self) -> None:
        self.error: BaseException | None = None


class ObjectWrites:
    """PUT, envelope updates and the streaming encryptor of ``ObjectLayer``."""

    backend: BackendClient
    keys: KeyService
    policy: KeyPolicy
    metrics: Metrics
    envelopes: EnvelopeStore

    async def put_object(
        self,
        bucket: str,
        key: str,
        headers: Mapping[str, str],
        body: AsyncIterator[bytes | bytearray],
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
            res = await self.send_put(bucket, key, out_headers, body, length, encrypted=False)
            await self._replaced(bucket, key, None, res)
            # counted once stored: a PUT the backend refused (NoSuchBucket) wrote nothing
            self.metrics.passthrough_writes.labels(rule=decision.rule).inc()
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
            kek_uri=dk.kek_uri or decision.key_uri,
            kek_version=dk.key_version,
            wrapped_data_key=dk.wrapped,
            replicas=dk.replicas,
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
        await self._replaced(bucket, key, final_envelope(), res)
        res.headers.update(sse_headers(decision.key_uri))
        res.headers[RULE_HEADER] = decision.rule
        return res

    async def _replaced(
        self, bucket: str, key: str, env: crypto.Envelope | None, res: PutResult
    ) -> None:
        """A PUT committed: the envelopes of the versions it replaced go (sidecar store)."""
        if res.etag is not None:
            await self.envelopes.committed(bucket, key, env, backend_etag(res.etag))

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
        body: AsyncIterator[bytes | bytearray],
        length: int,
        part: int = 0,
        *,
        before_final: Callable[[str], Awaitable[None]] | None = None,
    ) -> AsyncIterator[bytes | bytearray]:
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
            # Sealed on the event loop: since segments are sealed into one buffer per chunk,
            # handing chunks to a thread cost more CPU than it overlapped (PUT ~0.96 against
            # ~0.72 s/GiB, throughput the same: benchmarks/README.md, "Cipher on the loop").
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
        body: AsyncIterator[bytes | bytearray],
        length: int,
        *,
        encrypted: bool,
        query: tuple[tuple[str, str], ...] = (),
    ) -> PutResult:
        failure = _BodyFailure()

        async def guarded() -> AsyncIterator[bytes | bytearray]:
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
        except (BackendUnavailable, HttpError) as exc:
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
