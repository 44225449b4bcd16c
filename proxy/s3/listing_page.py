"""One backend listing page read as text: its top-level fields and entries, in one pass.

A listing page is rewritten by text substitution (``proxy.s3.listing``), never parsed into
a tree and serialized again; this module finds what the rewrite needs:

* the document is checked well-formed by expat first (a DTD anywhere is refused, nothing is
  resolved), so every ``<`` in it starts markup;
* a page in the plain form backends write - no comments, CDATA sections or processing
  instructions, tags without attributes or namespace prefixes - is cut by regular
  expressions into its root's children (each a whole element: a child covering the root
  contiguously cannot be a nested same-name element, by counting its start and end tags);
* any other well-formed page is first rewritten into that form by ElementTree (tags by their
  local name, the root's namespace declared on it, whitespace between children dropped), so
  odd documents are read exactly rather than guessed at.

Characters XML 1.0 cannot hold are protected the same way as before (``Protected``): only a
page that holds one pays for the swap.
"""

from __future__ import annotations

import pyexpat
import re
import secrets
from operator import itemgetter
from typing import Final
from xml.etree import ElementTree

from proxy.errors import FormatError
from proxy.wire.xmldoc import NEEDS_CARE, XML_CHAR, local

ENTRY_TAGS: Final = frozenset({"Contents", "Version", "DeleteMarker", "Upload", "CommonPrefixes"})
_NAME: Final = r"[A-Za-z_][\w.-]*"
_ROOT: Final = re.compile(rf"\s*<({_NAME})(\s+[^\s>/][^>]*?)?\s*(/?)>")
_CHILD: Final = re.compile(
    r"\s*<(?P<tag>Contents|Version)>\s*<Key>(?P<Key>[^<]*+)</Key>"
    r"(?:\s*<VersionId>(?P<VersionId>[^<]*+)</VersionId>\s*<IsLatest>[^<]*+</IsLatest>)?"
    r"\s*<LastModified>(?P<LastModified>[^<]*+)</LastModified>\s*<ETag>(?P<ETag>[^<]*+)</ETag>"
    r"(?:\s*<(?P<sum>Checksum[A-Za-z0-9]*)>[^<]*+</(?P=sum)>)*\s*<Size>(?P<Size>[^<]*+)</Size>"
    rf"[^<]*+(?:<(?!/(?P=tag)>)/?{_NAME} ?/?>[^<]*+)*+</(?P=tag)>"
    rf"|\s*<(?P<name>{_NAME})(?P<attrs>\s+[^\s>/][^>]*?)?\s*"
    r"(?:/>|>(?P<inner>[^<]*+(?:<(?!/(?P=name)>)[^<]*+)*)</(?P=name)>)"
)
"""One child of the root, whole: an entry in the order every backend writes it (no tag in
it with attributes), with the spans of its direct children the rewrite needs; or any
element, self-closed or up to its end tag."""
_TAG: Final = re.compile(rf"<(/?)({_NAME})(\s+[^\s>/][^>]*?)?\s*(/?)>")
_LEAF: Final = re.compile(rf"\s*<({_NAME})>([^<]*)</\1>|\s*<({_NAME}) ?/>")
_REF: Final = re.compile(r"&#(?:x[0-9a-fA-F]+|[0-9]+);")
_ENTITY: Final = re.compile(r"&(#x[0-9a-fA-F]+|#[0-9]+|lt|gt|amp|quot|apos);")
_NAMED: Final = {"lt": "<", "gt": ">", "amp": "&", "quot": '"', "apos": "'"}
_CONTROLS: Final = bytes(b for b in range(32) if b not in (9, 10))
"""Bytes XML 1.0 cannot hold raw (CR included: a parser reads it as LF)."""


Span = tuple[int, int]
Spans = tuple[Span, ...]
"""Where the text of an entry's direct children is (the first of each name): one span per
name of ``FIELDS``, ``NO_SPAN`` for a child the entry does not have."""
FIELDS: Final = ("Key", "VersionId", "LastModified", "ETag", "Size", "Prefix", "UploadId")
KEY, VERSION_ID, LAST_MODIFIED, ETAG, SIZE, PREFIX, UPLOAD_ID = range(len(FIELDS))
NO_SPAN: Final = (-1, -1)
_FAST_SPANS = itemgetter(*(_CHILD.groupindex[n] for n in FIELDS[:5]))
"""A backend-order entry's match: the spans of its groups for the first ``FIELDS``."""
_REST: Final = (NO_SPAN,) * (len(FIELDS) - 5)
_TAG_GROUP: Final = _CHILD.groupindex["tag"]


