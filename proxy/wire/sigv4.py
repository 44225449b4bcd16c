"""AWS Signature Version 4 for S3: verify inbound requests, sign outbound ones.

One canonicalisation is used both ways (``canonical_request``), so the proxy's
verifier and its signer can never disagree about what a request means.

S3 canonicalisation rules implemented here:

* **Path** - used exactly as sent (already URI-encoded). S3 neither decodes,
  re-encodes nor normalises it (no ``//`` or ``.`` folding). An empty path is ``/``.
* **Query** - the *raw* query string as it appears on the wire. Each
  ``name=value`` pair is percent-decoded (``+`` decodes to a space, as minio-go and
  Go's ``url.Values`` produce it) and re-encoded with AWS URI encoding: unreserved
  ``A-Za-z0-9-._~`` kept, everything else ``%XX`` upper-case (space is ``%20``,
  ``/`` is ``%2F``). A parameter without ``=`` has the empty value. Pairs are sorted
  by encoded name, then encoded value. Empty ``&&`` segments are ignored.
  Callers that build URLs must therefore encode a literal ``+`` as ``%2B``.
* **Headers** - names lower-case; the value of a signed header is stripped and
  runs of whitespace collapsed to one space; repeated headers are joined with
  ``,`` (when a ``multidict`` mapping is given, all values are used).

Request headers (``RequestView.headers``) are either a case-insensitive
``multidict.CIMultiDict``/``CIMultiDictProxy`` (as aiohttp gives them) or a plain
``dict`` whose names are already lower-case.

Errors are :class:`proxy.errors.S3Error` with the codes S3 itself returns. No
message ever contains a signature, secret or signing key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from enum import Enum
from urllib.parse import quote, unquote_plus, urlsplit

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import S3Error

ALGORITHM = "AWS4-HMAC-SHA256"
ECDSA_ALGORITHM = "AWS4-ECDSA-P256-SHA256"
TERMINATOR = "aws4_request"
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
MAX_PRESIGN_EXPIRES = 604800
DEFAULT_MAX_SKEW = timedelta(minutes=15)

# Headers never signed on outbound requests (same list as botocore): hop-by-hop
# headers and ones an HTTP client or tracer may rewrite in flight.
UNSIGNED_HEADERS = frozenset(
    {
        "authorization",
        "baggage",
        "connection",
        "expect",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "traceparent",
        "tracestate",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "x-amzn-trace-id",
    }
)

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_PLAIN_QUERY = re.compile(r"[A-Za-z0-9\-_.~=&]*")
_SIG_HEX = re.compile(r"[0-9a-f]{64}")
_SCOPE_DATE = re.compile(r"\d{8}")
_AMZ_DATE = re.compile(r"\d{8}T\d{6}Z")
_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
_CREDENTIAL_HINT = 'expecting "<YOUR-AKID>/YYYYMMDD/REGION/SERVICE/aws4_request"'
_MALFORMED = "The authorization header is malformed"
_QUERY_MALFORMED = "Error parsing the X-Amz-Credential parameter"


class PayloadMode(Enum):
    """What ``x-amz-content-sha256`` says about the body."""

    SHA256 = "sha256"  # a hex SHA-256 of the whole body
    UNSIGNED = "UNSIGNED-PAYLOAD"
    STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
    STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"

    @property
    def is_streaming(self) -> bool:
        """True for the aws-chunked (``STREAMING-*``) encodings."""
        return self.value.startswith("STREAMING-")

    @property
    def is_signed_streaming(self) -> bool:
        """True when every chunk carries a chunk signature."""
        return self in (PayloadMode.STREAMING_SIGNED, PayloadMode.STREAMING_SIGNED_TRAILER)

    @property
    def has_trailer(self) -> bool:
        """True when the aws-chunked body ends with trailing headers."""
        return self.value.endswith("-TRAILER")


_NAMED_MODES = {m.value: m for m in PayloadMode if m is not PayloadMode.SHA256}
_ECDSA_MODES = frozenset(
    {"STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD", "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD-TRAILER"}
)


def classify_payload_hash(value: str) -> PayloadMode:
    """Classify an ``x-amz-content-sha256`` value; reject values S3 rejects."""
    mode = _NAMED_MODES.get(value)
    if mode is not None:
        return mode
    if _HEX64.fullmatch(value):
        return PayloadMode.SHA256
    if value in _ECDSA_MODES:
        raise S3Error(
            "NotImplemented",
            "A header you provided implies functionality that is not implemented",
            501,
            extra={"Header": "x-amz-content-sha256"},
        )
    raise S3Error(
        "InvalidArgument",
        "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, STREAMING-UNSIGNED-PAYLOAD-TRAILER, "
        "STREAMING-AWS4-HMAC-SHA256-PAYLOAD, STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER, "
        "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD, "
        "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD-TRAILER or a valid sha256 value.",
        400,
        extra={"ArgumentName": "x-amz-content-sha256"},
    )


@dataclass(frozen=True, slots=True)
class Credentials:
    """An access key pair. ``repr`` never shows the secret."""

    access_key: str
    secret_key: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class RequestView:
    """What the verifier needs from an inbound HTTP request.

    ``raw_path`` is the path only, exactly as received (percent-encoded, no query);
    ``raw_query`` is the query string as received, without ``?``. With aiohttp:
    ``request.rel_url.raw_path`` and ``request.rel_url.raw_query_string``.
    ``headers``: a ``CIMultiDictProxy``/``CIMultiDict`` or a dict with lower-case names.
    """

    method: str
    raw_path: str
    raw_query: str
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class AuthHeader:
    """A parsed ``Authorization: AWS4-HMAC-SHA256 ...`` header."""

    access_key: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str = field(repr=False)

    @property
    def scope(self) -> str:
        """``date/region/service/aws4_request``."""
        return f"{self.date}/{self.region}/{self.service}/{TERMINATOR}"


@dataclass(frozen=True, slots=True)
class ChunkSigningContext:
    """What an aws-chunked decoder needs to verify chunk and trailer signatures."""

    amz_date: str
    scope: str
    signing_key: bytes = field(repr=False)
    seed_signature: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class VerifiedAuth:
    """The outcome of a successful verification."""

    access_key: str
    date: str
    region: str
    service: str
    amz_date: str
    payload_hash: str
    payload_mode: PayloadMode
    presigned: bool
    signing_key: bytes = field(repr=False)
    seed_signature: str = field(repr=False)

    @property
    def scope(self) -> str:
        """``date/region/service/aws4_request``."""
        return f"{self.date}/{self.region}/{self.service}/{TERMINATOR}"

    def chunk_signing(self) -> ChunkSigningContext:
        """The context for verifying ``STREAMING-AWS4-HMAC-SHA256-*`` chunk signatures."""
        return ChunkSigningContext(
            amz_date=self.amz_date,
            scope=self.scope,
            signing_key=self.signing_key,
            seed_signature=self.seed_signature,
        )


# --------------------------------------------------------------------------- keys


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.digest(key, msg.encode(), "sha256")


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    """Derive the SigV4 signing key (``kSigning``); uncached."""
    k_date = _hmac(("AWS4" + secret).encode(), date)
    k_region = _hmac(k_date, region)
    k_service = _hmac(k_region, service)
    return _hmac(k_service, TERMINATOR)


class SigningKeyCache:
    """A small LRU of derived signing keys, keyed by (SHA-256 of secret, date, region, service).

    Derived keys change once a day per credential, so a few hundred entries cover
    every active credential. Not thread-safe; use one per event loop.
    """

    def __init__(self, max_entries: int = 256) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._max = max_entries
        self._keys: OrderedDict[tuple[bytes, str, str, str], bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, secret: str, date: str, region: str, service: str) -> bytes:
        """Return the signing key, deriving and caching it on a miss."""
        cache_key = (hashlib.sha256(secret.encode()).digest(), date, region, service)
        key = self._keys.get(cache_key)
        if key is not None:
            self._keys.move_to_end(cache_key)
            return key
        key = signing_key(secret, date, region, service)
        self._keys[cache_key] = key
        if len(self._keys) > self._max:
            self._keys.popitem(last=False)
        return key


def _derive(
    cache: SigningKeyCache | None, secret: str, date: str, region: str, service: str
) -> bytes:
    if cache is None:
        return signing_key(secret, date, region, service)
    return cache.get(secret, date, region, service)


# -------------------------------------------------------------------- canonical form


def uri_encode(value: str) -> str:
    """AWS URI encoding: keep ``A-Za-z0-9-._~``, ``%XX`` (UTF-8, upper-case) the rest."""
    return quote(value, safe="-_.~")


def parse_query(raw_query: str) -> list[tuple[str, str]]:
    """Decode a raw query string into (name, value) pairs, in order."""
    pairs: list[tuple[str, str]] = []
    if not raw_query:
        return pairs
    for part in raw_query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        pairs.append((unquote_plus(name), unquote_plus(value)))
    return pairs


def canonical_query_string(pairs: list[tuple[str, str]], *, exclude: str | None = None) -> str:
    """The canonical query string of decoded pairs (``exclude`` drops one name)."""
    encoded = sorted(
        (uri_encode(name), uri_encode(value)) for name, value in pairs if name != exclude
    )
    return "&".join(f"{name}={value}" for name, value in encoded)


def _canonical_query(raw_query: str, *, exclude: str | None = None) -> str:
    """Canonical query string straight from the raw query.

    Fast path: a query made only of unreserved characters, ``&`` and one ``=`` per
    pair decodes and re-encodes to itself, so it only needs sorting.
    """
    if not raw_query:
        return ""
    if _PLAIN_QUERY.fullmatch(raw_query):
        pairs = [part.partition("=") for part in raw_query.split("&") if part]
        if not any("=" in value for _, _, value in pairs):
            return "&".join(
                f"{name}={value}"
                for name, value in sorted((n, v) for n, _, v in pairs if n != exclude)
            )
    return canonical_query_string(parse_query(raw_query), exclude=exclude)


def _header_value(headers: Mapping[str, str], name: str) -> str:
    if isinstance(headers, CIMultiDictProxy | CIMultiDict):
        values = headers.getall(name, [])
        if len(values) == 1:
            return " ".join(values[0].split())
        return ",".join(" ".join(v.split()) for v in values)
    value = headers.get(name)
    if value is None:
        return ""
    return " ".join(value.split())


def _canonical(
    method: str,
    path: str,
    canonical_query: str,
    headers: Mapping[str, str],
    signed_headers: list[str] | tuple[str, ...],
    payload_hash: str,
) -> str:
    lines = [method.upper(), path or "/", canonical_query]
    lines.extend(f"{name}:{_header_value(headers, name)}" for name in signed_headers)
    lines.append("")
    lines.append(";".join(signed_headers))
    lines.append(payload_hash)
    return "\n".join(lines)


def canonical_request(
    method: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    signed_headers: list[str] | tuple[str, ...],
    payload_hash: str,
) -> str:
    """The SigV4 canonical request for S3.

    ``path`` is the raw, already-encoded path as sent; ``query`` is the raw query
    string (no ``?``); ``signed_headers`` are lower-case names in the order that
    goes into ``SignedHeaders`` (clients sort them).
    """
    return _canonical(
        method,
        path,
        _canonical_query(query),
        headers,
        signed_headers,
        payload_hash,
    )


def string_to_sign(amz_date: str, scope: str, canonical: str) -> str:
    """``AWS4-HMAC-SHA256\\n<amz-date>\\n<scope>\\n<hex sha256(canonical request)>``."""
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return f"{ALGORITHM}\n{amz_date}\n{scope}\n{digest}"


def signature(key: bytes, to_sign: str) -> str:
    """Hex HMAC-SHA256 of a string to sign."""
    return hmac.digest(key, to_sign.encode(), "sha256").hex()


# ------------------------------------------------------------------------- verifying


def _malformed(detail: str) -> S3Error:
    return S3Error("AuthorizationHeaderMalformed", f"{_MALFORMED}; {detail}", 400)


def _query_malformed(detail: str) -> S3Error:
    return S3Error("AuthorizationQueryParametersError", detail, 400)


def _unsupported_algorithm(algorithm: str) -> S3Error:
    if algorithm == ECDSA_ALGORITHM:
        return S3Error(
            "NotImplemented",
            "A header you provided implies functionality that is not implemented",
            501,
            extra={"Header": "Authorization"},
        )
    return S3Error(
        "InvalidRequest",
        f"The authorization mechanism you have provided is not supported. Please use {ALGORITHM}.",
        400,
    )


def _split_credential(value: str, fail: Callable[[str], S3Error]) -> tuple[str, ...]:
    parts = value.rsplit("/", 4)
    if len(parts) != 5 or not parts[0] or not all(parts[1:]):
        raise fail(f"the Credential is mal-formed; {_CREDENTIAL_HINT}.")
    if not _SCOPE_DATE.fullmatch(parts[1]):
        raise fail(
            f"incorrect date format '{parts[1]}'. This date in the credential must be in "
            'the format "yyyyMMdd".'
        )
    if parts[4] != TERMINATOR:
        raise fail(f"incorrect terminal '{parts[4]}'. This endpoint uses '{TERMINATOR}'.")
    return tuple(parts)


def _split_signed_headers(value: str, fail: Callable[[str], S3Error]) -> tuple[str, ...]:
    names = tuple(value.split(";"))
    for name in names:
        if not _HEADER_NAME.fullmatch(name):
            raise fail("the SignedHeaders list is mal-formed.")
    return names


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


def _check_scope(
    region: str, service: str, expected_region: str | None, fail: Callable[[str], S3Error]
) -> None:
    if service != "s3":
        raise fail(f"incorrect service '{service}'. This endpoint belongs to 's3'.")
    if expected_region is not None and region != expected_region:
        err = fail(f"the region '{region}' is wrong; expecting '{expected_region}'")
        err.extra["Region"] = expected_region
        raise err


def _parse_amz_date(value: str) -> datetime | None:
    if not _AMZ_DATE.fullmatch(value):
        return None
    try:
        return datetime(
            int(value[0:4]),
            int(value[4:6]),
            int(value[6:8]),
            int(value[9:11]),
            int(value[11:13]),
            int(value[13:15]),
            tzinfo=UTC,
        )
    except ValueError:
        return None


def _request_time(headers: Mapping[str, str], signed: tuple[str, ...]) -> tuple[str, datetime]:
    """The request's timestamp (``x-amz-date``, else ``Date``) and its ISO8601 basic form."""
    raw = headers.get("x-amz-date")
    name = "x-amz-date"
    when: datetime | None = None
    if raw is not None:
        when = _parse_amz_date(raw.strip())
    else:
        raw = headers.get("date")
        name = "date"
        if raw is not None:
            try:
                when = parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                when = None
            if when is not None and when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
    if when is None:
        raise S3Error(
            "AccessDenied", "AWS authentication requires a valid Date or x-amz-date header", 403
        )
    if name not in signed:
        raise _headers_not_signed([name])
    if raw is not None and name == "x-amz-date":
        return raw.strip(), when
    when = when.astimezone(UTC)
    return when.strftime(AMZ_DATE_FORMAT), when


