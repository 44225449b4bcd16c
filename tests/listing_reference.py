"""The listing rewrite as it was before the one-pass text rewrite (commit 829618d):
ElementTree parse, tree edits, ElementTree serialization.

Kept only as the oracle of tests/test_listing_rewrite.py, which checks that the text
rewrite in ``proxy.s3.listing`` answers the same document for every backend page.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Final
from urllib.parse import unquote
from xml.etree import ElementTree

from proxy import crypto
from proxy.errors import FormatError, S3Error
from proxy.layer.decision import KeyPolicy
from proxy.layer.objects import client_etag
from proxy.wire.names import is_reserved_name
from proxy.wire.reserved import RESERVED_PREFIX
from proxy.wire.xmldoc import NEEDS_CARE, XML_CHAR, local

S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
ElementTree.register_namespace("", S3_NS)

RESERVED_END: Final = RESERVED_PREFIX + "\x7f"
"""After every key the proxy writes under the reserved prefix (they are all printable
ASCII): a listing that starts after it has left the reserved range."""
ENTRY_TAGS: Final = ("Contents", "Version", "DeleteMarker", "Upload", "CommonPrefixes")
NEXT_TAGS: Final = (
    "IsTruncated",
    "NextMarker",
    "NextContinuationToken",
    "NextKeyMarker",
    "NextVersionIdMarker",
    "NextUploadIdMarker",
)

Fetch = Callable[[tuple[tuple[str, str], ...]], Awaitable[bytes]]


def invalid_token() -> S3Error:
    return S3Error(
        "InvalidArgument",
        "The continuation token provided is incorrect",
        400,
        extra={"ArgumentName": "continuation-token"},
    )


class TokenSealer:
    """Backend continuation tokens wrapped so only tokens the proxy issued come back.

    The key is derived from the backend secret, so tokens survive a restart and work on
    every replica of one deployment.
    """

    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(b"cmek-proxy listing tokens\0" + secret.encode()).digest()

    def _tag(self, token: bytes) -> bytes:
        return hmac.new(self._key, token, hashlib.sha256).digest()[:16]

    def seal(self, backend_token: str) -> str:
        raw = backend_token.encode()
        return base64.urlsafe_b64encode(self._tag(raw) + raw).decode().rstrip("=")

    def open(self, token: str) -> str:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except ValueError:
            raise invalid_token() from None
        tag, inner = raw[:16], raw[16:]
        if len(raw) < 16 or not hmac.compare_digest(tag, self._tag(inner)):
            raise invalid_token()
        try:
            return inner.decode()
        except UnicodeDecodeError:
            raise invalid_token() from None


def _iso_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class _Protected:
    """Characters XML 1.0 cannot hold, swapped for markers around the parse and back."""

    def __init__(self, text: str) -> None:
        self.mark = "cmekc" + secrets.token_hex(8)
        while self.mark in text:
            self.mark = "cmekc" + secrets.token_hex(8)
        self.found = False

    def hide(self, text: str) -> str:
        def sub(m: re.Match[str]) -> str:
            s = m.group(0)
            if s.startswith("&#"):
                code = int(s[3:-1], 16) if s[2] == "x" else int(s[2:-1])
                if code != 0x0D and code <= 0x10FFFF and XML_CHAR.fullmatch(chr(code)):
                    return s  # an ordinary reference: the parser reads it right
            else:
                code = ord(s)
            self.found = True
            return f"{self.mark}{code:x}."

        return NEEDS_CARE.sub(sub, text)

    def restore(self, text: str) -> str:
        if not self.found:
            return text
        return re.sub(re.escape(self.mark) + "([0-9a-f]+)[.]", lambda m: f"&#x{m.group(1)};", text)

    def real(self, text: str) -> str:
        """The key a protected text stands for (for the reserved-name check)."""
        if not self.found:
            return text
        return re.sub(
            re.escape(self.mark) + "([0-9a-f]+)[.]",
            lambda m: chr(min(int(m.group(1), 16), 0x10FFFF)),
            text,
        )


def parse_listing(data: bytes) -> tuple[ElementTree.Element, _Protected]:
    text = data.decode("utf-8", "replace")
    protect = _Protected(text)
    hidden = protect.hide(text)
    hidden = re.sub(r"^<\?xml[^>]*\?>", "", hidden.lstrip())
    if "<!DOCTYPE" in hidden[:1024].upper():
        raise FormatError("backend listing carries a DTD")  # nothing of it is ever resolved
    try:
        return ElementTree.fromstring(hidden), protect
    except ElementTree.ParseError as exc:
        raise FormatError("backend sent a malformed listing") from exc


def _text(el: ElementTree.Element, name: str) -> str | None:
    for child in el:
        if local(child.tag) == name:
            return child.text
    return None


def _set(root: ElementTree.Element, name: str, value: str | None) -> None:
    for child in list(root):
        if local(child.tag) == name:
            if value is None:
                root.remove(child)
            else:
                child.text = value
            return
    if value is not None:
        ElementTree.SubElement(root, f"{{{S3_NS}}}{name}" if root.tag.startswith("{") else name)
        _set(root, name, value)


class Page:
    """One backend page, its reserved entries removed."""

    def __init__(self, data: bytes, url_encoded: bool) -> None:
        self.root, self.protect = parse_listing(data)
        self.entries: list[ElementTree.Element] = []
        self.ended_in_reserved = False
        last_name = ""
        for el in list(self.root):
            if local(el.tag) not in ENTRY_TAGS:
                continue
            self.root.remove(el)
            raw = _text(el, "Prefix" if local(el.tag) == "CommonPrefixes" else "Key") or ""
            name = self.protect.real(unquote(raw) if url_encoded else raw)
            last_name = max(last_name, name)
            if not is_reserved_name(name):
                self.entries.append(el)
        truncated = (_text(self.root, "IsTruncated") or "").strip().lower() == "true"
        self.truncated = truncated
        self.ended_in_reserved = truncated and last_name.startswith(RESERVED_PREFIX)


def _jump_query(query: tuple[tuple[str, str], ...], kept: int) -> tuple[tuple[str, str], ...]:
    """The client's query, restarted after the reserved range, for what is left of a page."""
    given = dict(query)
    try:
        max_keys = int(given.get("max-keys", "1000"))
    except ValueError:
        max_keys = 1000
    drop = {
        "marker",
        "start-after",
        "continuation-token",
        "key-marker",
        "version-id-marker",
        "upload-id-marker",
        "max-keys",
        "max-uploads",
    }
    out = [(k, v) for k, v in query if k not in drop]
    if "versions" in given or "uploads" in given:
        out.append(("key-marker", RESERVED_END))
    elif given.get("list-type") == "2":
        out.append(("start-after", RESERVED_END))
    else:
        out.append(("marker", RESERVED_END))
    out.append(("max-uploads" if "uploads" in given else "max-keys", str(max(1, max_keys - kept))))
    return tuple(out)


