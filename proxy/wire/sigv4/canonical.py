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
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from enum import Enum
from urllib.parse import quote, unquote_plus

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