def _headers_not_signed(names: list[str]) -> S3Error:
    return S3Error(
        "AccessDenied",
        "There were headers present in the request which were not signed",
        403,
        extra={"HeadersNotSigned": ", ".join(names)},
    )


def _check_signed_headers(headers: Mapping[str, str], signed: tuple[str, ...]) -> None:
    """``host`` and every ``x-amz-*`` header present must be signed.

    ``x-amz-content-sha256`` is exempt: its value is the canonical request's last
    line, so it is covered by the signature either way.
    """
    signed_set = set(signed)
    missing: list[str] = []
    if "host" not in signed_set:
        missing.append("host")
    for name in headers:
        lname = name.lower()
        if (
            lname.startswith("x-amz-")
            and lname not in signed_set
            and lname != "x-amz-content-sha256"
            and lname not in missing
        ):
            missing.append(lname)
    if missing:
        raise _headers_not_signed(missing)


def _check_skew(when: datetime, now: datetime, max_skew: timedelta, amz_date: str) -> None:
    if abs(now - when) > max_skew:
        raise S3Error(
            "RequestTimeTooSkewed",
            "The difference between the request time and the current time is too large.",
            403,
            extra={
                "RequestTime": amz_date,
                "ServerTime": now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "MaxAllowedSkewMilliseconds": str(int(max_skew.total_seconds() * 1000)),
            },
        )