MAX_HOPS: Final = 20
"""Backend pages of reserved versions or uploads skipped per client page, at most."""


async def _follow(
    fetch: Fetch, query: tuple[tuple[str, str], ...], page: Page, url_encoded: bool
) -> tuple[list[Page], dict[str, str | None]]:
    """Versions and uploads: page on with the backend's own markers past the reserved range
    (moto drops the first key after a bare ``key-marker``, so no jump there), then cut the
    result to what the client asked for, with markers at the last entry kept."""
    uploads = dict(query).get("uploads") is not None
    id_name = "UploadId" if uploads else "VersionId"
    id_marker = "upload-id-marker" if uploads else "version-id-marker"
    size_name = "max-uploads" if uploads else "max-keys"
    try:
        limit = int(dict(query).get(size_name, "1000"))
    except ValueError:
        limit = 1000
    base = tuple((k, v) for k, v in query if k not in ("key-marker", id_marker, size_name))
    pages = [page]
    current = page
    while current.ended_in_reserved and len(pages) <= MAX_HOPS:
        key = _text(current.root, "NextKeyMarker")
        if not key:
            break
        next_id = _text(current.root, "Next" + id_name + "Marker") or ""
        marker = (("key-marker", key), (id_marker, next_id))
        current = Page(await fetch((*base, *marker, (size_name, "1000"))), url_encoded)
        pages.append(current)
    nexts = {name: _text(current.root, name) for name in NEXT_TAGS}
    kept = 0
    trimmed = False
    for p in pages:
        room = max(0, limit - kept)
        if len(p.entries) > room:
            p.entries, trimmed = p.entries[:room], True
        kept += len(p.entries)
    last_el = next((e for p in reversed(pages) for e in reversed(p.entries)), None)
    if trimmed and last_el is not None:
        nexts["IsTruncated"] = "true"
        nexts["NextKeyMarker"] = _text(last_el, "Key")
        nexts["Next" + id_name + "Marker"] = _text(last_el, id_name)
    return pages, nexts


