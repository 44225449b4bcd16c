"""Which bucket and key a request names: path style and virtual-host style."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote

from aiohttp import web

from proxy.errors import S3Error
from proxy.wire.names import check_bucket, check_key

CLIENT_ONLY_PARAMS = frozenset(
    {
        "X-Amz-Algorithm",
        "X-Amz-Credential",
        "X-Amz-Date",
        "X-Amz-Expires",
        "X-Amz-SignedHeaders",
        "X-Amz-Signature",
        "X-Amz-Security-Token",
        "X-Amz-Content-Sha256",
        "x-id",
        "AWSAccessKeyId",
        "Signature",
        "Expires",
    }
)
"""Query parameters that belong to the client's request (SigV4 and SigV2 presigned-URL
authentication, the SDKs' ``x-id`` operation hint): verified by the authenticator against the
raw request, never part of what the request names, never forwarded to the backend (which would
check them as its own presigned URL)."""


@dataclass(frozen=True)
class Target:
    bucket: str | None
    key: str | None
    query: tuple[tuple[str, str], ...]

    def has(self, name: str) -> bool:
        return any(k == name for k, _ in self.query)

    def get(self, name: str) -> str | None:
        for k, v in self.query:
            if k == name:
                return v
        return None

    @property
    def resource(self) -> str:
        if self.bucket is None:
            return "/"
        return f"/{self.bucket}" + (f"/{self.key}" if self.key is not None else "")


def _invalid_uri() -> S3Error:
    return S3Error("InvalidURI", "Couldn't parse the specified URI.", 400)


def _decode(part: str) -> str:
    """Percent-decoding that refuses what is not UTF-8 (no silent U+FFFD in a key)."""
    try:
        return unquote(part, errors="strict")
    except UnicodeDecodeError:
        raise _invalid_uri() from None


def route(request: web.Request, virtual_host_domain: str | None) -> Target:
    """The bucket and key a request names; an S3 error for a name it must not use.

    Strict on purpose: an empty bucket segment (``//B/key``) or a target that is not a path
    is an error, never read as another operation (``PUT /`` on the backend).
    """
    raw = request.raw_path
    path, _, raw_query = raw.partition("?")
    if not path.startswith("/"):
        raise _invalid_uri()
    try:
        pairs = parse_qsl(raw_query, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise _invalid_uri() from None
    query = tuple((k, v) for k, v in pairs if k not in CLIENT_ONLY_PARAMS)
    host = (request.host or "").split(":")[0].lower()
    bucket: str | None
    key: str | None
    if virtual_host_domain and host.endswith("." + virtual_host_domain.lower()):
        bucket = host[: -len(virtual_host_domain) - 1]
        key = _decode(path[1:]) if len(path) > 1 else None
    else:
        stripped = path[1:]
        if not stripped:
            bucket, key = None, None
        else:
            b, sep, k = stripped.partition("/")
            bucket = _decode(b)
            key = _decode(k) if sep and k != "" else None
    if bucket is not None:
        check_bucket(bucket)
    if key is not None:
        check_key(key)
    return Target(bucket, key, query)
