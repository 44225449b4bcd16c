"""S3 XML error responses: the only place an exception becomes an HTTP answer."""

from __future__ import annotations

import os
import re
from urllib.parse import quote
from xml.sax.saxutils import escape

from aiohttp import web

from proxy.errors import (
    CmekError,
    DenialKind,
    FormatError,
    IntegrityError,
    KeyConfigError,
    KeyUnavailableError,
    KmsUnreachableError,
    S3Error,
)


def new_request_id() -> str:
    return os.urandom(8).hex().upper()


def to_s3_error(exc: CmekError) -> S3Error:
    """Map any CmekError to what an S3 client should see."""
    if isinstance(exc, S3Error):
        return exc
    if isinstance(exc, KeyUnavailableError):
        msg = (
            "The customer-managed key for this object is unavailable "
            f"({exc.kind.value}): access resumes when the key is reinstated"
        )
        if exc.kind is DenialKind.DISABLED:
            return S3Error("KMS.DisabledException", msg, 400)
        if exc.kind is DenialKind.INVALID_STATE:
            return S3Error("KMS.KMSInvalidStateException", msg, 400)
        return S3Error("AccessDenied", msg, 403)
    if isinstance(exc, KmsUnreachableError):
        return S3Error(
            "ServiceUnavailable",
            "The customer-managed key service cannot be reached; retry later",
            503,
        )
    if isinstance(exc, KeyConfigError):
        return S3Error("KMS.NotFoundException", "The customer-managed key is misconfigured", 400)
    if isinstance(exc, IntegrityError):
        return S3Error(
            "InternalError",
            "The stored object failed authentication and was not served",
            500,
        )
    if isinstance(exc, FormatError):
        return S3Error("InternalError", "The stored object is not in a readable format", 500)
    return S3Error("InternalError", "We encountered an internal error. Please try again.", 500)


_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _percent(ch: str) -> str:
    try:  # a header byte aiohttp could not decode arrives as a lone surrogate
        return quote(ch.encode("utf-8", "surrogateescape"), safe="")
    except UnicodeEncodeError:
        return "%EF%BF%BD"


def _xml_text(value: str) -> str:
    """Escaped text that any XML 1.0 parser reads: what it cannot hold is %-encoded."""
    return escape(_NOT_XML.sub(lambda m: _percent(m.group(0)), value)).replace("\r", "&#xD;")


def error_response(
    err: S3Error, *, resource: str, request_id: str, head: bool = False
) -> web.Response:
    extra = "".join(f"<{k}>{_xml_text(v)}</{k}>" for k, v in err.extra.items())
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{_xml_text(err.code)}</Code><Message>{_xml_text(err.message)}</Message>"
        f"{extra}<Resource>{_xml_text(resource)}</Resource>"
        f"<RequestId>{request_id}</RequestId></Error>"
    ).encode()
    headers = {"x-amz-request-id": request_id, **err.headers}
    if head:
        # HEAD responses carry no body; the code travels in a header for debugging.
        headers["x-amz-error-code"] = err.code
        return web.Response(status=err.status, headers=headers)
    return web.Response(
        status=err.status, body=body, content_type="application/xml", headers=headers
    )
