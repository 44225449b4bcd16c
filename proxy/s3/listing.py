"""Listing rewrites: plaintext sizes and client ETags, reserved keys hidden.

Sizes come from pure arithmetic on the stored size (``proxy.crypto.plaintext_size``),
so a listing costs exactly the backend's listing requests - never a HEAD per object.
Which entries are encrypted is decided by the policy for their path, plus the
format's impossible sizes (a stored size no v1 object can have is plaintext).
"""

from __future__ import annotations

from datetime import datetime
from urllib.parse import unquote
from xml.etree import ElementTree

from proxy import crypto
from proxy.errors import FormatError
from proxy.layer.decision import KeyPolicy
from proxy.layer.objects import client_etag
from proxy.wire.reserved import RESERVED_PREFIX
from proxy.wire.xmldoc import parse_backend

S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
_Q = f"{{{S3_NS}}}"
ElementTree.register_namespace("", S3_NS)


def _find(el: ElementTree.Element, name: str) -> ElementTree.Element | None:
    found = el.find(_Q + name)
    return found if found is not None else el.find(name)


def _children(el: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    return el.findall(_Q + name) + el.findall(name)


def _iso_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def rewrite_listing(body: bytes, bucket: str, policy: KeyPolicy, url_encoded: bool) -> bytes:
    """Rewrite a ListObjects / ListObjectsV2 / ListObjectVersions result."""
    root = parse_backend(body)
    removed = 0
    for tag in ("Contents", "Version"):
        for entry in _children(root, tag):
            key_el = _find(entry, "Key")
            if key_el is None or key_el.text is None:
                continue
            key = unquote(key_el.text) if url_encoded else key_el.text
            if key.startswith(RESERVED_PREFIX):
                root.remove(entry)
                removed += 1
                continue
            size_el = _find(entry, "Size")
            modified_el = _find(entry, "LastModified")
            modified = _iso_time(modified_el.text if modified_el is not None else None)
            if (
                size_el is None
                or size_el.text is None
                or not policy.may_be_encrypted(bucket, key, modified)
            ):
                continue
            try:
                plain = crypto.plaintext_size(int(size_el.text))
            except (FormatError, ValueError):
                continue  # cannot be a v1 object: stored as sent
            size_el.text = str(plain)
            etag_el = _find(entry, "ETag")
            if etag_el is not None and etag_el.text:
                etag_el.text = client_etag(etag_el.text, True)
    for tag in ("CommonPrefixes",):
        for cp in _children(root, tag):
            p = _find(cp, "Prefix")
            if p is not None and p.text:
                text = unquote(p.text) if url_encoded else p.text
                if text.startswith(RESERVED_PREFIX):
                    root.remove(cp)
    if removed:
        kc = _find(root, "KeyCount")
        if kc is not None and kc.text and kc.text.isdigit():
            kc.text = str(max(0, int(kc.text) - removed))
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ElementTree.tostring(root)