def _entity(m: re.Match[str]) -> str:
    ref = m.group(1)
    if ref[0] == "#":
        return chr(int(ref[2:], 16) if ref[1] == "x" else int(ref[1:]))
    return _NAMED[ref]


def unescape(raw: str) -> str:
    """The text of a well-formed element's raw content without markup (no DTD: the five
    predefined entities and character references only)."""
    if "&" not in raw:
        return raw
    quoted = raw.replace("&quot;", '"')  # an ETag's quotes: every "&" starts a reference
    if "&" not in quoted:
        return quoted
    return _ENTITY.sub(_entity, raw)


def _ref_code(ref: str) -> int:
    """The code point of a character reference ``&#...;``."""
    return int(ref[3:-1], 16) if ref[2] == "x" else int(ref[2:-1])


def _holdable(code: int) -> bool:
    return code != 0x0D and code <= 0x10FFFF and XML_CHAR.fullmatch(chr(code)) is not None


class Protected:
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
                code = _ref_code(s)
                if _holdable(code):
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


def _needs_care(data: bytes, text: str) -> bool:
    """Whether ``text`` holds anything ``Protected.hide`` would swap (a cheap exact test)."""
    if len(data.translate(None, _CONTROLS)) != len(data):
        return True
    if not text.isascii() and ("\ufffe" in text or "\uffff" in text):
        return True
    if "&#" in text:
        for ref in set(_REF.findall(text)):
            if not _holdable(_ref_code(ref)):
                return True
    return False


def _refuse_dtd(*_: object) -> None:
    raise FormatError("backend listing carries a DTD")  # nothing of it is ever resolved


def _check_well_formed(text: str) -> None:
    if "<!DOCTYPE" in text[:1024].upper():
        _refuse_dtd()
    parser = pyexpat.ParserCreate(namespace_separator="}")
    parser.StartDoctypeDeclHandler = _refuse_dtd
    try:
        parser.Parse(text, True)
    except pyexpat.ExpatError as exc:
        raise FormatError("backend sent a malformed listing") from exc


def _local_tree(text: str) -> tuple[ElementTree.Element, str]:
    """A well-formed document's tree, tags by their local name; its root's start tag."""
    try:
        root = ElementTree.fromstring(text)  # noqa: S314 - checked DTD-free above
    except ElementTree.ParseError as exc:  # pragma: no cover - expat accepted it already
        raise FormatError("backend sent a malformed listing") from exc
    namespace = root.tag[1:].partition("}")[0] if root.tag.startswith("{") else ""
    for el in root.iter():
        el.tag = local(el.tag)
    shell = ElementTree.Element(root.tag, root.attrib)
    if namespace:
        shell.set("xmlns", namespace)
    start = ElementTree.tostring(shell, encoding="unicode")
    return root, start.removesuffix(" />") + ">"


