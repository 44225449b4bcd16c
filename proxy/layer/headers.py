"""Which headers are stored with an object and which are shown to clients.

Pure functions of header mappings, shared by the single-object, multipart and copy paths
and by the jobs.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Final
from urllib.parse import quote

from proxy import crypto
from proxy.errors import S3Error

SSE_HEADER: Final = "x-amz-server-side-encryption"
SSE_KEY_HEADER: Final = "x-amz-server-side-encryption-aws-kms-key-id"

# Request headers stored with the object as sent.
PUT_PASS_HEADERS: Final = frozenset(
    {
        "content-type",
        "content-disposition",
        "content-language",
        "cache-control",
        "expires",
        "x-amz-tagging",
        "x-amz-storage-class",
        "x-amz-website-redirect-location",
        "x-amz-acl",
        "x-amz-object-lock-mode",
        "x-amz-object-lock-retain-until-date",
        "x-amz-object-lock-legal-hold",
        "if-none-match",
        "if-match",
    }
)
# Checksums of a stored plaintext object: valid for full-object reads only.
CHECKSUM_HEADERS: Final = (
    "x-amz-checksum-crc32",
    "x-amz-checksum-crc32c",
    "x-amz-checksum-crc64nvme",
    "x-amz-checksum-sha1",
    "x-amz-checksum-sha256",
    "x-amz-checksum-type",
)
# Response headers passed back from the backend as stored.
GET_PASS_HEADERS: Final = frozenset(
    {
        "content-type",
        "content-disposition",
        "content-encoding",
        "content-language",
        "cache-control",
        "expires",
        "last-modified",
        "x-amz-tagging-count",
        "x-amz-storage-class",
        "x-amz-version-id",
        "x-amz-delete-marker",
        "x-amz-object-lock-mode",
        "x-amz-object-lock-retain-until-date",
        "x-amz-object-lock-legal-hold",
        "x-amz-restore",
        "x-amz-expiration",
        "x-amz-mp-parts-count",
    }
)


def mail_safe(value: str) -> str:
    """A user metadata value as S3 stores and returns it: as is when US-ASCII, else one
    RFC 2047 encoded word (``=?UTF-8?B?...?=``), as AWS S3 answers non-ASCII metadata.

    Clients send non-ASCII values as raw UTF-8 (boto3, the JS SDK) or latin-1 bytes (curl);
    the server decoded them as UTF-8 with surrogate escapes, so both are recovered here. Every
    backend then stores plain ASCII, which none of them mis-decodes.
    """
    if value.isascii():
        return value
    raw = value.encode("utf-8", "surrogateescape")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return "=?UTF-8?B?" + base64.b64encode(text.encode("utf-8")).decode("ascii") + "?="


def user_metadata(headers: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for name, value in headers.items():
        lname = name.lower()
        if lname.startswith(crypto.META_PREFIX):
            if crypto.is_internal(lname):
                raise S3Error(
                    "InvalidArgument",
                    f"metadata names starting with {crypto.INTERNAL_PREFIX} are reserved",
                    400,
                )
            out[lname] = mail_safe(value)
    return out


def client_storable_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """``storable_headers`` of a client request, which may not name the envelope's metadata."""
    user_metadata(headers)  # raises on x-amz-meta-cmek-*
    return storable_headers(headers)


def storable_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers that are stored with an object: content headers and user metadata.

    Works on request headers and on backend responses (the envelope's names are dropped).
    """
    lower = {k.lower(): v for k, v in headers.items() if not crypto.is_internal(k)}
    out = {
        k: v
        for k, v in lower.items()
        if k in PUT_PASS_HEADERS and k not in ("if-match", "if-none-match")
    }
    enc = lower.get("content-encoding")
    if enc:
        parts = [p.strip() for p in enc.split(",") if p.strip() and p.strip() != "aws-chunked"]
        if parts:
            out["content-encoding"] = ", ".join(parts)
    out.update(user_metadata(lower))
    return out


def copy_source(bucket: str, key: str) -> str:
    """An ``x-amz-copy-source`` value naming ``bucket/key``."""
    return quote(f"{bucket}/{key}", safe="/~")


def sse_headers(kek_uri: str) -> dict[str, str]:
    return {SSE_HEADER: "aws:kms", SSE_KEY_HEADER: kek_uri}
