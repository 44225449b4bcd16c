"""Small S3 XML documents: building answers and reading client and backend documents.

Parsing uses the standard library: expat >= 2.4.1 (checked at import) bounds entity
amplification, and ElementTree never resolves external entities.  A client's document is
parsed stricter still (``parse_client``): any DTD - and so any entity declaration, internal
or external - is refused as MalformedXML before it is read, as defusedxml's forbid_dtd does.
"""

from __future__ import annotations

import pyexpat
import re
from collections.abc import Sequence
from typing import Any, Final
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from proxy.errors import FormatError, S3Error

S3_NS: Final = "http://s3.amazonaws.com/doc/2006-03-01/"
if pyexpat.version_info < (2, 4, 1):
    raise ImportError("cmek-proxy needs expat >= 2.4.1 (entity amplification limits)")


def xml_doc(root: str, fields: Sequence[tuple[str, str]]) -> bytes:
    """``<root xmlns=S3>`` with one text child per field."""
    inner = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in fields)
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<{root} xmlns="{S3_NS}">{inner}</{root}>'
    ).encode()


def local(tag: str) -> str:
    """An element's name without its namespace."""
    return tag.rpartition("}")[2]


XML_CHAR: Final = re.compile("[\t\n\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
"""One character XML 1.0 can hold."""
NEEDS_CARE: Final = re.compile(
    "[^\t\n\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]|\r|&#x[0-9a-fA-F]+;|&#[0-9]+;"
)
"""Raw characters XML 1.0 cannot hold, raw CRs (a parser would read them as LF), and
character references (some of which name such characters)."""


def _unholdable(ref: str) -> bool:
    """Whether a character reference names a character XML 1.0 cannot hold."""
    code = int(ref[3:-1], 16) if ref[2] in "xX" else int(ref[2:-1])
    return code > 0x10FFFF or not XML_CHAR.fullmatch(chr(code))


def parse_backend(data: bytes) -> ElementTree.Element:
    """A backend's XML document.

    A key with characters XML 1.0 cannot hold (S3 allows them in keys; backends write them
    raw or as references) must not make a whole listing unreadable: such characters are read
    as U+FFFD here, for the proxy's own bookkeeping. Listings for clients keep them exactly
    (``proxy.s3.listing``).
    """
    try:
        return ElementTree.fromstring(data)  # noqa: S314 - see module docstring
    except ElementTree.ParseError as exc:
        text = data.decode("utf-8", "replace")
        safe = NEEDS_CARE.sub(
            lambda m: (
                "\ufffd"
                if not m.group(0).startswith("&#") or _unholdable(m.group(0))
                else m.group(0)
            ),
            text.replace("\r\n", "\n"),
        )
        try:
            return ElementTree.fromstring(safe.encode())  # noqa: S314
        except ElementTree.ParseError:
            raise FormatError("backend sent malformed XML") from exc


def malformed_xml() -> S3Error:
    return S3Error(
        "MalformedXML",
        "The XML you provided was not well-formed or did not validate against our "
        "published schema.",
        400,
    )


class _DtdRefused(Exception):
    pass


def _refuse(*_: object) -> Any:
    raise _DtdRefused


def parse_client(data: bytes) -> ElementTree.Element:
    """A client's XML document; MalformedXML for anything not plain, DTD-free XML."""
    builder = ElementTree.TreeBuilder()
    parser = pyexpat.ParserCreate(namespace_separator="}")

    def qname(tag: str) -> str:
        return "{" + tag if "}" in tag else tag

    parser.StartElementHandler = lambda tag, attrs: builder.start(qname(tag), attrs)
    parser.EndElementHandler = lambda tag: builder.end(qname(tag))
    parser.CharacterDataHandler = builder.data
    parser.StartDoctypeDeclHandler = _refuse
    parser.EntityDeclHandler = _refuse
    parser.ExternalEntityRefHandler = _refuse
    parser.SetParamEntityParsing(pyexpat.XML_PARAM_ENTITY_PARSING_NEVER)
    try:
        parser.Parse(data, True)
        return builder.close()
    except (pyexpat.ExpatError, _DtdRefused, AssertionError, IndexError) as exc:
        raise malformed_xml() from exc


def child_text(root: ElementTree.Element, name: str) -> str:
    for el in root:
        if local(el.tag) == name:
            return (el.text or "").strip()
    return ""


def find_text(data: bytes, name: str) -> str:
    """The text of a top-level child of a backend document ("" for an empty body)."""
    if not data.strip():
        return ""
    return child_text(parse_backend(data), name)


def serialize(root: ElementTree.Element) -> bytes:
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ElementTree.tostring(root)


def raise_embedded_error(data: bytes) -> None:
    """S3 may answer Complete/Copy with 200 and an error document."""
    if not data:
        return
    root = parse_backend(data)
    if local(root.tag) == "Error":
        code = child_text(root, "Code") or "InternalError"
        message = child_text(root, "Message") or code
        raise S3Error(code, message, 500 if code == "InternalError" else 400)
