"""Format v2: the multipart layout bound into the envelope (docs/FORMAT.md section 5.1).

Every case of issue 10 point 5 - parts reordered, a segment copied over another, a part
stored twice, the last part dropped - fails on full and ranged reads before any plaintext of
the bad segment is released; the v1 reads of the same bodies show what v1 cannot detect.
"""

from __future__ import annotations

import os

import pytest

from proxy import crypto
from proxy.crypto import PartLayout, PartRun, StreamDecryptor
from proxy.errors import FormatError, IntegrityError

S = crypto.SEGMENT_SIZE
STORED = crypto.STORED_SEGMENT_SIZE
KEY = bytes(range(32))
DATA_KEY = bytes(range(32, 64))


def _object(sizes: list[int]) -> tuple[bytes, list[bytes], PartLayout]:
    """A multipart body of parts 1..n of ``sizes``; its plaintext parts and layout."""
    plains = [os.urandom(n) for n in sizes]
    body = b"".join(crypto.encrypt_all(KEY, p, i) for i, p in enumerate(plains, 1))
    layout = PartLayout.from_parts(enumerate(sizes, 1))
    assert layout is not None
    return body, plains, layout


def _read(
    body: bytes, first: int, last: int, layout: PartLayout | None, total: int | None = None
) -> list[bytes]:
    """Segments ``first..last`` decrypted one at a time: what a reader would release."""
    total = total if total is not None else crypto.segment_count(len(body))
    dec = StreamDecryptor(
        KEY,
        multipart=True,
        first_segment=first,
        last_segment=last,
        total_segments=total,
        layout=layout,
    )
    out = []
    for g in range(first, last + 1):
        out.append(dec.update(body[g * STORED : (g + 1) * STORED]))
    out.append(dec.finalize())
    return out


def test_layout_runs_and_positions() -> None:
    layout = PartLayout.from_parts([(1, 2 * S), (2, 2 * S), (3, 2 * S), (5, 10)])
    assert layout is not None
    assert layout.to_text() == "1-3:2,5-5:1"
    assert layout.total_segments == 7
    assert [layout.position(g) for g in range(7)] == [
        (1, 0, False),
        (1, 1, True),
        (2, 0, False),
        (2, 1, True),
        (3, 0, False),
        (3, 1, True),
        (5, 0, True),
    ]
    assert list(layout.parts()) == [(1, 0, 2), (2, 2, 2), (3, 4, 2), (5, 6, 1)]
    assert PartLayout.from_text(layout.to_text()) == layout
    with pytest.raises(IndexError):
        layout.position(7)


def test_unaligned_or_unbindable_layouts_are_none() -> None:
    assert PartLayout.from_parts([(1, S + 1), (2, 5)]) is None  # not whole segments
    assert PartLayout.from_parts([(1, S), (2, 0)]) is None  # empty last of several
    assert PartLayout.from_parts([(1, 0)]) == PartLayout((PartRun(1, 1, 1),))  # empty object
    many = [(n, S * (n % 2 + 1)) for n in range(1, 2 * crypto.MAX_RUNS + 2)]
    assert PartLayout.from_parts(many) is None  # too many runs: the proxy rewrites it


@pytest.mark.parametrize(
    "text",
    ["", "1-2", "1-2:0", "2-1:3", "0-1:1", "1-2:2,2-3:1", "01-2:1", "1-2:1,", "1-10001:1"],
)
def test_malformed_layout_text_is_a_format_error(text: str) -> None:
    with pytest.raises(FormatError):
        PartLayout.from_text(text)


def test_too_many_runs_in_text_is_a_format_error() -> None:
    text = ",".join(f"{n}-{n}:{n % 2 + 1}" for n in range(1, crypto.MAX_RUNS + 2))
    with pytest.raises(FormatError):
        PartLayout.from_text(text)


def test_reordered_parts_fail_before_any_plaintext() -> None:
    body, plains, layout = _object([2 * S, 2 * S, 100])
    swapped = body[2 * STORED : 4 * STORED] + body[: 2 * STORED] + body[4 * STORED :]
    with pytest.raises(IntegrityError, match="bound layout"):
        _read(swapped, 0, 4, layout)  # the first segment already
    with pytest.raises(IntegrityError, match="bound layout"):
        _read(swapped, 0, 0, layout)  # Range: bytes=0-10
    with pytest.raises(IntegrityError, match="bound layout"):
        _read(swapped, 2, 2, layout)
    # v1 (no layout): a range read that starts inside the moved part is served
    assert _read(swapped, 0, 0, None)[0] == plains[1][:S]


