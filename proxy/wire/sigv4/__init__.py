"""AWS Signature Version 4 for S3: verify inbound requests, sign outbound ones.

One canonicalisation (``canonical``) is used both ways, so the verifier and the signer can
never disagree about what a request means; the rules are in ``canonical``'s docstring.
"""

from __future__ import annotations

from proxy.wire.sigv4.canonical import (
    ALGORITHM,
    AMZ_DATE_FORMAT,
    DEFAULT_MAX_SKEW,
    ECDSA_ALGORITHM,
    EMPTY_SHA256,
    MAX_PRESIGN_EXPIRES,
    TERMINATOR,
    UNSIGNED_HEADERS,
    AuthHeader,
    ChunkSigningContext,
    Credentials,
    PayloadMode,
    RequestView,
    SigningKeyCache,
    VerifiedAuth,
    _canonical_query,
    canonical_query_string,
    canonical_request,
    classify_payload_hash,
    parse_query,
    signature,
    signing_key,
    string_to_sign,
    uri_encode,
)
from proxy.wire.sigv4.header_auth import parse_authorization, verify_header_auth
from proxy.wire.sigv4.presigned import verify_presigned
from proxy.wire.sigv4.sign import sign_headers
from proxy.wire.sigv4.verify import verify_request

__all__ = [
    "ALGORITHM",
    "AMZ_DATE_FORMAT",
    "DEFAULT_MAX_SKEW",
    "ECDSA_ALGORITHM",
    "EMPTY_SHA256",
    "MAX_PRESIGN_EXPIRES",
    "TERMINATOR",
    "UNSIGNED_HEADERS",
    "AuthHeader",
    "ChunkSigningContext",
    "Credentials",
    "PayloadMode",
    "RequestView",
    "SigningKeyCache",
    "VerifiedAuth",
    "_canonical_query",
    "canonical_query_string",
    "canonical_request",
    "classify_payload_hash",
    "parse_authorization",
    "parse_query",
    "sign_headers",
    "signature",
    "signing_key",
    "string_to_sign",
    "uri_encode",
    "verify_header_auth",
    "verify_presigned",
    "verify_request",
]
