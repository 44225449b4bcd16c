"""Tampering with stored bodies is detected, and no plaintext of a bad segment is released."""

from __future__ import annotations

import os

import pytest

from proxy.crypto import (
    SEGMENT_SIZE,
    STORED_SEGMENT_SIZE,
    StreamDecryptor,
    decrypt_all,
    encrypt_all,
    new_object_key,
    segment_count,
)
from proxy.errors import FormatError, IntegrityError

S = SEGMENT_SIZE
T = STORED_SEGMENT_SIZE
KEY = new_object_key()
DATA = os.urandom(3 * S + 5)
STORED = encrypt_all(KEY, DATA)
TOTAL = 4

REGIONS = {
    "version": 0,
    "flags-final": 1,
    "flags-reserved": 1,
    "part": 3,
    "index": 7,
    "random": 12,
    "ciphertext": 16 + 3,
    "tag": -1,  # last byte of the segment
}


def seg_bounds(stored_len: int, number: int) -> tuple[int, int]:
    start = number * T
    return start, min(start + T, stored_len)


def flip(data: bytes, offset: int, bit: int = 0) -> bytes:
    b = bytearray(data)
    b[offset] ^= 1 << bit
    return bytes(b)


def released_before_failure(
    key: bytes, stored: bytes, *, multipart: bool, total: int, first: int = 0, last: int = -1
) -> tuple[bytes, IntegrityError]:
    """Feed ``stored`` one segment at a time; return the plaintext released before the error."""
    last = total - 1 if last < 0 else last
    dec = StreamDecryptor(
        key, multipart=multipart, first_segment=first, last_segment=last, total_segments=total
    )
    released = []
    try:
        for pos in range(0, len(stored), T):
            released.append(dec.update(stored[pos : pos + T]))
        released.append(dec.finalize())
    except IntegrityError as exc:
        with pytest.raises(IntegrityError):
            dec.update(b"x")
        with pytest.raises(IntegrityError):
            dec.finalize()
        assert KEY.hex() not in str(exc) and key.hex() not in str(exc)
        return b"".join(released), exc
    raise AssertionError("tampering was not detected")


@pytest.mark.parametrize("segment", range(TOTAL))
@pytest.mark.parametrize("region", sorted(REGIONS))
def test_flipped_bit_in_each_region(segment: int, region: str) -> None:
    start, end = seg_bounds(len(STORED), segment)
    offset = start + REGIONS[region] if REGIONS[region] >= 0 else end - 1
    bit = 7 if region == "flags-reserved" else 0
    bad = flip(STORED, offset, bit)
    released, _ = released_before_failure(KEY, bad, multipart=False, total=TOTAL)
    assert released == DATA[: segment * S]
    with pytest.raises(IntegrityError):
        decrypt_all(KEY, bad)


@pytest.mark.parametrize("region", ["version", "flags-final", "part", "index", "random", "tag"])
def test_flipped_bit_in_empty_object(region: str) -> None:
    stored = encrypt_all(KEY, b"")
    offset = REGIONS[region] if REGIONS[region] >= 0 else len(stored) - 1
    with pytest.raises(IntegrityError):
        decrypt_all(KEY, flip(stored, offset))


@pytest.mark.parametrize("multipart", [False, True])
def test_wrong_object_key(multipart: bool) -> None:
    stored = encrypt_all(KEY, DATA, 2 if multipart else 0)
    with pytest.raises(IntegrityError):
        decrypt_all(new_object_key(), stored, multipart=multipart)


