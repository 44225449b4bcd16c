"""Backend XML: one odd key never makes a whole document unreadable."""

from __future__ import annotations

import pytest

from proxy.errors import FormatError
from proxy.wire.xmldoc import parse_backend


def test_keys_xml_cannot_hold_are_read_as_replacement_characters() -> None:
    doc = b"<R><Key>a&#x1;b</Key><Key>\x01c\r\n</Key><Key>d&amp;&#65;</Key><Key>&#xFFFE;</Key></R>"
    assert [e.text for e in parse_backend(doc)] == ["a\ufffdb", "\ufffdc\n", "d&A", "\ufffd"]


def test_broken_documents_stay_refused() -> None:
    with pytest.raises(FormatError):
        parse_backend(b"<R><Key>a</R>")
