"""Listings: plaintext sizes and client ETags, the proxy's own keys never shown or reached.

Sizes come from pure arithmetic on the stored size (``proxy.crypto.plaintext_size``),
so a listing costs exactly the backend's listing requests - never a HEAD per object.
Which entries are encrypted is decided by the policy for their path, plus the
format's impossible sizes (a stored size no v1 object can have is plaintext).

The reserved prefix stays sealed whatever the client asks for:

* every entry that names reserved state (``is_reserved_name``) is removed, in
  ListObjects, ListObjectsV2, ListObjectVersions and ListMultipartUploads;
* a page the backend ended inside the reserved range is completed by a second backend
  request that starts after it (``RESERVED_END``), so no page is ever empty-but-truncated
  and no marker or token a client gets points into the reserved keys;
* continuation tokens are the proxy's own: the backend's token, authenticated with a key
  derived from the backend credentials (``TokenSealer``).  A token the proxy did not issue
  is InvalidArgument, so a client can never hand the backend a position of its choosing.

Keys with characters XML 1.0 cannot carry (control characters, U+FFFE/U+FFFF) do not
break a listing: they survive the rewrite and are written as character references, as S3
writes them; clients that cannot read those ask for ``encoding-type=url``, as the SDKs do.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Final
from urllib.parse import unquote
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from proxy import crypto
from proxy.errors import FormatError, S3Error
from proxy.layer.decision import KeyPolicy
from proxy.layer.objects import client_etag
from proxy.s3.listing_page import ETAG, FIELDS, KEY, LAST_MODIFIED, PREFIX, SIZE, PageText, unescape
from proxy.wire.names import is_reserved_name
from proxy.wire.reserved import RESERVED_PREFIX

S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
ElementTree.register_namespace("", S3_NS)

RESERVED_END: Final = RESERVED_PREFIX + "\x7f"
"""After every key the proxy writes under the reserved prefix (they are all printable
ASCII): a listing that starts after it has left the reserved range."""
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


_RESERVED_WORD: Final = RESERVED_PREFIX.strip("./").casefold()
"""In every key ``is_reserved_name`` is true for, case-folded (folding maps each character on
its own, so the folded key holds the folded segment of every reserved spelling)."""


class Page(PageText):
    """One backend page, its reserved entries removed."""

    def __init__(self, data: bytes, url_encoded: bool) -> None:
        super().__init__(data)
        self.names: list[str] = []
        kept = []
        last_name = ""
        body, protected = self.body, self.protect.found
        for entry in self.entries:
            start, end = entry[3][PREFIX if entry[0] == "CommonPrefixes" else KEY]
            name = body[start:end] if start != end else ""
            if "&" in name:
                name = unescape(name)
            if url_encoded and "%" in name:
                name = unquote(name)
            if protected:
                name = self.protect.real(name)
            if name > last_name:
                last_name = name
            if _RESERVED_WORD in name.casefold() and is_reserved_name(name):
                continue  # a key that does not hold the segment in any case cannot name it
            kept.append(entry)
            self.names.append(name)
        self.entries = kept
        self.truncated = (self.field("IsTruncated") or "").strip().lower() == "true"
        self.ended_in_reserved = self.truncated and last_name.startswith(RESERVED_PREFIX)

    def entry_text(self, index: int, name: str) -> str | None:
        return self.text(self.entries[index][3], FIELDS.index(name))

    def client_entries(self, bucket: str, policy: KeyPolicy) -> list[str]:
        """Each kept entry as the client sees it: plaintext size, client ETag."""
        body = self.body
        out: list[str] = []
        keep = out.append
        times: dict[str, float | None] = {}
        every = policy.bucket_decision(bucket)  # None: each key asks the policy
        if every is not None and not every.encrypt:
            return [body[start:end] for _, start, end, _ in self.entries]
        since = None if every is None else every.encrypted_since
        for (tag, start, end, spans), key in zip(self.entries, self.names, strict=True):
            s0, s1 = spans[SIZE]
            if s0 == s1 or (tag != "Contents" and tag != "Version"):
                keep(body[start:end])
                continue
            if every is None or since is not None:
                t0, t1 = spans[LAST_MODIFIED]
                stamp = body[t0:t1] if t0 != t1 else ""
                if stamp not in times:
                    times[stamp] = _iso_time(unescape(stamp))
                modified = times[stamp]
                if every is None:
                    encrypted = policy.may_be_encrypted(bucket, key, modified)
                else:  # may_be_encrypted's own arithmetic on the bucket's decision
                    encrypted = modified is None or since is None or modified >= since
                if not encrypted:
                    keep(body[start:end])
                    continue
            try:
                size = str(crypto.plaintext_size(int(unescape(body[s0:s1]))))
            except (FormatError, ValueError):
                keep(body[start:end])  # cannot be a v1 object: stored as sent
                continue
            e0, e1 = spans[ETAG]
            if e0 == e1:
                keep(body[start:s0] + size + body[s1:end])
                continue
            etag = client_etag(unescape(body[e0:e1]), True) or ""
            if "&" in etag or "<" in etag or ">" in etag:
                etag = escape(etag)
            if e0 < s0:
                keep(body[start:e0] + etag + body[e1:s0] + size + body[s1:end])
            else:
                keep(body[start:s0] + size + body[s1:e0] + etag + body[e1:end])
        return out


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
        key = current.field("NextKeyMarker")
        if not key:
            break
        next_id = current.field("Next" + id_name + "Marker") or ""
        marker = (("key-marker", key), (id_marker, next_id))
        current = Page(await fetch((*base, *marker, (size_name, "1000"))), url_encoded)
        pages.append(current)
    nexts = {name: current.field(name) for name in NEXT_TAGS}
    kept = 0
    trimmed = False
    for p in pages:
        room = max(0, limit - kept)
        if len(p.entries) > room:
            p.entries, p.names, trimmed = p.entries[:room], p.names[:room], True
        kept += len(p.entries)
    last = next((p for p in reversed(pages) if p.entries), None)
    if trimmed and last is not None:
        nexts["IsTruncated"] = "true"
        nexts["NextKeyMarker"] = last.entry_text(-1, "Key")
        nexts["Next" + id_name + "Marker"] = last.entry_text(-1, id_name)
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
    nexts = {name: page.field(name) for name in NEXT_TAGS}
    if page.ended_in_reserved and ("versions" in given or "uploads" in given):
        pages, nexts = await _follow(fetch, query, page, url_encoded)
    elif page.ended_in_reserved:
        last = Page(await fetch(_jump_query(query, len(page.entries))), url_encoded)
        pages.append(last)
        nexts = {name: last.field(name) for name in NEXT_TAGS}
    fields = _Fields(page)
    for name, value in nexts.items():
        fields.set(name, value)
    next_token = fields.get("NextContinuationToken")
    if next_token:
        fields.set("NextContinuationToken", tokens.seal(next_token))
    if client_token is not None:
        fields.set("ContinuationToken", client_token)
    if fields.get("KeyCount") is not None:
        fields.set("KeyCount", str(sum(len(p.entries) for p in pages)))
    parts = [page.root_open, _as_written("".join(fields.sources()), page.plain)]
    for p in pages:
        parts.append(_as_written("".join(p.client_entries(bucket, policy)), p.plain))
    parts.append(f"</{page.root_name}>")
    out = "".join(parts)
    for p in pages:
        out = p.protect.restore(out)
    return ('<?xml version="1.0" encoding="UTF-8"?>\n' + out).encode()


_REF: Final = re.compile(r"&#(x[0-9a-fA-F]+|[0-9]+);")
_MARKUP: Final = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def _resolve(m: re.Match[str]) -> str:
    ref = m.group(1)
    char = chr(int(ref[1:], 16) if ref[0] == "x" else int(ref))
    return _MARKUP.get(char, char)


def _as_written(text: str, plain: bool) -> str:
    """Element content as ElementTree writes it: the references a backend used for
    characters XML holds (quotes, LF, ...) as the characters (those it cannot hold are
    protected markers here, written as references later). Only for a page read as plain,
    where no tag has attributes; others are ElementTree's writing already."""
    if not plain or "&" not in text:
        return text
    text = text.replace("&quot;", '"').replace("&apos;", "'")
    return _REF.sub(_resolve, text) if "&#" in text else text


class _Fields:
    """The first page's non-entry children, as the client gets them (new ones at the end)."""

    def __init__(self, page: Page) -> None:
        self._page = page
        self._fields = [list(f) for f in page.fields]

    def get(self, name: str) -> str | None:
        for f in self._fields:
            if f[0] == name:
                return None if f[2] is None else unescape(f[2])
        return None

    def set(self, name: str, value: str | None) -> None:
        text = None if value is None else escape(value)
        for i, f in enumerate(self._fields):
            if f[0] == name:
                if text is None:
                    del self._fields[i]
                else:
                    self._fields[i] = [name, f"<{name}>{text}</{name}>", text or None]
                return
        if text is not None:
            self._fields.append([name, f"<{name}>{text}</{name}>", text or None])

    def sources(self) -> list[str]:
        return [f[1] or "" for f in self._fields]
