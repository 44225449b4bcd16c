"""A small streaming S3 client for the real object store behind the proxy.

It signs every request with ``proxy.wire.sigv4`` (the same canonicalisation the
front end verifies with), never buffers bodies (request bodies are async
iterables with a known Content-Length; response bodies are read by the caller),
and maps transport failures to ``BackendUnavailable``.  Its HTTP is its own:
connections in ``proxy.backend.pool`` (``asyncio.Protocol``), responses in
``proxy.backend.http`` (httptools); a failure reading a body raises an ``HttpError``
(or ``TimeoutError``).  It knows nothing of
encryption.  Each request is timed until its response headers: by S3 operation in
``cmek_backend_request_duration_seconds`` and in the current request's backend time
(``proxy.reqctx``) that the access log reports.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from urllib.parse import quote

from yarl import URL

from proxy import reqctx
from proxy.backend.http import HttpError, Response, build_head
from proxy.backend.pool import Pool
from proxy.config import Backend as BackendConfig
from proxy.errors import FormatError, S3Error
from proxy.metrics import Metrics
from proxy.wire.operations import operation_name
from proxy.wire.sigv4 import Credentials, SigningKeyCache, sign_headers
from proxy.wire.xmldoc import child_text, parse_backend

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

Body = bytes | AsyncIterable[bytes | bytearray] | None

COALESCE_BYTES = 256 * 1024
"""A streamed body of at most this many bytes is gathered and sent as one bytes payload.

