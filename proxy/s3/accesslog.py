"""Per-request observation for the S3 front end: request id, metrics, the access log line.

``RequestObserver`` opens the request's ``proxy.reqctx`` context (so every log line about
the request carries its ``x-amz-request-id``, and the backend client and KMS wrapper add
their time), keeps ``cmek_s3_requests_in_flight``, and at the end records
``cmek_s3_request_duration_seconds`` under the operation's S3 name and writes one access
line (logger ``proxy.access``) with request id, operation, status, bytes in and out,
duration, backend and KMS time; bucket and key only with ``logging.include_names``.

A request refused by authentication is also logged (logger ``proxy.auth``, WARNING, even
with the access log off) with the access key id it claimed and the reason. Never the
secret, the signature or the string to sign: only the key id is read from the request.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

from aiohttp import web

from proxy import reqctx
from proxy.errors import S3Error
from proxy.metrics import Metrics
from proxy.s3.routing import Target
from proxy.wire.operations import operation_name

access_log = logging.getLogger("proxy.access")
auth_log = logging.getLogger("proxy.auth")

_KEY_ID: Final = re.compile(r"[A-Za-z0-9_.\-]{1,128}\Z")
_CREDENTIAL: Final = re.compile(r"Credential=([^/,\s]*)")
_HEX_RUN: Final = re.compile(r"[0-9a-fA-F]{32,}")


def s3_operation(request: web.Request, target: Target) -> str:
    """The S3 name of the request (PutObject, UploadPart, ListObjectsV2, ...)."""
    return operation_name(
        request.method,
        bucket=target.bucket is not None,
        key=target.key is not None,
        query={k for k, _ in target.query},
        headers=request.headers,
    )


def claimed_key_id(request: web.Request) -> str | None:
    """The access key id a request names (header or presigned URL, SigV4 or SigV2).

    Only the id, and only if it looks like one: the rest of the header is never read."""
    header = request.headers.get("Authorization", "")
    found: str | None = None
    if header.startswith("AWS4-"):
        m = _CREDENTIAL.search(header)
        found = m.group(1) if m else None
    elif header.startswith("AWS "):
        found = header[4:].partition(":")[0]
    else:
        cred = request.query.get("X-Amz-Credential")
        found = cred.partition("/")[0] if cred else request.query.get("AWSAccessKeyId")
    if not found:
        return None
    return found if _KEY_ID.match(found) else "<malformed>"


@dataclass(frozen=True)
class AccessLogSettings:
    enabled: bool = True
    include_names: bool = False


class RequestObserver:
    """``with RequestObserver(...) as obs:`` around the handling of one request."""

    def __init__(
        self,
        request: web.Request,
        request_id: str,
        metrics: Metrics,
        settings: AccessLogSettings,
    ) -> None:
        self.request = request
        self.request_id = request_id
        self._metrics = metrics
        self._settings = settings
        self.operation = "Unknown"
        self.target: Target | None = None
        self.status = 500
        self.error: S3Error | None = None
        self.bytes_out = 0
        self._started = 0.0
        self._ctx_manager = reqctx.begin(request_id)
        self._ctx: reqctx.RequestContext | None = None

    def __enter__(self) -> RequestObserver:
        self._started = time.perf_counter()
        self._ctx = self._ctx_manager.__enter__()
        self._metrics.s3_in_flight.inc()
        return self

    def routed(self, target: Target) -> None:
        self.target = target
        self.operation = s3_operation(self.request, target)

    def answered(self, resp: web.StreamResponse) -> None:
        self.status = resp.status
        if resp.content_length and self.request.method != "HEAD":
            self.bytes_out = resp.content_length

    def failed(self, err: S3Error) -> None:
        self.status = err.status
        self.error = err

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        seconds = time.perf_counter() - self._started
        try:
            self._metrics.s3_in_flight.dec()
            # what really arrived (aws-chunked framing included), not what was declared: a
            # request refused before its body was read did not send it all
            bytes_in = self.request.content.total_bytes
            if bytes_in:
                self._metrics.s3_bytes_in.inc(bytes_in)
            if self.bytes_out and self.request.method == "GET" and exc_type is None:
                self._metrics.s3_bytes_out.inc(self.bytes_out)  # a GET that was sent in full
            self._metrics.observe_s3(self.operation, self.status, seconds)
            ctx = self._ctx
            assert ctx is not None
            if ctx.auth_failed and self.error is not None:
                self._log_auth_failure(self.error)
            if self._settings.enabled:
                failure = exc_type.__name__ if exc_type is not None else None
                self._log_access(ctx, bytes_in, seconds, failure=failure)
        finally:
            self._ctx_manager.__exit__(exc_type, exc, tb)

    def _log_auth_failure(self, err: S3Error) -> None:
        key_id = claimed_key_id(self.request)
        auth_log.warning(
            "authentication failed for %s: %s",
            f"access key {key_id}" if key_id else "a request with no access key",
            err.code,
            extra={
                "fields": {
                    "event": "auth_failed",
                    "access_key": key_id,
                    "reason": err.code,
                    "detail": _HEX_RUN.sub("<hex>", str(err.message))[:300],
                    "remote": self.request.remote,
                    "operation": self.operation,
                }
            },
        )

    def _log_access(
        self, ctx: reqctx.RequestContext, bytes_in: int, seconds: float, *, failure: str | None
    ) -> None:
        fields: dict[str, Any] = {
            "event": "request",
            "operation": self.operation,
            "method": self.request.method,
            "status": self.status,
            "bytes_in": bytes_in,
            "bytes_out": self.bytes_out,
            "duration_ms": round(seconds * 1000, 3),
            "backend_ms": round(ctx.backend_seconds * 1000, 3),
            "backend_calls": ctx.backend_calls,
            "kms_ms": round(ctx.kms_seconds * 1000, 3),
            "kms_calls": ctx.kms_calls,
            "access_key": ctx.access_key,
            "remote": self.request.remote,
        }
        if self.error is not None:
            fields["error"] = self.error.code
        if failure is not None:
            fields["error"] = failure
        if self._settings.include_names and self.target is not None:
            fields["bucket"] = self.target.bucket
            fields["key"] = self.target.key
        access_log.info(
            "%s %s %s in=%d out=%d %.1fms backend=%.1fms kms=%.1fms",
            self.request.method,
            self.operation,
            self.status,
            bytes_in,
            self.bytes_out,
            seconds * 1000,
            ctx.backend_seconds * 1000,
            ctx.kms_seconds * 1000,
            extra={"fields": fields},
        )
