"""SigV4 in the query string (presigned URLs): ``X-Amz-*`` parameters, expiry, signature."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from proxy.errors import S3Error
from proxy.wire.sigv4.canonical import (
    _QUERY_MALFORMED,
    _SIG_HEX,
    ALGORITHM,
    DEFAULT_MAX_SKEW,
    ECDSA_ALGORITHM,
    MAX_PRESIGN_EXPIRES,
    TERMINATOR,
    Credentials,
    RequestView,
    SigningKeyCache,
    VerifiedAuth,
    _canonical,
    _derive,
    canonical_query_string,
    classify_payload_hash,
    parse_query,
    signature,
    string_to_sign,
)
from proxy.wire.sigv4.checks import (
    _check_scope,
    _check_signed_headers,
    _lookup,
    _parse_amz_date,
    _query_malformed,
    _require_utc,
    _signature_mismatch,
    _split_credential,
    _split_signed_headers,
    _unsupported_algorithm,
)

_PRESIGN_PARAMS = (
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
)


def verify_presigned(
    request: RequestView,
    lookup: Callable[[str], Credentials | None],
    now: datetime,
    *,
    max_skew: timedelta = DEFAULT_MAX_SKEW,
    region: str | None = None,
    key_cache: SigningKeyCache | None = None,
) -> VerifiedAuth:
    """Verify a presigned (query-string authenticated) request."""
    now = _require_utc(now)
    headers = request.headers
    pairs = parse_query(request.raw_query)
    params: dict[str, str] = {}
    for name, value in pairs:
        if name.startswith("X-Amz-"):
            if name in params:
                raise _query_malformed(f"Duplicate query parameter {name}.")
            params[name] = value
    if any(name not in params for name in _PRESIGN_PARAMS):
        raise _query_malformed(
            "Query-string authentication version 4 requires the X-Amz-Algorithm, "
            "X-Amz-Credential, X-Amz-Signature, X-Amz-Date, X-Amz-SignedHeaders, "
            "and X-Amz-Expires parameters."
        )
    algorithm = params["X-Amz-Algorithm"]
    if algorithm != ALGORITHM:
        if algorithm == ECDSA_ALGORITHM:
            raise _unsupported_algorithm(algorithm)
        raise _query_malformed(f'X-Amz-Algorithm only supports "{ALGORITHM}"')

    def fail(detail: str) -> S3Error:
        return _query_malformed(f"{_QUERY_MALFORMED}; {detail}")

    access_key, date, scope_region, service, _ = _split_credential(params["X-Amz-Credential"], fail)
    _check_scope(scope_region, service, region, fail)
    signed = _split_signed_headers(params["X-Amz-SignedHeaders"], _query_malformed)
    expires_raw = params["X-Amz-Expires"]
    if not expires_raw.isdigit():
        raise _query_malformed("X-Amz-Expires should be a number")
    expires = int(expires_raw)
    if expires < 1:
        raise _query_malformed("X-Amz-Expires must be non-negative")
    if expires > MAX_PRESIGN_EXPIRES:
        raise _query_malformed("X-Amz-Expires must be less than a week (in seconds) that is 604800")
    amz_date = params["X-Amz-Date"]
    when = _parse_amz_date(amz_date)
    if when is None:
        raise _query_malformed(
            "X-Amz-Date must be in the ISO8601 Long Format \"yyyyMMdd'T'HHmmss'Z'\""
        )
    if amz_date[:8] != date:
        raise fail("Invalid credential date. Date is not the same as X-Amz-Date.")
    sig = params["X-Amz-Signature"]
    payload_hash = params.get("X-Amz-Content-Sha256") or headers.get("x-amz-content-sha256")
    payload_hash = "UNSIGNED-PAYLOAD" if payload_hash is None else payload_hash.strip()
    mode = classify_payload_hash(payload_hash)
    creds = _lookup(lookup, access_key)
    if now < when - max_skew:
        raise S3Error("AccessDenied", "Request is not valid yet", 403)
    if now > when + timedelta(seconds=expires):
        raise S3Error(
            "AccessDenied",
            "Request has expired",
            403,
            extra={
                "X-Amz-Expires": expires_raw,
                "Expires": (when + timedelta(seconds=expires)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "ServerTime": now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        )
    _check_signed_headers(headers, signed)
    if not _SIG_HEX.fullmatch(sig):
        raise _signature_mismatch(access_key)
    key = _derive(key_cache, creds.secret_key, date, scope_region, service)
    canonical = _canonical(
        request.method,
        request.raw_path,
        canonical_query_string(pairs, exclude="X-Amz-Signature"),
        headers,
        signed,
        payload_hash,
    )
    scope = f"{date}/{scope_region}/{service}/{TERMINATOR}"
    expected = signature(key, string_to_sign(amz_date, scope, canonical))
    if not hmac.compare_digest(expected, sig):
        raise _signature_mismatch(access_key)
    return VerifiedAuth(
        access_key=access_key,
        date=date,
        region=scope_region,
        service=service,
        amz_date=amz_date,
        payload_hash=payload_hash,
        payload_mode=mode,
        presigned=True,
        signing_key=key,
        seed_signature=sig,
    )