def test_segment_copied_over_another_fails() -> None:
    body, plains, layout = _object([3 * S, 100])
    copied = body[:STORED] + body[:STORED] + body[2 * STORED :]
    with pytest.raises(IntegrityError, match="bound layout"):
        _read(copied, 1, 1, layout)
    assert _read(copied, 1, 1, None)[0] == plains[0][:S]  # v1: segment 0's plaintext at 1


def test_part_stored_twice_fails() -> None:
    body, plains, layout = _object([2 * S, 2 * S, 2 * S, 100])
    twice = body[: 2 * STORED] + body[: 2 * STORED] + body[4 * STORED :]
    with pytest.raises(IntegrityError, match="bound layout"):
        _read(twice, 2, 3, layout)
    assert _read(twice, 2, 2, None)[0] == plains[0][:S]  # v1 range read: part 1 again


def test_dropped_last_part_fails_at_once() -> None:
    body, plains, layout = _object([2 * S, 2 * S, 100])
    dropped = body[: 4 * STORED]
    with pytest.raises(IntegrityError, match="bound layout"):
        _read(dropped, 0, 3, layout)
    # v1 full read: a shorter object of parts 1 and 2
    assert b"".join(_read(dropped, 0, 3, None)) == plains[0] + plains[1]


def test_good_body_reads_in_every_range() -> None:
    body, plains, layout = _object([2 * S, 2 * S, 100])
    whole = b"".join(plains)
    total = crypto.segment_count(len(body))
    for first in range(total):
        for last in range(first, total):
            got = b"".join(_read(body, first, last, layout))
            assert got == whole[first * S : (last + 1) * S]


def test_seal_binds_the_layout_and_pending_never_opens_as_completed() -> None:
    layout = PartLayout.from_parts([(1, 2 * S), (2, 100)])
    other = PartLayout.from_parts([(1, S), (2, S), (3, 100)])
    assert layout is not None and other is not None
    bound = crypto.Binding("b", "k", multipart=True, layout=layout)
    sealed = crypto.seal_object_key(DATA_KEY, KEY, bound)
    assert crypto.open_object_key(DATA_KEY, sealed, bound) == KEY
    for wrong in (
        crypto.Binding("b", "k", multipart=True, layout=other),
        crypto.Binding("b", "k", multipart=True, pending=True),
        crypto.Binding("b", "k", multipart=True),
    ):
        with pytest.raises(IntegrityError):
            crypto.open_object_key(DATA_KEY, sealed, wrong)
    pending = crypto.Binding("b", "k", multipart=True, pending=True)
    sealed_pending = crypto.seal_object_key(DATA_KEY, KEY, pending)
    for wrong in (bound, crypto.Binding("b", "k", multipart=True)):
        with pytest.raises(IntegrityError):
            crypto.open_object_key(DATA_KEY, sealed_pending, wrong)


def _meta(**changes: str | None) -> dict[str, str]:
    base = {
        "x-amz-meta-cmek-v": "2",
        "x-amz-meta-cmek-kek": "local:///k",
        "x-amz-meta-cmek-dk": "AAAA",
        "x-amz-meta-cmek-ok": "A" * 80,
        "x-amz-meta-cmek-layout": "m",
        "x-amz-meta-cmek-parts": "1-1:2,2-2:1",
    }
    for name, value in changes.items():
        full = "x-amz-meta-cmek-" + name
        if value is None:
            base.pop(full, None)
        else:
            base[full] = value
    return base


def test_v2_metadata_round_trip_and_errors() -> None:
    env = crypto.from_metadata(_meta())
    assert env is not None and env.layout is not None and not env.pending
    assert crypto.to_metadata(env) == _meta()
    pending = crypto.from_metadata(_meta(layout="p", parts=None))
    assert pending is not None and pending.pending and pending.multipart
    assert crypto.to_metadata(pending) == _meta(layout="p", parts=None)
    for bad in (
        _meta(parts=None),  # v2 multipart without its layout
        _meta(layout="s"),  # v2 is multipart only
        _meta(layout="p"),  # a pending envelope has no layout
        _meta(v="1"),  # a layout in a v1 envelope
        _meta(v="1", layout="p", parts=None),  # pending is v2 only
        _meta(parts="1-1:2,1-1:1"),
        _meta(v="3"),
    ):
        with pytest.raises(FormatError):
            crypto.from_metadata(bad)