The request line, headers and body then go out in one socket write, without a write per
chunk of the stream.  Memory stays bounded by this size; an error raised by the body's
iterator surfaces before anything is sent.
"""


def aws_quote(value: str, safe: str = "~") -> str:
    """AWS URI encoding: unreserved characters kept, everything else %XX (UTF-8)."""
    return quote(value, safe=safe)


def encode_query(query: Sequence[tuple[str, str]]) -> str:
    return "&".join(
        f"{aws_quote(k)}={aws_quote(v)}" if v != "" else f"{aws_quote(k)}=" for k, v in query
    )


class BackendUnavailable(S3Error):
    """The backend could not be reached: the client gets 503 and may retry."""

    def __init__(self, message: str) -> None:
        super().__init__("ServiceUnavailable", message, 503)


def parse_error(status: int, body: bytes) -> S3Error:
    """Turn a backend error response into the S3Error the client should see."""
    code, message = "", ""
    if body:
        try:
            root = parse_backend(body)
            code = child_text(root, "Code")
            message = child_text(root, "Message")
        except FormatError:
            pass  # not an S3 XML error body: the code is derived from the status below
    if not code:
        code = {
            400: "InvalidRequest",
            403: "AccessDenied",
            404: "NoSuchKey",
            405: "MethodNotAllowed",
            409: "Conflict",
            412: "PreconditionFailed",
            416: "InvalidRange",
            501: "NotImplemented",
            503: "ServiceUnavailable",
        }.get(status, "InternalError")
    if status == 501 and code == "NotImplemented":
        # An operation this backend lacks (rclone: ListObjectVersions): S3 answers it the
        # same way, and no client retries it, so it passes as the backend gave it.
        return S3Error(code, "the backend object store does not implement this operation", 501)
    if status >= 500:
        # Never leak backend internals; clients retry 5xx.
        return S3Error(
            "ServiceUnavailable" if status == 503 else "InternalError",
            "the backend object store failed",
            503 if status == 503 else 500,
        )
    return S3Error(code, message or code, status)


async def _gather(body: AsyncIterable[bytes | bytearray], length: int) -> bytes:
    """The whole of a small streamed body, which must be exactly ``length`` bytes.

    A body of another length is never sent (the backend would wait for bytes that never
    come, or store a cut one): it is a 500 for the client.
    """
    parts: list[bytes | bytearray] = []
    got = 0
    async for chunk in body:
        got += len(chunk)
        if got > length:
            break
        parts.append(chunk)
    if got != length:
        raise S3Error("InternalError", "the stored body differs from its length", 500)
    return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)


async def _exact(
    body: AsyncIterable[bytes | bytearray], length: int
) -> AsyncIterator[bytes | bytearray]:
    """A large streamed body, checked to be exactly ``length`` bytes.

    The excess of a longer body is never sent and a short end raises, so the request is
    aborted (its connection closed mid-body) and nothing is stored.
    """
    got = 0
    async for chunk in body:
        got += len(chunk)
        if got > length:
            raise S3Error("InternalError", "the stored body differs from its length", 500)
        yield chunk
    if got != length:
        raise S3Error("InternalError", "the stored body differs from its length", 500)


class BackendClient:
    """Signed, streaming requests to one S3-compatible endpoint."""

    def __init__(
        self,
        cfg: BackendConfig,
        session: Pool,
        metrics: Metrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.session = session
        self.metrics = metrics
        self._creds = Credentials(cfg.access_key, cfg.secret_key)
        self._base = URL(cfg.endpoint)
        self._key_cache = SigningKeyCache(16)
        base = self._base
        self._scheme = base.scheme
        self._port = base.port or (443 if base.scheme == "https" else 80)
        self._netport = f":{base.port}" if base.port and not base.is_default_port() else ""

    @staticmethod
    def make_session(cfg: BackendConfig) -> Pool:
        """The connection pool for ``cfg``'s endpoint (closed with ``await pool.close()``)."""
        ssl_ctx: ssl.SSLContext | None = None
        if URL(cfg.endpoint).scheme == "https":
            if not cfg.verify_tls:
                ssl_ctx = ssl.create_default_context()
                ssl_ctx.check_hostname = False
                ssl_ctx.verify_mode = ssl.CERT_NONE
            elif cfg.ca_bundle is not None:
                ssl_ctx = ssl.create_default_context(cafile=str(cfg.ca_bundle))
            else:
                ssl_ctx = ssl.create_default_context()
        return Pool(
            cfg.max_connections,
            connect_timeout=cfg.connect_timeout,
            read_timeout=cfg.read_timeout,
            ssl_context=ssl_ctx,
        )

    def target_for(
        self, bucket: str | None, key: str | None, query: Sequence[tuple[str, str]]
    ) -> tuple[str, str]:
        """(host, request target: path and query) of a request."""
        path = self._base.raw_path.rstrip("/")
        host = self._base.raw_host or ""
        if bucket and self.cfg.addressing == "virtual":
            host = f"{bucket}.{host}"
            path += "/" + (aws_quote(key, safe="/~") if key else "")
        elif bucket:
            path += "/" + aws_quote(bucket)
            if key is not None:
                path += "/" + aws_quote(key, safe="/~")
        else:
            path += "/"
        q = encode_query(sorted(query)) if query else ""
        return host, path + (f"?{q}" if q else "")

    def url_for(self, bucket: str | None, key: str | None, query: Sequence[tuple[str, str]]) -> str:
        host, target = self.target_for(bucket, key, query)
        return f"{self._scheme}://{host}{self._netport}{target}"

    async def request(
        self,
        method: str,
        bucket: str | None = None,
        key: str | None = None,
        *,
        query: Sequence[tuple[str, str]] = (),
        headers: Mapping[str, str] | None = None,
        body: Body = None,
        content_length: int | None = None,
        payload_hash: str | None = None,
    ) -> Response:
        """Send one signed request. The caller reads and releases the response."""
        host, target = self.target_for(bucket, key, query)
        url = f"{self._scheme}://{host}{self._netport}{target}"
        hdrs = {k.lower(): v for k, v in (headers or {}).items()}
        if body is None:
            payload = payload_hash or EMPTY_SHA256
            if method in ("PUT", "POST"):
                hdrs["content-length"] = "0"
        elif isinstance(body, bytes):
            payload = payload_hash or UNSIGNED_PAYLOAD
            hdrs["content-length"] = str(len(body))
        else:
            if content_length is None:
                raise ValueError("streamed backend bodies need a content length")
            payload = payload_hash or UNSIGNED_PAYLOAD
            hdrs["content-length"] = str(content_length)
            if content_length <= COALESCE_BYTES:
                body = await _gather(body, content_length)
            else:
                body = _exact(body, content_length)
        hdrs.update(
            sign_headers(
                method,
                url,
                hdrs,
                payload,
                self._creds,
                self.cfg.region,
                "s3",
                now=datetime.now(UTC),
                key_cache=self._key_cache,
            )
        )
        started = time.perf_counter()
        status = "unreachable"
        try:
            resp = await self.session.request(
                (self._scheme, host, self._port), method, build_head(method, target, hdrs), body
            )
            status = str(resp.status)
            return resp
        except (HttpError, TimeoutError) as exc:
            raise BackendUnavailable(f"backend unreachable: {type(exc).__name__}") from exc
        finally:
            took = time.perf_counter() - started
            reqctx.add_backend(took)
            if self.metrics is not None:
                op = operation_name(
                    method,
                    bucket=bool(bucket),
                    key=key is not None,
                    query={k for k, _ in query},
                    headers=hdrs,
                )
                self.metrics.observe_backend(op, status, took)

    async def call(
        self,
        method: str,
        bucket: str | None = None,
        key: str | None = None,
        *,
        query: Sequence[tuple[str, str]] = (),
        headers: Mapping[str, str] | None = None,
        body: Body = None,
        content_length: int | None = None,
        ok: Sequence[int] = (200, 204),
    ) -> tuple[Response, bytes]:
        """A request whose (small) response body is read whole; errors raised as S3Error."""
        resp = await self.request(
            method,
            bucket,
            key,
            query=query,
            headers=headers,
            body=body,
            content_length=content_length,
        )
        try:
            data = await resp.read()
        except (HttpError, TimeoutError) as exc:
            raise BackendUnavailable(f"backend read failed: {type(exc).__name__}") from exc
        finally:
            resp.release()
        if resp.status not in ok:
            raise parse_error(resp.status, data)
        return resp, data