async def list_bucket(
    fetch: Fetch,
    query: tuple[tuple[str, str], ...],
    *,
    bucket: str,
    policy: KeyPolicy,
    tokens: TokenSealer,
) -> bytes:
    """Run one client listing against the backend and rewrite it for the client."""
    given = dict(query)
    url_encoded = given.get("encoding-type") == "url"
    client_token = given.get("continuation-token")
    if client_token is not None:
        inner = tokens.open(client_token)
        query = tuple((k, inner if k == "continuation-token" else v) for k, v in query)
    page = Page(await fetch(query), url_encoded)
    pages = [page]
    nexts = {name: _text(page.root, name) for name in NEXT_TAGS}
    if page.ended_in_reserved and ("versions" in given or "uploads" in given):
        pages, nexts = await _follow(fetch, query, page, url_encoded)
    elif page.ended_in_reserved:
        last = Page(await fetch(_jump_query(query, len(page.entries))), url_encoded)
        pages.append(last)
        nexts = {name: _text(last.root, name) for name in NEXT_TAGS}
    root = page.root
    for name, value in nexts.items():
        _set(root, name, value)
    next_token = _text(root, "NextContinuationToken")
    if next_token:
        _set(root, "NextContinuationToken", tokens.seal(next_token))
    if client_token is not None:
        _set(root, "ContinuationToken", client_token)
    if _text(root, "KeyCount") is not None:
        _set(root, "KeyCount", str(sum(len(p.entries) for p in pages)))
    for p in pages:
        for el in p.entries:
            if local(el.tag) in ("Contents", "Version"):
                _plaintext_view(el, bucket, policy, url_encoded, p.protect)
            root.append(el)
    out = ElementTree.tostring(root, encoding="unicode").replace("\r", "&#xD;")
    for p in pages:
        out = p.protect.restore(out)
    return ('<?xml version="1.0" encoding="UTF-8"?>\n' + out).encode()


def _plaintext_view(
    entry: ElementTree.Element,
    bucket: str,
    policy: KeyPolicy,
    url_encoded: bool,
    protect: _Protected,
) -> None:
    """Plaintext size and client ETag for an entry that may be encrypted."""
    raw = _text(entry, "Key") or ""
    key = protect.real(unquote(raw) if url_encoded else raw)
    size_el = next((c for c in entry if local(c.tag) == "Size"), None)
    modified = _iso_time(_text(entry, "LastModified"))
    if size_el is None or size_el.text is None:
        return
    if not policy.may_be_encrypted(bucket, key, modified):
        return
    try:
        plain = crypto.plaintext_size(int(size_el.text))
    except (FormatError, ValueError):
        return  # cannot be a v1 object: stored as sent
    size_el.text = str(plain)
    etag_el = next((c for c in entry if local(c.tag) == "ETag"), None)
    if etag_el is not None and etag_el.text:
        etag_el.text = client_etag(etag_el.text, True)
