"""AWS Signature Version 2 for S3, query-string (presigned URL) form only.

boto3 presigns S3 URLs with SigV2 unless told otherwise, so URLs such as
``/bucket/key?AWSAccessKeyId=AK&Signature=...&Expires=1700000000`` are verified
here.  SigV2 ``Authorization: AWS AK:sig`` headers are not accepted (clients sign
requests with SigV4; only presigned URLs are SigV2 by default).

String to sign (S3's "query string request authentication")::

    HTTP-Verb \\n Content-MD5 \\n Content-Type \\n Expires \\n
    CanonicalizedAmzHeaders CanonicalizedResource

* ``Content-MD5`` and ``Content-Type`` are the request's headers (empty when absent).
* ``Expires`` is the ``Expires`` query parameter, seconds since the epoch.
* ``CanonicalizedAmzHeaders``: every ``x-amz-*`` request header, name lower-case,
  values stripped and repeated headers joined with ``,``, sorted by name, each as
  ``name:value\\n``.  Only request *headers* count: a client must send the headers
  its URL was signed with (as for SigV4 signed headers).
* ``CanonicalizedResource``: ``/bucket`` for virtual-host-style requests, then the
  path exactly as sent (a path-style bucket request ``/bucket`` as ``/bucket/``, as
  botocore signs it and S3 verifies it), then the sub-resource parameters of :data:`SUBRESOURCES`
  present in the query, decoded, sorted by name (stable), as ``?name=value&name``
  (a parameter sent without ``=`` appears without ``=``).

Query parameters are decoded like :func:`proxy.wire.sigv4.parse_query` (``+`` is a
space), the decoding the router uses, so the values signed are the values acted on.

Parameters that select an S3 operation but are not part of the SigV2 canonical
resource (:data:`UNSIGNED_SELECTORS`) are refused: appending one to a presigned URL
would otherwise turn it into a different operation under the same signature.

Errors are :class:`proxy.errors.S3Error` with S3's codes; no message contains the
signature, the secret or the string to sign.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import S3Error
from proxy.wire.sigv4 import (
    AMZ_DATE_FORMAT,
    Credentials,
    PayloadMode,
    RequestView,
    VerifiedAuth,
    parse_query,
)

ACCESS_KEY_PARAM = "AWSAccessKeyId"
SIGNATURE_PARAM = "Signature"
EXPIRES_PARAM = "Expires"
AUTH_PARAMS = (ACCESS_KEY_PARAM, SIGNATURE_PARAM, EXPIRES_PARAM)

SUBRESOURCES = frozenset(
    {
        # S3's documented list.
        "acl",
        "cors",
        "delete",
        "lifecycle",
        "location",
        "logging",
        "notification",
        "partNumber",
        "policy",
        "requestPayment",
        "tagging",
        "torrent",
        "uploadId",
        "uploads",
        "versionId",
        "versioning",
        "versions",
        "website",
        "response-cache-control",
        "response-content-disposition",
        "response-content-encoding",
        "response-content-language",
        "response-content-type",
        "response-expires",
        # Also signed by botocore's HmacV1 (and the Java and JS SDKs, for the first six).
        "accelerate",
        "analytics",
        "inventory",
        "metrics",
        "replication",
        "restore",
        "defaultObjectAcl",
        "object-lock",
        "select",
        "select-type",
        "storageClass",
    }
)
"""Query parameters that are part of the canonical resource."""

UNSIGNED_SELECTORS = frozenset(
    {
        "attributes",
        "encryption",
        "intelligent-tiering",
        "legal-hold",
        "metadataTable",
        "ownershipControls",
        "policyStatus",
        "publicAccessBlock",
        "retention",
        "session",
    }
)
"""S3 operation selectors outside the SigV2 canonical resource: refused with SigV2."""

_SHA1_SIZE = 20


def _denied(message: str) -> S3Error:
    return S3Error("AccessDenied", message, 403)


def is_presigned_v2(request: RequestView) -> bool:
    """True for a SigV2 presigned request: ``AWSAccessKeyId`` and ``Signature`` in the
    query, and neither an ``Authorization`` header nor ``X-Amz-Algorithm``/
    ``X-Amz-Credential`` (SigV4) in the query."""
    if "authorization" in request.headers or "Signature" not in request.raw_query:
        return False
    names = {name for name, _ in parse_query(request.raw_query)}
    return (
        ACCESS_KEY_PARAM in names
        and SIGNATURE_PARAM in names
        and "X-Amz-Algorithm" not in names
        and "X-Amz-Credential" not in names
    )


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    return "" if value is None else value.strip()


def canonical_amz_headers(headers: Mapping[str, str]) -> str:
    """``name:value\\n`` for every ``x-amz-*`` header, sorted by lower-case name."""
    found: dict[str, list[str]] = {}
    items = (
        headers.items()
        if isinstance(headers, CIMultiDictProxy | CIMultiDict)
        else ((name, headers[name]) for name in headers)
    )
    for name, value in items:
        lname = name.lower()
        if lname.startswith("x-amz-"):
            found.setdefault(lname, []).append(value.strip())
    return "".join(f"{name}:{','.join(found[name])}\n" for name in sorted(found))


def canonical_resource(
    raw_path: str, pairs: list[tuple[str, str | None]], bucket_from_host: str | None = None
) -> str:
    """``[/bucket]<path as sent>[?sub-resources]``.

    ``pairs`` are the decoded query parameters in order; a value of ``None`` is a
    parameter sent without ``=``.
    """
    resource = raw_path or "/"
    if bucket_from_host is not None:
        resource = f"/{bucket_from_host}{resource}"
    elif resource.count("/") == 1 and len(resource) > 1:
        resource += "/"  # a path-style bucket request: ``/bucket`` is signed as ``/bucket/``
    subs = sorted(
        ((name, value) for name, value in pairs if name in SUBRESOURCES), key=lambda p: p[0]
    )
    if subs:
        resource += "?" + "&".join(
            name if value is None else f"{name}={value}" for name, value in subs
        )
    return resource


def string_to_sign(
    method: str,
    headers: Mapping[str, str],
    expires: str,
    resource: str,
) -> str:
    """The SigV2 query-string string to sign."""
    return (
        f"{method.upper()}\n{_header(headers, 'content-md5')}\n{_header(headers, 'content-type')}\n"
        f"{expires}\n{canonical_amz_headers(headers)}{resource}"
    )


def sign(secret: str, to_sign: str) -> str:
    """Base64 HMAC-SHA1 of the string to sign."""
    return base64.b64encode(hmac.digest(secret.encode(), to_sign.encode(), "sha1")).decode()


def _query_pairs(raw_query: str) -> list[tuple[str, str | None]]:
    """Decoded (name, value) pairs; value ``None`` for a parameter without ``=``."""
    pairs: list[tuple[str, str | None]] = []
    for part in raw_query.split("&"):
        if not part:
            continue
        ((name, value),) = parse_query(part)
        pairs.append((name, value if "=" in part else None))
    return pairs


def _signature_mismatch(access_key: str) -> S3Error:
    return S3Error(
        "SignatureDoesNotMatch",
        "The request signature we calculated does not match the signature you provided. "
        "Check your key and signing method.",
        403,
        extra={"AWSAccessKeyId": access_key},
    )


def _iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def verify_presigned_v2(
    request: RequestView,
    lookup: Callable[[str], Credentials | None],
    *,
    now: datetime,
    bucket_from_host: str | None = None,
) -> VerifiedAuth:
    """Verify a SigV2 presigned request.

    ``bucket_from_host`` is the bucket named by the ``Host`` header of a
    virtual-host-style request (``None`` for path style).  The result has
    ``payload_mode`` UNSIGNED (SigV2 does not sign the body), ``presigned`` True, no
    region, and ``date``/``amz_date`` taken from ``now``, the time it was verified.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    pairs = _query_pairs(request.raw_query)
    auth: dict[str, str] = {}
    for name, value in pairs:
        if name in UNSIGNED_SELECTORS:
            raise S3Error(
                "InvalidRequest",
                f"The {name} sub-resource requires AWS Signature Version 4; "
                "please use AWS4-HMAC-SHA256.",
                400,
            )
        if name in AUTH_PARAMS:
            if name in auth:
                raise S3Error(
                    "InvalidArgument",
                    f"Duplicate query parameter {name}.",
                    400,
                    extra={"ArgumentName": name},
                )
            auth[name] = value or ""
    if any(not auth.get(name) for name in AUTH_PARAMS):
        raise _denied(
            "Query-string authentication requires the Signature, Expires and "
            "AWSAccessKeyId parameters"
        )
    access_key = auth[ACCESS_KEY_PARAM]
    expires_raw = auth[EXPIRES_PARAM]
    if not (expires_raw.isascii() and expires_raw.isdigit()):
        raise _denied(f"Invalid date (should be seconds since epoch): {expires_raw}")
    creds = lookup(access_key)
    if creds is None:
        raise S3Error(
            "InvalidAccessKeyId",
            "The AWS Access Key Id you provided does not exist in our records.",
            403,
            extra={"AWSAccessKeyId": access_key},
        )
    now = now.astimezone(UTC)
    if int(now.timestamp()) > int(expires_raw):
        try:
            expires_at = _iso(datetime.fromtimestamp(int(expires_raw), UTC))
        except (OverflowError, ValueError, OSError):
            expires_at = expires_raw
        raise S3Error(
            "AccessDenied",
            "Request has expired",
            403,
            extra={"Expires": expires_at, "ServerTime": _iso(now)},
        )
    try:
        provided = base64.b64decode(auth[SIGNATURE_PARAM], validate=True)
    except binascii.Error:
        raise _signature_mismatch(access_key) from None
    resource = canonical_resource(request.raw_path, pairs, bucket_from_host)
    to_sign = string_to_sign(request.method, request.headers, expires_raw, resource)
    expected = hmac.digest(creds.secret_key.encode(), to_sign.encode(), "sha1")
    if len(provided) != _SHA1_SIZE or not hmac.compare_digest(expected, provided):
        raise _signature_mismatch(access_key)
    amz_date = now.strftime(AMZ_DATE_FORMAT)
    return VerifiedAuth(
        access_key=access_key,
        date=amz_date[:8],
        region="",
        service="s3",
        amz_date=amz_date,
        payload_hash=PayloadMode.UNSIGNED.value,
        payload_mode=PayloadMode.UNSIGNED,
        presigned=True,
        signing_key=b"",
        seed_signature="",
    )
