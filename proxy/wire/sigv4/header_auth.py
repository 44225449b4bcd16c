"""SigV4 in the ``Authorization`` header: parse it and verify the request against it."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from datetime import datetime, timedelta

from proxy.errors import S3Error
from proxy.wire.sigv4.canonical import (
    _SIG_HEX,
    ALGORITHM,
    DEFAULT_MAX_SKEW,
    AuthHeader,
    Credentials,
    RequestView,
    SigningKeyCache,
    VerifiedAuth,
    _canonical,
    _canonical_query,
    _derive,
    classify_payload_hash,
    signature,
    string_to_sign,
)
from proxy.wire.sigv4.checks import (
    _check_scope,
    _check_signed_headers,
    _check_skew,
    _lookup,
    _malformed,
    _request_time,
    _require_utc,
    _signature_mismatch,
    _split_credential,
    _split_signed_headers,
    _unsupported_algorithm,
)


def parse_authorization(header_value: str) -> AuthHeader:
    """Parse ``AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...``."""
    algorithm, _, rest = header_value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise _unsupported_algorithm(algorithm)
    fields: dict[str, str] = {}
    for item in rest.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep or name in fields:
            raise _malformed(
                "the header must be 'Credential=..., SignedHeaders=..., Signature=...'."
            )
        fields[name] = value.strip()
    for required in ("Credential", "SignedHeaders", "Signature"):
        if required not in fields:
            raise _malformed(f"missing {required}.")
    access_key, date, region, service, _ = _split_credential(fields["Credential"], _malformed)
    signed = _split_signed_headers(fields["SignedHeaders"], _malformed)
    sig = fields["Signature"]
    if not _SIG_HEX.fullmatch(sig):
        raise S3Error(
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided. "
            "Check your key and signing method.",
            403,
        )
    return AuthHeader(access_key, date, region, service, signed, sig)


def verify_header_auth(
    request: RequestView,
    lookup: Callable[[str], Credentials | None],
    *,
    now: datetime,
    max_skew: timedelta = DEFAULT_MAX_SKEW,
    region: str | None = None,
    key_cache: SigningKeyCache | None = None,
) -> VerifiedAuth:
    """Verify a request signed with an ``Authorization: AWS4-HMAC-SHA256`` header."""
    now = _require_utc(now)
    headers = request.headers
    value = headers.get("authorization")
    if value is None:
        raise S3Error("AccessDenied", "Access Denied", 403)
    auth = parse_authorization(value)
    _check_scope(auth.region, auth.service, region, _malformed)
    payload_hash = headers.get("x-amz-content-sha256")
    if payload_hash is None:
        raise S3Error(
            "InvalidRequest",
            "Missing required header for this request: x-amz-content-sha256",
            400,
        )
    payload_hash = payload_hash.strip()
    mode = classify_payload_hash(payload_hash)
    amz_date, when = _request_time(headers, auth.signed_headers)
    if amz_date[:8] != auth.date:
        raise _malformed("Invalid credential date. Date is not the same as X-Amz-Date.")
    creds = _lookup(lookup, auth.access_key)
    _check_skew(when, now, max_skew, amz_date)
    _check_signed_headers(headers, auth.signed_headers)
    key = _derive(key_cache, creds.secret_key, auth.date, auth.region, auth.service)
    canonical = _canonical(
        request.method,
        request.raw_path,
        _canonical_query(request.raw_query),
        headers,
        auth.signed_headers,
        payload_hash,
    )
    expected = signature(key, string_to_sign(amz_date, auth.scope, canonical))
    if not hmac.compare_digest(expected, auth.signature):
        raise _signature_mismatch(auth.access_key)
    return VerifiedAuth(
        access_key=auth.access_key,
        date=auth.date,
        region=auth.region,
        service=auth.service,
        amz_date=amz_date,
        payload_hash=payload_hash,
        payload_mode=mode,
        presigned=False,
        signing_key=key,
        seed_signature=auth.signature,
    )
