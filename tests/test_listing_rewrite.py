"""The one-pass text rewrite of listing pages answers what the ElementTree rewrite did.

``tests/listing_reference.py`` is the rewrite before it (parse, edit the tree, serialize).
Every page here goes through both, and the documents they answer must be the same XML:
the same elements, attributes and texts (character references to characters XML cannot
hold compared as the characters they name), with whitespace between elements ignored.
Pages in the form backends write must also come out byte for byte as ElementTree wrote
them, apart from that whitespace, ``<X></X>`` for ``<X />`` and ``>`` for ``&gt;`` in text.
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from typing import Any
from xml.etree import ElementTree

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import Encryption, EncryptionRule
from proxy.control.policy import Policy
from proxy.errors import FormatError, S3Error
from proxy.s3 import listing
from proxy.s3.listing_page import PageText, unescape
from tests import listing_reference as reference

NS = "http://s3.amazonaws.com/doc/2006-03-01/"
SEALER = listing.TokenSealer("secret")
ENCRYPT_ALL = Policy(Encryption(default=EncryptionRule(key="local:///k")))
MIXED = Policy(
    Encryption(
        default=EncryptionRule(
            key="local:///k", encrypted_since=datetime(2026, 1, 1, tzinfo=UTC)
        ),
        buckets={"b/open": EncryptionRule(passthrough=True)},
        unencrypted_paths=["b/tmp/*"],
    )
)
STORED = 4096 + 32  # one full v1 segment: plaintext 4096
Query = tuple[tuple[str, str], ...]


def _run(module: Any, pages: list[bytes], query: Query, policy: Policy) -> bytes:
    queue = list(pages)

    async def fetch(_q: Query) -> bytes:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    out: bytes = asyncio.run(
        module.list_bucket(fetch, query, bucket="b", policy=policy, tokens=SEALER)
    )
    return out


_MARK = re.compile(r"&#x([0-9a-fA-F]+);")


def _tree(doc: bytes) -> Any:
    """The document as nested tuples: tag, attributes, text, children (whitespace dropped)."""
    text = doc.decode()
    # references to characters XML cannot hold: parse them as a private marker
    text = _MARK.sub(lambda m: f"\ue000{int(m.group(1), 16):x}\ue001", text)
    root = ElementTree.fromstring(text.encode())

    def conv(el: ElementTree.Element) -> Any:
        body = (el.text or "").strip() if len(el) else (el.text or "")
        return (el.tag, sorted(el.attrib.items()), body, [conv(c) for c in el])

    return conv(root)


def _same(pages: list[bytes], query: Query = (("list-type", "2"),), policy: Policy = ENCRYPT_ALL,
          exact: bool = True) -> bytes:
    try:
        want = _run(reference, pages, query, policy)
    except (FormatError, S3Error) as exc:
        with pytest.raises(type(exc)):
            _run(listing, pages, query, policy)
        return b""
    got = _run(listing, pages, query, policy)
    assert _tree(got) == _tree(want)
    if exact:
        assert _squeeze(got) == _squeeze(want)
    return got


def _squeeze(doc: bytes) -> bytes:
    """Whitespace between elements dropped; empty elements and ``>`` in text in one form."""
    doc = re.sub(rb"<(\w+) ?/>", rb"<\1></\1>", re.sub(rb">\s+<", b"><", doc))
    return doc.replace(b"&gt;", b">")


def _contents(key: str, size: int = STORED, etag: str = "&quot;abc&quot;",
              modified: str = "2026-12-02T10:00:00.000Z", extra: str = "") -> str:
    return (
        f"<Contents><Key>{key}</Key><LastModified>{modified}</LastModified>"
        f"<ETag>{etag}</ETag>{extra}<Size>{size}</Size>"
        "<StorageClass>STANDARD</StorageClass></Contents>"
    )


def _page(body: str, truncated: bool = False, head: str = "", root: str = "ListBucketResult",
          ns: str = f' xmlns="{NS}"') -> bytes:
    trunc = "true" if truncated else "false"
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<{root}{ns}><Name>b</Name><Prefix></Prefix>'
        f"<KeyCount>9</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>{trunc}</IsTruncated>"
        f"{head}{body}</{root}>"
    ).encode()


PLAIN_PAGES = {
    "aws": _page(
        _contents("a", extra="<ChecksumAlgorithm>CRC32</ChecksumAlgorithm>")
        + _contents("b", etag="&quot;x-2&quot;")
        + "<CommonPrefixes><Prefix>p/</Prefix></CommonPrefixes>"
    ),
    "rclone": (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="{NS}">\n'
        "  <Name>b</Name>\n  <IsTruncated>false</IsTruncated>\n  <Prefix></Prefix>\n"
        "  <Contents>\n    <Key>dir/a.txt</Key>\n    <LastModified>2026-12-02T13:52:51.526Z"
        "</LastModified>\n    <ETag>764efa883dda1e11db47671c4a3bbd9e</ETag>\n"
        f"    <Size>{STORED}</Size>\n    <StorageClass>STANDARD</StorageClass>\n  </Contents>\n"
        "  <EncodingType>url</EncodingType>\n  <KeyCount>1</KeyCount>\n</ListBucketResult>"
    ).encode(),
    "minio-refs": _page(_contents("a&amp;b", etag="&#34;abc&#34;") + _contents("c&#x41;&lt;")),
    "owner": _page(
        _contents("o", extra="<Owner><ID>i</ID><DisplayName>d</DisplayName></Owner>")
        + "<Contents><Key>later</Key><Owner><ID>i</ID></Owner><LastModified>"
        "2026-12-02T10:00:00.000Z</LastModified><Size>4128</Size><ETag>\"e\"</ETag></Contents>"
    ),
    "no-namespace": _page(_contents("a"), ns=""),
    "odd-sizes": _page(
        _contents("s1", size=5) + _contents("s2", size=0)  # no v1 size: as stored
        + "<Contents><Key>s3</Key><Size> 4128 </Size></Contents>"
        + "<Contents><Key>s4</Key><Size/><ETag>e</ETag></Contents>"
        + "<Contents><Key>s5</Key><Size>4128</Size><ETag></ETag></Contents>"
        + "<Contents><Key>s6</Key><Size>x</Size></Contents><Contents/><Contents></Contents>"
    ),
    "empty-fields": _page(
        _contents("a"), head="<NextMarker/><Marker></Marker><Delimiter>/</Delimiter>"
    ),
    "keys": _page(
        "".join(
            _contents(k)
            for k in ["\u00e9t\u00e9", "a\tb", "sp ace", "q\"'", "gt>", "emoji\U0001f600", "\ufffd"]
        )
    ),
    "control-refs": _page(
        _contents("k&#x1;x") + _contents("k&#xD;&#xA;x") + _contents("k&#65534;")
    ),
    "control-raw": _page(_contents("k\x01x") + _contents("k\r\nx") + _contents("k\ufffex")),
    "etag-amp": _page(_contents("a", etag="a&amp;b&lt;")),
}
RESERVED_PAGES = {
    name: _page(_contents("a") + _contents(key) + _contents("z"))
    for name, key in {
        "prefix": ".cmek-proxy/x",
        "case": ".CMEK-Proxy/x",
        "dots": "./.cmek-proxy/x",
        "climb": "a/../.cmek-proxy/x",
        "backslash": ".cmek-proxy\\x",
        "trailing": ".cmek-proxy. /x",
        "kelvin": ".cme\u212a-proxy/x",
        "escaped": ".cmek&#x2D;proxy/x",
    }.items()
}


@pytest.mark.parametrize("name", list(PLAIN_PAGES))
@pytest.mark.parametrize("policy", [ENCRYPT_ALL, MIXED], ids=["encrypt-all", "mixed"])
def test_plain_pages_as_elementtree_wrote_them(name: str, policy: Policy) -> None:
    _same([PLAIN_PAGES[name]], policy=policy)


@pytest.mark.parametrize("name", list(RESERVED_PAGES))
def test_reserved_entries_removed_in_every_spelling(name: str) -> None:
    got = _same([RESERVED_PAGES[name]])
    assert got.count(b"<Contents>") == 2 and b"proxy/x" not in got.lower()


def test_url_encoded_keys() -> None:
    page = _page(_contents("a%20b") + _contents("%2Ecmek-proxy%2Fx") + _contents("c%2F%01"))
    got = _same([page], query=(("list-type", "2"), ("encoding-type", "url")))
    assert got.count(b"<Contents>") == 2


ODD_PAGES = {
    "comment": _page("<!-- a comment -->" + _contents("a") + _contents("b<!-- x -->")),
    "cdata": _page(
        "<Contents><Key><![CDATA[.cmek-proxy/x]]></Key><Size>4128</Size></Contents>"
        + "<Contents><Key><![CDATA[a<Key>&]]></Key><Size>4128</Size></Contents>"
    ),
    "processing-instruction": _page("<?pi x?>" + _contents("a")),
    "attributes": _page('<Contents><Key a="1">k</Key><Size>4128</Size></Contents>'),
    "attribute-gt": _page('<Contents><Key a=">">.cmek-proxy/x</Key><Size>4128</Size></Contents>'),
    "prefixed": (
        f'<s3:ListBucketResult xmlns:s3="{NS}"><s3:IsTruncated>false</s3:IsTruncated>'
        "<s3:Contents><s3:Key>a</s3:Key><s3:Size>4128</s3:Size></s3:Contents>"
        "<s3:Contents><s3:Key>.cmek-proxy/x</s3:Key></s3:Contents></s3:ListBucketResult>"
    ).encode(),
    "attribute-after-size": _page(
        _contents("a", etag="e", extra="")
        .replace("<StorageClass>", '<Owner id="&quot;x&#10;&amp;">o</Owner><StorageClass>')
    ),
    "attribute-quotes-in-tree": _page(
        "<!-- c -->" + _contents("a").replace("<Size>", '<Owner id="&quot;&#10;">o</Owner><Size>')
    ),
    "other-namespace": _page(_contents("a"), ns=' xmlns="urn:other"'),
    "key-in-owner": _page(
        "<Contents><Owner><Key>.cmek-proxy/x</Key></Owner><Key>a</Key><Size>4128</Size>"
        "</Contents><Contents><Owner><Key>a</Key></Owner><Key>.cmek-proxy/y</Key></Contents>"
    ),
    "duplicate-key": _page(
        "<Contents><Key>.cmek-proxy/x</Key><Key>a</Key></Contents>"
        "<Contents><Key>b</Key><Key>.cmek-proxy/x</Key><Size>4128</Size><Size>1</Size></Contents>"
    ),
    "nested-contents": _page("<Contents><Key>a</Key><Contents><Key>b</Key></Contents></Contents>"),
    "key-with-children": _page(
        "<Contents><Key>.cmek-proxy/<b/>x</Key><Size>4128</Size></Contents>"
    ),
    "mixed-text": _page("text" + _contents("a") + "more"),
    "spaced-tags": _page("<Contents ><Key >a</Key ><Size>4128</Size ></Contents >"),
    "self-closed-root": b"<ListBucketResult/>",
    "bom": b"\xef\xbb\xbf" + _page(_contents("a")),
    "invalid-utf8": _page(_contents("a")).replace(b"<Key>a", b"<Key>a\xff\xfe"),
    "version-order": _page(
        "<Version><Key>a</Key><VersionId>1</VersionId><IsLatest>true</IsLatest>"
        "<LastModified>2026-12-02T10:00:00.000Z</LastModified><ETag>e</ETag>"
        f"<Size>{STORED}</Size></Version><DeleteMarker><Key>b</Key><VersionId>2</VersionId>"
        "</DeleteMarker>",
        root="ListVersionsResult",
    ),
}
MALFORMED_PAGES = {
    "truncated": _page(_contents("a"))[:-10],
    "garbage": b"not xml",
    "empty": b"",
    "doctype": b'<!DOCTYPE d [<!ENTITY a "x">]><ListBucketResult>&a;</ListBucketResult>',
    "late-doctype": b"<!--" + b"x" * 2000 + b'--><!DOCTYPE d [<!ENTITY a "x">]><R>&a;</R>',
    "undefined-entity": _page(_contents("&nope;")),
    "undeclared-prefix": b"<x:ListBucketResult></x:ListBucketResult>",
    "two-roots": _page("") + b"<R/>",
    "bad-ref": _page(_contents("&#xZZ;")),
}


@pytest.mark.parametrize("name", list(ODD_PAGES))
def test_odd_well_formed_pages_read_exactly(name: str) -> None:
    _same([ODD_PAGES[name]], exact=False)


@pytest.mark.parametrize("name", list(MALFORMED_PAGES))
def test_malformed_pages_are_format_errors(name: str) -> None:
    with pytest.raises(FormatError):
        _run(listing, [MALFORMED_PAGES[name]], (("list-type", "2"),), ENCRYPT_ALL)


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        ("&quot;0a1b-2&quot;", '"0a1b-2"'),
        ("&amp;quot;", "&quot;"),
        ("&quot;a&amp;quot;&quot;", '"a&quot;"'),
        ("&quot;&lt;&#x41;&#66;&apos;&gt;", "\"<AB'>"),
        ("plain", "plain"),
    ],
)
def test_unescape_reads_references_as_the_parser_does(raw: str, text: str) -> None:
    assert unescape(raw) == text
    assert ElementTree.fromstring(f"<a>{raw}</a>").text == text


def test_late_dtd_refused_and_nothing_resolved() -> None:
    with pytest.raises(FormatError, match="DTD"):
        PageText(MALFORMED_PAGES["late-doctype"])


def test_page_ending_in_reserved_range_is_completed() -> None:
    first = _page(
        _contents("-a") + _contents(".cmek-proxy/x"),
        truncated=True,
        head="<NextContinuationToken>t1</NextContinuationToken>",
    )
    second = _page(
        _contents("z"),
        truncated=True,
        head="<NextContinuationToken>t&amp;2</NextContinuationToken>",
    )
    got = _same([first, second])
    assert b"<KeyCount>2</KeyCount>" in got
    token = re.search(rb"<NextContinuationToken>([^<]+)<", got)
    assert token is not None and SEALER.open(token.group(1).decode()) == "t&2"
    token_query = (("list-type", "2"), ("continuation-token", SEALER.seal("t1")))
    got = _same([first, second], query=token_query)
    assert f"<ContinuationToken>{SEALER.seal('t1')}<".encode() in got


def test_versions_following_past_the_reserved_range() -> None:
    def version(key: str, vid: str) -> str:
        return (
            f"<Version><Key>{key}</Key><VersionId>{vid}</VersionId><IsLatest>true</IsLatest>"
            f"<LastModified>2026-12-02T10:00:00.000Z</LastModified><ETag>e</ETag>"
            f"<Size>{STORED}</Size></Version>"
        )

    first = _page(
        version("-a", "1") + version(".cmek-proxy/x", "2"),
        truncated=True,
        head="<NextKeyMarker>.cmek-proxy/x</NextKeyMarker><NextVersionIdMarker>2"
        "</NextVersionIdMarker>",
        root="ListVersionsResult",
    )
    second = _page(version("b", "3") + version("c", "4"), root="ListVersionsResult")
    got = _same([first, second], query=(("versions", ""), ("max-keys", "2")))
    assert b"<NextKeyMarker>b</NextKeyMarker>" in got


_KEY_CHARS = st.sampled_from(
    ["a", "/", ".", " ", "&amp;", "&lt;", "&gt;", "&quot;", "&#x41;", "&#x1;", "&#xD;", "\x02",
     "\r", "\n", "\t", "\u00e9", "\ufffe", "%2E", "%01", ".cmek-proxy", ".CMEK-PROXY", "\\", ".."]
)
_KEYS = st.lists(_KEY_CHARS, min_size=0, max_size=8).map("".join)


_STAMPS = st.sampled_from(["2025-01-01T00:00:00.000Z", "2026-12-02T10:00:00Z", "", "x"])


@st.composite
def _entries(draw: st.DrawFn) -> str:
    key = draw(_KEYS)
    size = draw(st.sampled_from([0, 5, 32, 33, STORED, 2 * STORED + 40, 10**12]))
    parts = [
        f"<Key>{key}</Key>",
        f"<LastModified>{draw(_STAMPS)}</LastModified>",
        f"<ETag>{draw(st.sampled_from(['&quot;e&quot;', 'e-3', '&#34;x&#34;', '']))}</ETag>",
        f"<Size>{size}</Size>",
        "<StorageClass>STANDARD</StorageClass>",
        "<Owner><ID>o</ID></Owner>",
    ]
    if draw(st.booleans()):
        parts = draw(st.permutations(parts))
    tag = draw(st.sampled_from(["Contents", "Contents", "Contents", "CommonPrefixes"]))
    if tag == "CommonPrefixes":
        return f"<CommonPrefixes><Prefix>{key}</Prefix></CommonPrefixes>"
    space = draw(st.sampled_from(["", "\n  "]))
    return f"<{tag}>{space}{space.join(parts)}{space}</{tag}>"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_entries(), max_size=6),
    st.sampled_from([ENCRYPT_ALL, MIXED]),
    st.booleans(),
    st.sampled_from(["b/", "b/tmp/", "b/open/"]),
)
def test_random_pages_as_the_tree_rewrite(
    entries: list[str], policy: Policy, url: bool, prefix: str
) -> None:
    body = "".join(e.replace("<Key>", f"<Key>{prefix[2:]}", 1) for e in entries)
    query: Query = (("list-type", "2"),) + ((("encoding-type", "url"),) if url else ())
    _same([_page(body)], query=query, policy=policy)


_SPEC_SETS = [
    {},
    {"b": EncryptionRule(key="local:///other")},
    {"b": EncryptionRule(passthrough=True)},
    {"b/tmp": EncryptionRule(passthrough=True)},
    {"b/": EncryptionRule(key="local:///other")},
    {"bb": EncryptionRule(passthrough=True), "c/b": EncryptionRule(passthrough=True)},
    {"b": EncryptionRule(key="local:///x"), "b/p": EncryptionRule(key="local:///y")},
]


@pytest.mark.parametrize("specs", _SPEC_SETS, ids=range(len(_SPEC_SETS)))
@pytest.mark.parametrize("refused", [False, True])
@pytest.mark.parametrize("globs", [[], ["*/tmp/*"]])
@pytest.mark.parametrize("default", ["refuse", "passthrough", "key"])
def test_bucket_decision_is_every_keys_decision(
    specs: dict[str, EncryptionRule], refused: bool, globs: list[str], default: str
) -> None:
    rule: Any = EncryptionRule(key="local:///k") if default == "key" else default
    enc = Encryption(default=rule, unencrypted_paths=globs)
    policy = Policy(enc, specs, refused={n: "no" for n in specs} if refused else None,
                    activations={("b", "default"): 100.0, ("b", "b"): 200.0})
    every = policy.bucket_decision("b")
    if every is None:
        return
    for key in ["", "a", "tmp/x", "p/x", "b/p", ".cmek-proxy/x", "x/tmp/y"]:
        assert policy.decide("b", key) == every
        for modified in (None, 50.0, 150.0, 250.0):
            since = every.encrypted_since
            later = modified is None or since is None or modified >= since
            assert policy.may_be_encrypted("b", key, modified) == (every.encrypt and later)
