"""Who is asking, and what is the body really: SigV4 verification and body decoding.

``Authenticator.authenticate`` verifies the signature (header or presigned URL)
before anything else happens.  ``plaintext_body`` turns the request body into an
async iterator of the object's bytes: aws-chunked framing removed, chunk
signatures verified before a chunk is released, the signed payload hash and every
checksum the client sent (header or trailer) verified at the end.  The iterator
raises instead of ending when a check fails, and since the encryption layer sends
the final segment only after the iterator ended, a body that fails a check never
becomes a stored object.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from aiohttp import web

from proxy import reqctx
from proxy.errors import S3Error
from proxy.wire import checksums
from proxy.wire.chunked import AwsChunkedDecoder
from proxy.wire.sigv2 import is_presigned_v2, verify_presigned_v2
from proxy.wire.sigv4 import (
    Credentials,
    PayloadMode,
    RequestView,
    SigningKeyCache,
    VerifiedAuth,
    verify_request,
)

READ_CHUNK = 1024 * 1024


@dataclass
class VerifiedRequest:
    auth: VerifiedAuth
    verified_checksums: dict[str, str] = field(default_factory=dict)
    """``x-amz-checksum-*`` name -> base64 value the client sent and the body matched."""

    def checksum_headers(self) -> dict[str, str]:
        return dict(self.verified_checksums)


class Authenticator:
    def __init__(
        self,
        lookup: Callable[[str], Credentials | None],
        *,
        region: str,
        max_skew: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        virtual_host_domain: str | None = None,
    ) -> None:
        self._lookup = lookup
        self._vhost_suffix = "." + virtual_host_domain.lower() if virtual_host_domain else None
        self._region = region
        self._max_skew = timedelta(seconds=max_skew)
        self._clock = clock
        self._keys = SigningKeyCache(256)

    async def authenticate(self, request: web.Request) -> VerifiedRequest:
        view = RequestView(
            method=request.method,
            raw_path=request.rel_url.raw_path,
            raw_query=request.rel_url.raw_query_string,
            headers=request.headers,
        )
        ctx = reqctx.current()
        try:
            if is_presigned_v2(view):  # boto3's default presigned URLs: SigV2 query auth
                auth = verify_presigned_v2(
                    view, self._lookup, now=self._clock(), bucket_from_host=self._bucket(request)
                )
            else:
                auth = verify_request(
                    view,
                    self._lookup,
                    now=self._clock(),
                    max_skew=self._max_skew,
                    region=self._region,
                    key_cache=self._keys,
                )
        except S3Error:
            if ctx is not None:
                ctx.auth_failed = True  # the access log names the key id and the reason
            raise
        if ctx is not None:
            ctx.access_key = auth.access_key
        return VerifiedRequest(auth)

    def _bucket(self, request: web.Request) -> str | None:
        """The bucket a virtual-host-style request names in its Host (as the router reads it)."""
        if self._vhost_suffix is None:
            return None
        host = (request.host or "").split(":")[0].lower()
        return host[: -len(self._vhost_suffix)] if host.endswith(self._vhost_suffix) else None

    async def small_body(self, request: web.Request, v: VerifiedRequest, limit: int) -> bytes:
        """Read a small body whole (XML documents), verified like any other."""
        body, _ = self.plaintext_body(request, v, allow_unknown_length=True)
        parts = []
        size = 0
        async for chunk in body:
            size += len(chunk)
            if size > limit:
                raise S3Error("EntityTooLarge", "request body too large", 400)
            parts.append(chunk)
        return b"".join(parts)

    def plaintext_body(
        self, request: web.Request, v: VerifiedRequest, *, allow_unknown_length: bool = False
    ) -> tuple[AsyncIterator[bytes], int]:
        mode = v.auth.payload_mode
        headers = request.headers
        if mode.is_streaming:
            declared = headers.get("x-amz-decoded-content-length")
            if declared is None or not declared.isdigit():
                raise S3Error(
                    "MissingContentLength",
                    "You must provide the x-amz-decoded-content-length header",
                    411,
                )
            length = int(declared)
        else:
            if request.content_length is None:
                if not allow_unknown_length and request.method in ("PUT", "POST"):
                    raise S3Error(
                        "MissingContentLength",
                        "You must provide the Content-Length HTTP header.",
                        411,
                    )
                length = 0
            else:
                length = request.content_length
        expected = checksums.from_headers(headers)
        return self._body(request, v, mode, length, expected), length

    async def _body(
        self,
        request: web.Request,
        v: VerifiedRequest,
        mode: PayloadMode,
        length: int,
        expected: checksums.Expected,
    ) -> AsyncIterator[bytes]:
        hashers = expected.hashers()
        sha = hashlib.sha256() if mode is PayloadMode.SHA256 else None
        decoder = (
            AwsChunkedDecoder(
                mode,
                signing=v.auth.chunk_signing() if mode.is_signed_streaming else None,
                decoded_length=length,
                trailer_names=expected.trailer_names(),
            )
            if mode.is_streaming
            else None
        )
        async for raw in request.content.iter_chunked(READ_CHUNK):
            pieces = decoder.feed(raw) if decoder is not None else [raw]
            for piece in pieces:
                if sha is not None:
                    sha.update(piece)
                for h in hashers:
                    h.update(piece)
                yield piece
        trailers: dict[str, str] = {}
        if decoder is not None:
            trailers = dict(decoder.finish())
        if sha is not None and not hmac.compare_digest(sha.hexdigest(), v.auth.payload_hash):
            raise S3Error(
                "XAmzContentSHA256Mismatch",
                "The provided 'x-amz-content-sha256' header does not match what was computed.",
                400,
            )
        v.verified_checksums = expected.verify(hashers, trailers)
