"""What a client may name: object keys and bucket names, checked the same way on every path.

A key is refused when it is longer than S3 allows, or when it reaches the proxy's reserved
state in any spelling a backend could map onto ``.cmek-proxy/``: percent-encoded (decoded
before this check), another letter case (case-insensitive filesystems), backslashes
(Windows paths), dot and empty segments (``a/../.cmek-proxy/x``, ``/.cmek-proxy/x``,
``./.cmek-proxy``), trailing dots or spaces (Windows drops them), or ``..`` segments that
climb out of the bucket (a filesystem backend maps those onto another bucket, such as the
control bucket's specs).  Keys made only of separators and dots (``/``, ``.``) would name
the bucket itself there and are refused as well.
"""

from __future__ import annotations

import re
from typing import Final

from proxy.errors import S3Error
from proxy.wire.reserved import RESERVED_PREFIX

MAX_KEY_BYTES: Final = 1024
"""S3's limit on an object key's length, in bytes of UTF-8."""

_RESERVED_SEGMENT: Final = RESERVED_PREFIX.rstrip("/").casefold()
_SEPARATORS: Final = re.compile(r"[/\\]")
_BUCKET: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


def reserved_denied() -> S3Error:
    return S3Error("AccessDenied", "this key prefix is reserved by cmek-proxy", 403)


def _segments(key: str) -> list[str] | None:
    """The path a filesystem would resolve ``key`` to, or None when it climbs out."""
    parts: list[str] = []
    for seg in _SEPARATORS.split(key):
        if seg in ("", "."):
            continue
        if seg == "..":
            if not parts:
                return None
            parts.pop()
            continue
        parts.append(seg)
    return parts


def is_reserved_name(key: str) -> bool:
    """Does ``key`` name (or might a backend map it onto) the proxy's reserved state?

    Used to hide listing entries too, so it never hides a key a client could create:
    those are refused by :func:`check_key` at every write.
    """
    if key.startswith(RESERVED_PREFIX):
        return True
    parts = _segments(key)
    if not parts:
        return False
    return parts[0].rstrip(". ").casefold() == _RESERVED_SEGMENT


def check_key(key: str) -> None:
    """Raise the S3 error for a key a client must not use; return for a good one."""
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise S3Error("KeyTooLongError", "Your key is too long", 400)
    if is_reserved_name(key):
        raise reserved_denied()
    parts = _segments(key)
    if parts is None:
        raise S3Error("AccessDenied", "a key must not climb out of its bucket with '..'", 403)
    if not parts:
        # "/", ".", "./": a filesystem backend maps them onto the bucket itself
        raise S3Error("InvalidArgument", "a key made only of separators and '.' segments", 400)


def check_bucket(bucket: str) -> None:
    """A bucket name that cannot address anything but one bucket (no dots, separators, '')."""
    if not _BUCKET.fullmatch(bucket):
        raise S3Error("InvalidBucketName", "The specified bucket is not valid.", 400)
