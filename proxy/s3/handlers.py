"""Thin S3 handlers: parse the HTTP request, call the object layer, format the answer."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aiohttp import web
from multidict import CIMultiDict

from proxy.backend.client import BackendClient, parse_error
from proxy.errors import FormatError, IntegrityError, S3Error
from proxy.layer.attributes import Attributes
from proxy.layer.cleanup import deleted_keys, forget_deleted, purge_reserved
from proxy.layer.copy import CopyLayer
from proxy.layer.multipart import MultipartLayer
from proxy.layer.objects import GetResult, ObjectLayer
from proxy.layer.part_reads import PartReader
from proxy.layer.unsized import put_unsized
from proxy.s3.auth import Authenticator, VerifiedRequest
from proxy.s3.listing import rewrite_listing
from proxy.s3.routing import Target

log = logging.getLogger(__name__)

MAX_SMALL_BODY = 1024 * 1024
COND_HEADERS = ("if-match", "if-none-match", "if-modified-since", "if-unmodified-since")

# Subresources passed to the backend as they are: configuration, no object data.
BUCKET_PASS = frozenset(
    {
        "location",
        "versioning",
        "tagging",
        "cors",
        "lifecycle",
        "policy",
        "acl",
        "ownershipControls",
        "publicAccessBlock",
        "logging",
        "notification",
        "accelerate",
        "requestPayment",
        "website",
        "object-lock",
        "policyStatus",
    }
)
OBJECT_PASS = frozenset({"tagging", "acl", "retention", "legal-hold"})
# Refused on purpose: they would expose or operate on ciphertext.
REFUSED = {
    "select": "S3 Select would run over ciphertext",
    "torrent": "torrents would serve ciphertext",
    "encryption": "bucket default encryption is managed by cmek-proxy",
}


def _cond(request: web.Request) -> dict[str, str]:
    return {h: request.headers[h] for h in COND_HEADERS if h in request.headers}


def _query_pass(target: Target, drop: tuple[str, ...] = ()) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in target.query if k not in drop)


class S3Handlers:
    def __init__(self, objects: ObjectLayer, backend: BackendClient, auth: Authenticator) -> None:
        self.objects = objects
        self.backend = backend
        self.auth = auth
        self.multipart = MultipartLayer(objects)
        self.copies = CopyLayer(objects, self.multipart)
        self.parts = PartReader(objects)
        self.attributes = Attributes(objects, self.parts)

    async def dispatch(self, request: web.Request, target: Target) -> web.StreamResponse:
        verified = await self.auth.authenticate(request)
        for sub, why in REFUSED.items():
            if target.has(sub) and not (sub == "encryption" and request.method == "GET"):
                raise S3Error("NotImplemented", f"cmek-proxy refuses this on purpose: {why}", 501)
        m = request.method
        if target.bucket is None:
            if m == "GET":
                return await self._passthrough(request, target, verified)
            raise S3Error("MethodNotAllowed", "The specified method is not allowed", 405)
        if target.key is None:
            return await self._bucket(request, target, verified)
        return await self._object(request, target, verified)

    # ------------------------------------------------------------------ buckets
    async def _bucket(
        self, request: web.Request, t: Target, v: VerifiedRequest
    ) -> web.StreamResponse:
        m = request.method
        assert t.bucket is not None
        if any(t.has(s) for s in BUCKET_PASS):
            return await self._passthrough(request, t, v)
        if m == "GET" and (t.has("uploads")):
            return await self._passthrough(request, t, v)
        if m == "GET":
            return await self._list(request, t)
        if m == "DELETE" and not t.query:
            await purge_reserved(self.backend, self.objects.envelopes, t.bucket)
            return await self._passthrough(request, t, v)
        if m in ("PUT", "HEAD") and not t.query:
            return await self._passthrough(request, t, v)
        if m == "POST" and t.has("delete"):
            body = await self.auth.small_body(request, v, MAX_SMALL_BODY)
            resp = await self._passthrough(request, t, v, body)
            if isinstance(resp.body, bytes):  # the envelopes of the deleted objects go too
                keys = deleted_keys(body, resp.body)
                await forget_deleted(self.objects.envelopes, t.bucket, keys)
            return resp
        raise S3Error("NotImplemented", "This bucket operation is not supported", 501)

    async def _list(self, request: web.Request, t: Target) -> web.StreamResponse:
        assert t.bucket is not None
        _, body = await self.backend.call("GET", t.bucket, query=t.query)
        url_encoded = t.get("encoding-type") == "url"
        out = rewrite_listing(body, t.bucket, self.objects.policy, url_encoded)
        return web.Response(body=out, content_type="application/xml")

    async def _passthrough(
        self, request: web.Request, t: Target, v: VerifiedRequest, body: bytes | None = None
    ) -> web.Response:
        """Forward a small, data-free request (bucket ops, configuration, tagging)."""
        if body is None:
            body = await self.auth.small_body(request, v, MAX_SMALL_BODY)
        headers = {
            k: request.headers[k]
            for k in (
                "content-type",
                "content-md5",
                "x-amz-acl",
                "x-amz-tagging",
                "x-amz-expected-bucket-owner",
                "x-amz-bucket-object-lock-enabled",
                "x-amz-object-ownership",
                "x-amz-checksum-crc32",
                "x-amz-checksum-crc32c",
                "x-amz-checksum-sha256",
                "x-amz-checksum-sha1",
                "x-amz-checksum-crc64nvme",
                "x-amz-sdk-checksum-algorithm",
            )
            if k in request.headers
        }
        resp, data = await self.backend.call(
            request.method,
            t.bucket,
            t.key,
            query=t.query,
            headers=headers,
            body=body if body or request.method in ("PUT", "POST") else None,
            ok=(200, 204, 206),
        )
        out_headers = {
            k: resp.headers[k]
            for k in (
                "content-type",
                "location",
                "x-amz-bucket-region",
                "x-amz-version-id",
                "x-amz-delete-marker",
            )
            if k in resp.headers
        }
        if request.method == "HEAD":
            return web.Response(status=resp.status, headers=out_headers)
        return web.Response(status=resp.status, body=data, headers=out_headers)

    # ------------------------------------------------------------------ objects
    async def _object(
        self, request: web.Request, t: Target, v: VerifiedRequest
    ) -> web.StreamResponse:
        assert t.bucket is not None and t.key is not None
        m = request.method
        if any(t.has(s) for s in OBJECT_PASS):
            return await self._passthrough(request, t, v)
        if m == "PUT" and not t.query and "x-amz-copy-source" not in request.headers:
            return await self._put(request, t, v)
        if t.has("uploads") or t.has("uploadId"):
            return await self._multipart(request, t, v)
        if m == "PUT" and "x-amz-copy-source" in request.headers and not t.query:
            await self.auth.small_body(request, v, MAX_SMALL_BODY)
            doc, headers = await self.copies.copy_object(t.bucket, t.key, request.headers)
            return _xml(doc, headers)
        if m == "GET" and t.has("attributes") and not _has_unknown(t, ("versionId", "attributes")):
            doc, headers = await self.attributes.get(t.bucket, t.key, request.headers, t.query)
            return _xml(doc, headers)
        if m == "GET" and not _has_unknown(t, ("versionId", "partNumber", *_RESPONSE_OVERRIDES)):
            return await self._get(request, t, head=False)
        if m == "HEAD" and not _has_unknown(t, ("versionId", "partNumber")):
            return await self._get(request, t, head=True)
        if m == "DELETE" and not _has_unknown(t, ("versionId",)):
            resp = await self._passthrough(request, t, v)
            if not t.has("versionId"):
                await self.objects.envelopes.forget(t.bucket, t.key)
            return resp
        raise S3Error("NotImplemented", "This object operation is not supported yet", 501)

    async def _put(self, request: web.Request, t: Target, v: VerifiedRequest) -> web.StreamResponse:
        assert t.bucket is not None and t.key is not None
        if (
            request.content_length is None
            and "chunked" in request.headers.get("transfer-encoding", "").lower()
            and not v.auth.payload_mode.is_streaming
        ):
            body, _ = self.auth.plaintext_body(request, v, allow_unknown_length=True)
            res = await put_unsized(
                self.multipart, t.bucket, t.key, request.headers, body, lambda: v.verified_checksums
            )
        else:
            body, length = self.auth.plaintext_body(request, v)
            res = await self.objects.put_object(
                t.bucket, t.key, request.headers, body, length, lambda: v.verified_checksums
            )
        headers = dict(res.headers)
        if res.etag:
            headers["etag"] = res.etag
        for name, value in v.checksum_headers().items():
            headers[name] = value
        return web.Response(status=200, headers=headers)

    async def _multipart(
        self, request: web.Request, t: Target, v: VerifiedRequest
    ) -> web.StreamResponse:
        assert t.bucket is not None and t.key is not None
        m, mp, upload_id = request.method, self.multipart, t.get("uploadId") or ""
        if m == "POST" and t.has("uploads"):
            await self.auth.small_body(request, v, MAX_SMALL_BODY)
            doc, headers = await mp.create(t.bucket, t.key, request.headers)
            return _xml(doc, headers)
        if m == "PUT" and "x-amz-copy-source" in request.headers:
            await self.auth.small_body(request, v, MAX_SMALL_BODY)
            doc = await self.copies.upload_part_copy(
                t.bucket, t.key, upload_id, t.get("partNumber"), request.headers
            )
            return _xml(doc, {})
        if m == "PUT":
            body, length = self.auth.plaintext_body(request, v)
            res = await mp.upload_part(
                t.bucket, t.key, upload_id, t.get("partNumber"), body, length
            )
            headers = {**res.headers, **v.checksum_headers()}
            if res.etag:
                headers["etag"] = res.etag
            return web.Response(status=200, headers=headers)
        if m == "POST":
            xml = await self.auth.small_body(request, v, MAX_SMALL_BODY)
            doc, headers = await mp.complete(t.bucket, t.key, upload_id, xml, request.headers)
            return _xml(doc, headers)
        if m == "DELETE":
            await mp.abort(t.bucket, t.key, upload_id)
            return web.Response(status=204)
        if m == "GET":
            return _xml(await mp.list_parts(t.bucket, t.key, upload_id, t.query), {})
        raise S3Error("NotImplemented", "This multipart operation is not supported", 501)

    async def _get(self, request: web.Request, t: Target, *, head: bool) -> web.StreamResponse:
        assert t.bucket is not None and t.key is not None
        query = _query_pass(t, _RESPONSE_OVERRIDES)
        mode = request.headers.get("x-amz-checksum-mode", "").upper() == "ENABLED"
        part = t.get("partNumber")
        if part is not None:
            query = tuple(kv for kv in query if kv[0] != "partNumber")
            res = await self.parts.read(t.bucket, t.key, part, _cond(request), query, head=head)
        elif head:
            res = await self.objects.head_object(
                t.bucket, t.key, _cond(request), query, checksum_mode=mode
            )
        else:
            res = await self.objects.get_object(
                t.bucket,
                t.key,
                request.headers.get("range"),
                _cond(request),
                query,
                checksum_mode=mode,
            )
        _apply_overrides(res.headers, t)
        if res.status == 304:
            return web.Response(status=304, headers=res.headers)
        if head:
            head_resp = web.StreamResponse(status=res.status, headers=res.headers)
            head_resp.content_length = res.content_length
            await head_resp.prepare(request)
            await head_resp.write_eof()
            return head_resp
        return await stream_result(request, res)


_RESPONSE_OVERRIDES = (
    "response-content-type",
    "response-content-language",
    "response-expires",
    "response-cache-control",
    "response-content-disposition",
    "response-content-encoding",
)


def _xml(doc: bytes, headers: Mapping[str, str]) -> web.Response:
    return web.Response(body=doc, content_type="application/xml", headers=dict(headers))


def _has_unknown(t: Target, allowed: tuple[str, ...]) -> bool:
    return any(k not in allowed and not k.startswith("X-Amz-") for k, _ in t.query)


def _apply_overrides(headers: CIMultiDict[str], t: Target) -> None:
    for name in _RESPONSE_OVERRIDES:
        value = t.get(name)
        if value is not None:
            headers[name[len("response-") :]] = value


async def stream_result(request: web.Request, res: GetResult) -> web.StreamResponse:
    """Send a GET result; on an integrity failure mid-stream, cut the connection."""
    resp = web.StreamResponse(status=res.status, headers=res.headers)
    resp.content_length = res.content_length
    assert res.body is not None
    body = res.body
    pending: list[bytes] = []
    try:
        first = await anext(body, None)  # errors before any byte go out as XML
        if first is not None:
            pending.append(first)
        if first is None or len(first) == res.content_length:
            # The whole (small) body is here: let the stream finish its checks, then send
            # headers and body in one write instead of three.
            extra = await anext(body, None)
            if extra is None:
                await body.aclose()
                return web.Response(status=res.status, headers=res.headers, body=first or b"")
            pending.append(extra)
    except BaseException:
        await body.aclose()
        raise
    await resp.prepare(request)
    try:
        for chunk in pending:
            await resp.write(chunk)
        async for chunk in body:
            await resp.write(chunk)
    except (IntegrityError, FormatError, S3Error) as exc:
        log.warning("aborting response for %s: %s", request.path, type(exc).__name__)
        if request.transport is not None:
            request.transport.close()
        return resp
    finally:
        await body.aclose()
    await resp.write_eof()
    return resp


__all__ = ["S3Handlers", "parse_error", "stream_result"]
