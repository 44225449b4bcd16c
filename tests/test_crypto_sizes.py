"""Size arithmetic and range planning (docs/FORMAT.md section 6)."""

from __future__ import annotations

import pytest

from proxy.crypto import (
    SEGMENT_SIZE,
    STORED_SEGMENT_SIZE,
    SegmentRange,
    ciphertext_size,
    plaintext_size,
    plan_range,
    segment_count,
)
from proxy.errors import FormatError

S = SEGMENT_SIZE
T = STORED_SEGMENT_SIZE
BOUNDARY_SIZES = [0, 1, 2, S - 1, S, S + 1, 2 * S - 1, 2 * S, 2 * S + 1, 3 * S + 5, 10 * S]


@pytest.mark.parametrize(
    ("plain", "stored", "segments"),
    [
        (0, 32, 1),
        (1, 33, 1),
        (S - 1, S + 31, 1),
        (S, S + 32, 1),
        (S + 1, S + 65, 2),
        (3 * S + 5, 3 * S + 5 + 4 * 32, 4),
        (5 * 2**40, 5 * 2**40 + 32 * 5 * 2**24, 5 * 2**24),
    ],
)
def test_known_sizes(plain: int, stored: int, segments: int) -> None:
    assert ciphertext_size(plain) == stored
    assert plaintext_size(stored) == plain
    assert segment_count(stored) == segments


def test_inverse_over_many_sizes() -> None:
    for p in list(range(0, 300)) + [k * S + d for k in range(1, 6) for d in range(-40, 41)]:
        c = ciphertext_size(p)
        assert plaintext_size(c) == p
        assert segment_count(c) == max(1, -(-p // S))


def test_impossible_sizes_raise() -> None:
    for c in range(32):
        with pytest.raises(FormatError):
            plaintext_size(c)
    for k in range(1, 4):
        for r in range(1, 33):  # residues 1..31 never occur; 32 only for the empty object
            with pytest.raises(FormatError):
                plaintext_size(k * T + r)
            with pytest.raises(FormatError):
                segment_count(k * T + r)
    valid = {ciphertext_size(p) for p in range(0, 4 * S + 1)}
    for c in range(0, 4 * T + 1):
        if c in valid:
            assert ciphertext_size(plaintext_size(c)) == c
        else:
            with pytest.raises(FormatError):
                plaintext_size(c)


def test_negative_plaintext_size() -> None:
    with pytest.raises(ValueError):
        ciphertext_size(-1)


def reference_plan(size: int, start: int, end: int) -> SegmentRange:
    """Brute force: walk the stored layout segment by segment."""
    segs = []  # (plain_start, plain_end_exclusive, ct_start, ct_end_exclusive)
    p = c = 0
    n = max(1, -(-size // S))
    for _ in range(n):
        length = min(S, size - p)
        segs.append((p, p + length, c, c + length + 32))
        p += length
        c += length + 32
    wanted = [i for i, (a, b, _, _) in enumerate(segs) if a <= end and start < b]
    first, last = wanted[0], wanted[-1]
    return SegmentRange(
        first_segment=first,
        last_segment=last,
        ct_start=segs[first][2],
        ct_end=segs[last][3] - 1,
        skip=start - segs[first][0],
        length=end - start + 1,
    )


@pytest.mark.parametrize("size", [1, 2, S - 1, S, S + 1, 2 * S, 2 * S + 1, 3 * S + 5])
def test_plan_range_matches_reference_at_boundaries(size: int) -> None:
    points = sorted(
        {
            q
            for k in range(0, 5)
            for q in (k * S - 2, k * S - 1, k * S, k * S + 1, k * S + 2)
            if 0 <= q < size
        }
        | {0, size - 1}
    )
    for start in points:
        for end in points:
            if start <= end:
                assert plan_range(size, start, end) == reference_plan(size, start, end)


def test_plan_range_all_ranges_small_object() -> None:
    for size in (1, 2, 3, 7):
        for start in range(size):
            for end in range(start, size):
                assert plan_range(size, start, end) == reference_plan(size, start, end)


def test_plan_range_fetches_only_needed_segments() -> None:
    r = plan_range(10 * S, 5 * S + 3, 5 * S + 10)
    assert (r.first_segment, r.last_segment) == (5, 5)
    assert (r.ct_start, r.ct_end) == (5 * T, 6 * T - 1)
    assert (r.skip, r.length) == (3, 8)


@pytest.mark.parametrize(
    ("size", "start", "end"), [(0, 0, 0), (10, -1, 5), (10, 5, 4), (10, 0, 10)]
)
def test_plan_range_rejects_bad_ranges(size: int, start: int, end: int) -> None:
    with pytest.raises(ValueError):
        plan_range(size, start, end)