@pytest.mark.parametrize(
    "cut", [T, 2 * T, 3 * T, 1, 16, T - 1, T + 100, 3 * T + 20, len(STORED) - 1]
)
def test_truncation(cut: int) -> None:
    bad = STORED[:cut]
    with pytest.raises(FormatError):  # size no body can have, or an IntegrityError
        decrypt_all(KEY, bad)
    # A reader that knows the real size sees the bytes missing.
    released, _ = released_before_failure(KEY, bad, multipart=False, total=TOTAL)
    assert DATA.startswith(released) and len(released) <= (cut // T) * S


@pytest.mark.parametrize("extra", [1, 31, 32, 33, T])
def test_appended_bytes(extra: int) -> None:
    bad = STORED + os.urandom(extra)
    with pytest.raises(FormatError):
        decrypt_all(KEY, bad)
    released, _ = released_before_failure(KEY, bad, multipart=False, total=TOTAL)
    assert DATA.startswith(released)


def test_appended_whole_segment_after_full_final() -> None:
    data = os.urandom(2 * S)
    stored = encrypt_all(KEY, data)
    with pytest.raises(IntegrityError):
        decrypt_all(KEY, stored + stored[:T])
    dec = StreamDecryptor(KEY, multipart=False, first_segment=0, last_segment=1, total_segments=2)
    assert dec.update(stored) == data
    with pytest.raises(IntegrityError):
        dec.update(b"\x00")


def segments(stored: bytes) -> list[bytes]:
    return [stored[i : i + T] for i in range(0, len(stored), T)]


def test_swapped_segments() -> None:
    s = segments(STORED)
    bad = b"".join([s[1], s[0], s[2], s[3]])
    released, _ = released_before_failure(KEY, bad, multipart=False, total=TOTAL)
    assert released == b""
    bad = b"".join([s[0], s[2], s[1], s[3]])
    released, _ = released_before_failure(KEY, bad, multipart=False, total=TOTAL)
    assert released == DATA[:S]


def test_duplicated_segment() -> None:
    s = segments(STORED)
    bad = b"".join([s[0], s[1], s[1], s[3]])
    released, _ = released_before_failure(KEY, bad, multipart=False, total=TOTAL)
    assert released == DATA[: 2 * S]
    bad = b"".join([s[0], s[1], s[1], s[2], s[3]])
    with pytest.raises(IntegrityError):
        decrypt_all(KEY, bad)


def test_removed_middle_segment() -> None:
    s = segments(STORED)
    with pytest.raises(IntegrityError):
        decrypt_all(KEY, b"".join([s[0], s[2], s[3]]))


def test_segment_spliced_from_another_object() -> None:
    other = encrypt_all(new_object_key(), os.urandom(len(DATA)))
    s, o = segments(STORED), segments(other)
    bad = b"".join([s[0], o[1], s[2], s[3]])
    released, _ = released_before_failure(KEY, bad, multipart=False, total=TOTAL)
    assert released == DATA[:S]


def test_segment_from_multipart_part_in_single_part_object() -> None:
    part = encrypt_all(KEY, DATA, 1)  # same object key, but part 1
    s, p = segments(STORED), segments(part)
    with pytest.raises(IntegrityError):
        decrypt_all(KEY, b"".join([s[0], p[1], s[2], s[3]]))
    with pytest.raises(IntegrityError):
        decrypt_all(KEY, part)  # a multipart body read as single-part
    with pytest.raises(IntegrityError):
        decrypt_all(KEY, STORED, multipart=True)  # and the other way round


def test_final_segment_of_shorter_stream_is_not_accepted_early() -> None:
    short = encrypt_all(KEY, DATA[: 2 * S])  # its segment 1 is full and FINAL
    s, t = segments(STORED), segments(short)
    with pytest.raises(IntegrityError):
        decrypt_all(KEY, b"".join([s[0], t[1], s[2], s[3]]))


# --- multipart objects -------------------------------------------------------------------

MP_PARTS = [(1, os.urandom(2 * S)), (2, os.urandom(2 * S)), (4, os.urandom(S + 9))]
MP_PLAIN = b"".join(d for _, d in MP_PARTS)


def mp_stream(number: int, data: bytes, key: bytes = KEY) -> bytes:
    return encrypt_all(key, data, number)


MP = [mp_stream(n, d) for n, d in MP_PARTS]
MP_STORED = b"".join(MP)


def test_multipart_reference_reads() -> None:
    assert decrypt_all(KEY, MP_STORED, multipart=True) == MP_PLAIN


@pytest.mark.parametrize("segment", range(6))
@pytest.mark.parametrize("region", sorted(REGIONS))
def test_multipart_flipped_bits(segment: int, region: str) -> None:
    start, end = seg_bounds(len(MP_STORED), segment)
    offset = start + REGIONS[region] if REGIONS[region] >= 0 else end - 1
    bit = 7 if region == "flags-reserved" else 0
    bad = flip(MP_STORED, offset, bit)
    released, _ = released_before_failure(KEY, bad, multipart=True, total=6)
    assert released == MP_PLAIN[: segment * S]


@pytest.mark.parametrize(
    "streams",
    [
        pytest.param([1, 0, 2], id="parts-out-of-order"),
        pytest.param([0, 0, 2], id="part-duplicated"),
        pytest.param([0, 2, 1], id="parts-swapped-at-end"),
    ],
)
def test_multipart_part_sequence_violations(streams: list[int]) -> None:
    bad = b"".join(MP[i] for i in streams)
    with pytest.raises(FormatError):
        decrypt_all(KEY, bad, multipart=True)


def test_multipart_whole_part_removal_is_a_documented_limit() -> None:
    # docs/FORMAT.md section 8, "Multipart, whole parts": part numbers may have gaps, so a read
    # cannot tell that an aligned middle part or the last part was removed.
    assert decrypt_all(KEY, MP[0] + MP[2], multipart=True) == MP_PARTS[0][1] + MP_PARTS[2][1]
    assert decrypt_all(KEY, MP[0] + MP[1], multipart=True) == MP_PLAIN[: 4 * S]


def test_multipart_part_without_final_before_next_part() -> None:
    p1 = segments(MP[0])
    three = mp_stream(1, os.urandom(3 * S))  # take its non-FINAL segments 0 and 1
    t = segments(three)
    with pytest.raises(IntegrityError):
        decrypt_all(KEY, b"".join([t[0], t[1], MP[1], MP[2]]), multipart=True)
    with pytest.raises(IntegrityError):  # part ends, then the same part continues
        decrypt_all(KEY, b"".join([p1[0], p1[1], p1[1]]) + MP[2], multipart=True)


def test_multipart_new_part_must_start_at_index_zero() -> None:
    p2 = segments(MP[1])
    with pytest.raises(IntegrityError):
        decrypt_all(KEY, MP[0] + p2[1] + MP[2], multipart=True)


def test_multipart_object_must_end_with_final() -> None:
    p1 = segments(MP[0])
    with pytest.raises(IntegrityError):
        decrypt_all(KEY, MP[0] + MP[1] + p1[0], multipart=True)
    three = segments(mp_stream(5, os.urandom(3 * S)))
    with pytest.raises(IntegrityError):
        decrypt_all(KEY, MP_STORED + three[0], multipart=True)


def test_multipart_segment_spliced_from_another_part() -> None:
    s = segments(MP_STORED)
    other = segments(mp_stream(2, os.urandom(2 * S)))  # same key, same part number, re-upload
    # A whole other upload of the part is a valid stream (documented limit) ...
    assert decrypt_all(KEY, b"".join([s[0], s[1], other[0], other[1], s[4], s[5]]), True)
    # ... but segments of the two uploads cannot be mixed.
    for mixed in ([other[0], s[3]], [s[2], other[1]]):
        bad = b"".join([s[0], s[1], *mixed, s[4], s[5]])
        released, _ = released_before_failure(KEY, bad, multipart=True, total=6)
        assert len(released) == 3 * S and released[: 2 * S] == MP_PLAIN[: 2 * S]
        with pytest.raises(IntegrityError):
            decrypt_all(KEY, bad, multipart=True)
    # part 1's segment moved into part 2's place
    with pytest.raises(IntegrityError):
        decrypt_all(KEY, b"".join([s[0], s[1], s[0], s[3], s[4], s[5]]), multipart=True)


def test_multipart_spliced_from_another_upload() -> None:
    other = mp_stream(2, MP_PARTS[1][1], key=new_object_key())
    with pytest.raises(IntegrityError):
        decrypt_all(KEY, MP[0] + other + MP[2], multipart=True)


def test_multipart_non_aligned_part_is_rejected() -> None:
    bad = mp_stream(1, os.urandom(S + 5)) + MP[1] + MP[2]
    with pytest.raises(FormatError):
        decrypt_all(KEY, bad, multipart=True)


def test_multipart_range_read_first_segment_position() -> None:
    s = segments(MP_STORED)
    total = segment_count(len(MP_STORED))
    # Global segment 0 must have index 0, and no segment can claim an index above its position.
    dec = StreamDecryptor(
        KEY, multipart=True, first_segment=0, last_segment=0, total_segments=total
    )
    with pytest.raises(IntegrityError):
        dec.update(s[1])
    later = segments(mp_stream(1, os.urandom(5 * S)))
    dec = StreamDecryptor(
        KEY, multipart=True, first_segment=2, last_segment=2, total_segments=total
    )
    with pytest.raises(IntegrityError):
        dec.update(later[3])
    # A correct range read of the middle of part 2 works.
    dec = StreamDecryptor(
        KEY, multipart=True, first_segment=3, last_segment=4, total_segments=total
    )
    assert dec.update(s[3] + s[4]) + dec.finalize() == MP_PLAIN[3 * S : 5 * S]


def test_range_read_detects_tampering_in_fetched_segment() -> None:
    bad = flip(STORED, 2 * T + 40)
    dec = StreamDecryptor(KEY, multipart=False, first_segment=1, last_segment=2, total_segments=4)
    assert dec.update(bad[T : 2 * T]) == DATA[S : 2 * S]
    with pytest.raises(IntegrityError):
        dec.update(bad[2 * T : 3 * T])
    dec = StreamDecryptor(KEY, multipart=False, first_segment=1, last_segment=2, total_segments=4)
    with pytest.raises(IntegrityError):  # range fed a different segment than it asked for
        dec.update(STORED[2 * T : 3 * T])


@pytest.mark.parametrize("bad", range(16))
def test_one_bad_segment_in_a_chunk_releases_nothing_of_the_chunk(bad: int) -> None:
    """Whole segments of one chunk are opened into one buffer: a chunk whose segment ``bad``
    fails releases none of it (neither the segments before it nor what the failing one's
    decryption wrote), and the stream stays failed."""
    data = os.urandom(16 * S + 100)
    stored = encrypt_all(KEY, data)
    total = segment_count(len(stored))
    lo, hi = seg_bounds(len(stored), bad)
    tampered = flip(stored, lo + 16 + (hi - lo - 16) // 2)
    dec = StreamDecryptor(
        KEY, multipart=False, first_segment=0, last_segment=total - 1, total_segments=total
    )
    released = dec.update(tampered[:5])  # a held partial segment first, then one big chunk
    assert released == b""
    with pytest.raises(IntegrityError, match=f"segment {bad}: authentication failed"):
        released = dec.update(tampered[5:])
    assert released == b""
    with pytest.raises(IntegrityError):
        dec.update(b"x")
    # untampered, the same chunks release exactly the plaintext
    dec = StreamDecryptor(
        KEY, multipart=False, first_segment=0, last_segment=total - 1, total_segments=total
    )
    assert dec.update(stored[:5]) + dec.update(stored[5:]) + dec.finalize() == data
