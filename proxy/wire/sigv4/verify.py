"""One entry point for inbound SigV4: header or query-string authentication."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from proxy.errors import S3Error
from proxy.wire.sigv4.canonical import (
    DEFAULT_MAX_SKEW,
    Credentials,
    RequestView,
    SigningKeyCache,
    VerifiedAuth,
    parse_query,
)
from proxy.wire.sigv4.header_auth import verify_header_auth
from proxy.wire.sigv4.presigned import verify_presigned


def verify_request(
    request: RequestView,
    lookup: Callable[[str], Credentials | None],
    *,
    now: datetime,
    max_skew: timedelta = DEFAULT_MAX_SKEW,
    region: str | None = None,
    key_cache: SigningKeyCache | None = None,
) -> VerifiedAuth:
    """Dispatch to header or query-string verification; no credentials -> AccessDenied."""
    has_header = "authorization" in request.headers
    has_query = "X-Amz-" in request.raw_query and any(
        name in ("X-Amz-Algorithm", "X-Amz-Credential")
        for name, _ in parse_query(request.raw_query)
    )
    if has_header and has_query:
        raise S3Error(
            "InvalidArgument",
            "Only one auth mechanism allowed; only the "
            "X-Amz-Algorithm query parameter or the Authorization header should be "
            "specified",
            400,
            extra={"ArgumentName": "Authorization"},
        )
    if has_header:
        return verify_header_auth(
            request, lookup, now=now, max_skew=max_skew, region=region, key_cache=key_cache
        )
    if has_query:
        return verify_presigned(
            request, lookup, now, max_skew=max_skew, region=region, key_cache=key_cache
        )
    raise S3Error("AccessDenied", "Access Denied", 403)
