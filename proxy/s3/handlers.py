"""Thin S3 handlers: parse the HTTP request, call the object layer, format the answer."""

from __future__ import annotations

import email.utils
import logging
from collections.abc import Mapping

from aiohttp import web
from multidict import CIMultiDict

from proxy.backend.client import BackendClient, parse_error
from proxy.errors import FormatError, IntegrityError, S3Error
from proxy.layer.attributes import Attributes
from proxy.layer.cleanup import forget_deleted, purge_reserved
from proxy.layer.copy import CopyLayer, parse_copy_source
from proxy.layer.multipart import MultipartLayer
from proxy.layer.objects import GetResult, ObjectLayer
from proxy.layer.part_reads import PartReader
from proxy.layer.unsized import put_unsized
from proxy.s3.auth import Authenticator, VerifiedRequest
from proxy.s3.delete_objects import DeleteOutcome, delete_objects
from proxy.s3.listing import TokenSealer, list_bucket
from proxy.s3.routing import Target
from proxy.wire.names import check_bucket, check_key
from proxy.wire.xmldoc import local, malformed_xml, parse_client

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
# Subresources that name another operation: never read as a listing of the bucket.
NOT_A_LISTING = frozenset({"delete", "uploadId", "partNumber", "restore", "select", "uploads"})


def _cond(request: web.Request) -> dict[str, str]:
    """The request's conditions; a date condition that is no HTTP-date is ignored, as
    RFC 9110 (13.1.3, 13.1.4) and S3 do (a backend may answer it with a 500)."""
    out = {}
    for h in COND_HEADERS:
        value = request.headers.get(h)
        if value is None:
            continue
        if h.endswith("-since") and not _is_http_date(value):
            continue
        out[h] = value
    return out


def _is_http_date(value: str) -> bool:
    try:
        return email.utils.parsedate_to_datetime(value) is not None
    except (TypeError, ValueError, IndexError):
        return False


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
        self.tokens = TokenSealer(backend.cfg.secret_key)
        self.attributes = Attributes(objects, self.parts)

    async def dispatch(self, request: web.Request, target: Target) -> web.StreamResponse:
        verified = await self.auth.authenticate(request)
        check_counts(target)
        source = request.headers.get("x-amz-copy-source")
        if source is not None and request.method == "PUT" and target.key is not None:
            src = parse_copy_source(source)  # the same rules as the bucket and key written
            check_bucket(src.bucket)
            check_key(src.key)
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
            return await self._list(request, t)
        if m == "GET" and not any(t.has(s) for s in NOT_A_LISTING):
            return await self._list(request, t)
        if m == "DELETE" and not t.query:
            await purge_reserved(self.backend, self.objects.envelopes, t.bucket)
            return await self._passthrough(request, t, v)
        if m in ("PUT", "HEAD") and not t.query:
            return await self._passthrough(request, t, v)
        if m == "POST" and t.has("delete"):
            outcome = await self._delete_objects(request, t, v)
            # The envelopes of the deleted objects go too (deleting one version of an object
            # leaves the others, and their envelopes).
            gone = [d.key for d in outcome.deleted if not d.version_id]
            await forget_deleted(self.objects.envelopes, t.bucket, gone)
            return _xml(outcome.document, {})
        if m == "GET":
            raise S3Error("MethodNotAllowed", "The specified method is not allowed", 405)
        raise S3Error("NotImplemented", "This bucket operation is not supported", 501)

    async def _delete_objects(
        self, request: web.Request, t: Target, v: VerifiedRequest
    ) -> DeleteOutcome:
        """DeleteObjects; ``outcome.deleted`` is what the backend reports deleted."""
        assert t.bucket is not None
        body = await self.auth.small_body(request, v, MAX_SMALL_BODY)
        return await delete_objects(self.backend, t.bucket, body)

    async def _list(self, request: web.Request, t: Target) -> web.StreamResponse:
        assert t.bucket is not None
        bucket = t.bucket

        async def fetch(query: tuple[tuple[str, str], ...]) -> bytes:
            _, body = await self.backend.call("GET", bucket, query=query)
            return body

        out = await list_bucket(
            fetch, t.query, bucket=bucket, policy=self.objects.policy, tokens=self.tokens
        )
        return web.Response(body=out, content_type="application/xml")

    async def _passthrough(
        self, request: web.Request, t: Target, v: VerifiedRequest
    ) -> web.StreamResponse:
        """Forward a small, data-free request (bucket ops, configuration, tagging).

        Only PUT and POST carry a body: GET, HEAD and DELETE never wait for one (a
        ``Transfer-Encoding: chunked`` DELETE that sends nothing is answered at once).
        """
        body = b""
        if request.method in ("PUT", "POST"):
            body = await self.auth.small_body(request, v, MAX_SMALL_BODY)
            check_document(t, body)
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
        if m == "PUT" and t.has("tagging") and self.objects.envelopes.kind == "sidecar":
            # rclone serve s3 (the backend sidecar envelopes exist for) stores a tagging
            # document as the object's bytes: the object would be lost.
            raise S3Error(
                "NotImplemented",
                "object tagging is refused with backend.envelope_store: sidecar (rclone serve "
                "s3 replaces the object's data with the tagging document)",
                501,
            )
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


COUNT_PARAMS = ("max-keys", "max-uploads", "max-parts", "part-number-marker")
MAX_INT = 2**31 - 1


def check_counts(t: Target) -> None:
    """Counts in the query are integers S3 takes (a backend may answer others with a 500)."""
    for name in COUNT_PARAMS:
        value = t.get(name)
        if value is None or (value.isascii() and value.isdigit() and int(value) <= MAX_INT):
            continue
        raise S3Error(
            "InvalidArgument",
            f"Provided {name} not an integer or within integer range",
            400,
            extra={"ArgumentName": name, "ArgumentValue": value[:64]},
        )


def check_document(t: Target, body: bytes) -> None:
    """A configuration document is well-formed, DTD-free XML before any backend sees it
    (a backend may answer garbage with a 500); tagging is checked against its schema."""
    if not body or t.has("policy"):  # a bucket policy is JSON
        return
    root = parse_client(body)
    if t.has("tagging"):
        tag_sets = [el for el in root if local(el.tag) == "TagSet"]
        if local(root.tag) != "Tagging" or len(tag_sets) != 1:
            raise malformed_xml()
        for tag in tag_sets[0]:
            names = sorted(local(c.tag) for c in tag)
            if local(tag.tag) != "Tag" or names != ["Key", "Value"]:
                raise malformed_xml()


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
    pending: list[bytes | bytearray] = []
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