def _lookup(lookup: Callable[[str], Credentials | None], access_key: str) -> Credentials:
    creds = lookup(access_key)
    if creds is None:
        raise S3Error(
            "InvalidAccessKeyId",
            "The AWS Access Key Id you provided does not exist in our records.",
            403,
            extra={"AWSAccessKeyId": access_key},
        )
    return creds


def _signature_mismatch(access_key: str) -> S3Error:
    return S3Error(
        "SignatureDoesNotMatch",
        "The request signature we calculated does not match the signature you provided. "
        "Check your key and signing method.",
        403,
        extra={"AWSAccessKeyId": access_key},
    )


def _require_utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


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


# --------------------------------------------------------------------------- signing


def _host_from_split(scheme: str, netloc: str) -> str:
    host = netloc.rpartition("@")[2].lower()
    if host.endswith(":80") and scheme == "http":
        return host[:-3]
    if host.endswith(":443") and scheme == "https":
        return host[:-4]
    return host


def sign_headers(
    method: str,
    url: str,
    headers: Mapping[str, str],
    payload_hash: str,
    creds: Credentials,
    region: str,
    service: str = "s3",
    *,
    now: datetime,
    key_cache: SigningKeyCache | None = None,
) -> dict[str, str]:
    """Sign an outbound request; return the headers to add (lower-case names).

    ``url`` is the full, already-encoded URL (path used as is; query canonicalised
    as described in the module docstring). Every header in ``headers`` except the
    hop-by-hop ones in :data:`UNSIGNED_HEADERS` is signed; ``host`` is derived from
    the URL when absent. Returns ``authorization``, ``x-amz-date``,
    ``x-amz-content-sha256`` and, when it was missing, ``host``.
    """
    split = urlsplit(url)
    amz_date = now.astimezone(UTC).strftime(AMZ_DATE_FORMAT)
    lowered: dict[str, str] = {}
    for name, value in headers.items():
        lname = name.lower()
        if lname in UNSIGNED_HEADERS:
            continue
        norm = " ".join(value.split())
        prev = lowered.get(lname)
        lowered[lname] = norm if prev is None else f"{prev},{norm}"
    added: dict[str, str] = {}
    if "host" not in lowered:
        added["host"] = lowered["host"] = _host_from_split(split.scheme, split.netloc)
    added["x-amz-date"] = lowered["x-amz-date"] = amz_date
    added["x-amz-content-sha256"] = lowered["x-amz-content-sha256"] = payload_hash
    signed = sorted(lowered)
    date = amz_date[:8]
    scope = f"{date}/{region}/{service}/{TERMINATOR}"
    canonical = _canonical(
        method,
        split.path,
        _canonical_query(split.query),
        lowered,
        signed,
        payload_hash,
    )
    key = _derive(key_cache, creds.secret_key, date, region, service)
    sig = signature(key, string_to_sign(amz_date, scope, canonical))
    added["authorization"] = (
        f"{ALGORITHM} Credential={creds.access_key}/{scope}, "
        f"SignedHeaders={';'.join(signed)}, Signature={sig}"
    )
    return added