class PageText:
    """A backend page: its root, its non-entry children and its entries, as source text.

    ``fields``: ``[name, source, text]`` per non-entry child, in order (``text`` its raw text
    content, None when empty, as ElementTree has it). ``entries``: ``(tag, start, end,
    spans)`` of each entry element in ``body``, ``spans`` where its direct children's text is.
    """

    body: str
    root_name: str
    root_open: str
    fields: list[list[str | None]]
    entries: list[tuple[str, int, int, Spans]]

    def __init__(self, data: bytes) -> None:
        text = data.decode("utf-8", "replace")
        self.protect = Protected(text)
        if _needs_care(data, text):
            text = self.protect.hide(text)
        text = re.sub(r"^<\?xml[^>]*\?>", "", text.lstrip())
        _check_well_formed(text)
        self.plain = "<!" not in text and "<?" not in text
        if not (self.plain and self._cut(text)):
            self.plain = False
            self._from_tree(text)

    def _from_tree(self, text: str) -> None:
        """Any other well-formed page: each child of the root as ElementTree writes it."""
        root, self.root_open = _local_tree(text)
        self.root_name = root.tag
        self.fields, self.entries = [], []
        pieces = [self.root_open]
        pos = len(self.root_open)
        for child in root:
            child.tail = None
            source = ElementTree.tostring(child, encoding="unicode")
            start, pos = pos, pos + len(source)
            pieces.append(source)
            inner, close = source.index(">") + 1, source.rfind("</")
            if child.tag in ENTRY_TAGS:
                found = (self._spans(source, inner, close) if close > 0 else None) or {}
                spans = tuple(
                    (found[n][0] + start, found[n][1] + start) if n in found else NO_SPAN
                    for n in FIELDS
                )
                self.entries.append((child.tag, start, pos, spans))
                continue
            raw = source[inner:close] if close > 0 else ""
            self.fields.append([child.tag, source, raw.partition("<")[0] or None])
        self.body = "".join(pieces) + f"</{self.root_name}>"

    def _cut(self, text: str) -> bool:
        root = _ROOT.match(text)
        if root is None:
            return False
        self.body = text
        self.root_name = root.group(1)
        self.root_open = f"<{root.group(1)}{root.group(2) or ''}>"
        self.fields = []
        self.entries = []
        pos = root.end()
        end_tag = "" if root.group(3) else f"</{self.root_name}>"
        entries = self.entries
        for m in _CHILD.finditer(text, pos):
            regs = m.regs
            if regs[0][0] != pos:
                return False
            pos = regs[0][1]
            tag_at = regs[_TAG_GROUP][0]
            if tag_at >= 0:  # an entry as backends write it: its spans are known
                tag = "Contents" if text[tag_at] == "C" else "Version"
                entries.append((tag, tag_at - 1, pos, _FAST_SPANS(regs) + _REST))
                continue
            name = m.group("name")
            if m.group("attrs") and self.plain:
                return False
            inner = m.group("inner")
            if name in ENTRY_TAGS:
                found = self._spans(text, m.start("inner"), m.end("inner")) if inner else {}
                if found is None:
                    return False
                spans = tuple(found.get(n, NO_SPAN) for n in FIELDS)
                self.entries.append((name, m.start("name") - 1, pos, spans))
                continue
            if inner and "<" in inner:
                inner = inner[: inner.index("<")]
            self.fields.append([name, text[m.start("name") - 1 : pos], inner or None])
        return text[pos:].strip() == end_tag

    def field(self, name: str) -> str | None:
        """The text of the first non-entry child called ``name`` (None: none, or empty)."""
        for f in self.fields:
            if f[0] == name:
                return None if f[2] is None else unescape(f[2])
        return None

    def _spans(self, body: str, pos: int, close: int) -> dict[str, Span] | None:
        """Where the text of an entry's direct children is (the entry's content: ``pos`` to
        ``close`` in ``body``); None for a tag with attributes in a page read as plain."""
        out: dict[str, Span] = {}
        while True:  # the leaf children every backend writes: one expression each
            m = _LEAF.match(body, pos, close)
            if m is None:
                break
            pos = m.end()
            if m.group(1) is not None:
                out.setdefault(m.group(1), m.span(2))
            else:
                out.setdefault(m.group(3), (pos, pos))
        if pos < close and body[pos:close].strip():
            return self._nested(body, pos, close, out)
        return out

    def _nested(
        self, body: str, pos: int, close: int, out: dict[str, Span]
    ) -> dict[str, Span] | None:
        """The rest of an entry from its first child with children of its own, by depth."""
        depth = text_at = text_end = found = 0
        for m in _TAG.finditer(body, pos, close):
            found += 1
            if m.group(3) and self.plain:
                return None
            if m.group(1):
                depth -= 1
                if depth == 0:
                    out.setdefault(m.group(2), (text_at, text_end or m.start()))
            elif depth == 0:
                if m.group(4):
                    out.setdefault(m.group(2), (m.end(), m.end()))
                else:
                    text_at, text_end, depth = m.end(), 0, 1
            else:
                if depth == 1 and not text_end:
                    text_end = m.start()
                depth += 0 if m.group(4) else 1
        if found != body.count("<", pos, close):  # pragma: no cover - expat checked it
            raise FormatError("backend sent a listing the proxy cannot read")
        return out

    def text(self, spans: Spans, field: int) -> str | None:
        """An entry child's text (None: no such child, or empty), as ElementTree has it."""
        start, end = spans[field]
        return None if start == end else unescape(self.body[start:end])
