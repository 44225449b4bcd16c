"""Round trips of segment streams: whole bodies, chunked I/O, multipart, range reads."""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.crypto import (
    SEGMENT_SIZE,
    STORED_SEGMENT_SIZE,
    StreamDecryptor,
    StreamEncryptor,
    ciphertext_size,
    decrypt_all,
    encrypt_all,
    new_object_key,
    plan_range,
    segment_count,
    stream_key,
)

S = SEGMENT_SIZE
T = STORED_SEGMENT_SIZE
SIZES = [0, 1, S - 1, S, S + 1, 3 * S + 5]


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    """Cut ``data`` into chunks of the given sizes (cycled), the rest as the last chunk."""
    out = []
    pos = 0
    i = 0
    while pos < len(data):
        step = sizes[i % len(sizes)] if sizes else len(data)
        out.append(data[pos : pos + max(1, step)])
        pos += max(1, step)
        i += 1
    return out


def decrypt_chunks(
    key: bytes, pieces: list[bytes], *, multipart: bool, first: int, last: int, total: int
) -> bytes:
    dec = StreamDecryptor(
        key, multipart=multipart, first_segment=first, last_segment=last, total_segments=total
    )
    return b"".join(dec.update(p) for p in pieces) + dec.finalize()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("part", [0, 3])
def test_round_trip(size: int, part: int) -> None:
    key = new_object_key()
    data = os.urandom(size)
    stored = encrypt_all(key, data, part)
    assert len(stored) == ciphertext_size(size)
    assert decrypt_all(key, stored, multipart=part != 0) == data


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("chunk", [1, 7, 4096, S - 1, S, S + 1, 3 * S])
def test_chunked_round_trip(size: int, chunk: int) -> None:
    key = new_object_key()
    data = os.urandom(size)
    enc = StreamEncryptor(key)
    outs = [enc.update(p) for p in chunked(data, [chunk])]
    outs.append(enc.finalize())
    stored = b"".join(outs)
    assert stored == encrypt_all(key, data, random_bytes=_replay(stored))
    assert all(len(o) % T == 0 for o in outs[:-1])
    assert enc.plaintext_bytes == size and enc.stored_bytes == len(stored)
    total = segment_count(len(stored))
    got = decrypt_chunks(
        key, chunked(stored, [chunk]), multipart=False, first=0, last=total - 1, total=total
    )
    assert got == data


def _replay(stored: bytes) -> Callable[[int], bytes]:
    """random_bytes that replays the random fields of ``stored``'s headers."""
    it = iter([stored[i + 8 : i + 16] for i in range(0, len(stored), T)])
    return lambda n: next(it)


def test_encryptor_holds_back_exactly_one_segment() -> None:
    enc = StreamEncryptor(new_object_key())
    assert enc.update(b"x" * S) == b""
    out = enc.update(b"y")
    assert len(out) == T and out[1] == 0  # not FINAL
    last = enc.finalize()
    assert len(last) == 33 and last[1] == 1  # FINAL


def test_empty_stream_is_one_final_segment() -> None:
    enc = StreamEncryptor(new_object_key(), 7)
    assert enc.update(b"") == b""
    last = enc.finalize()
    assert len(last) == 32
    assert last[:8] == bytes([1, 1, 0, 7, 0, 0, 0, 0])


def test_encryptor_accepts_bytearray_and_memoryview() -> None:
    key = new_object_key()
    data = os.urandom(2 * S + 3)
    enc = StreamEncryptor(key)
    stored = enc.update(bytearray(data[:100])) + enc.update(memoryview(data)[100:]) + enc.finalize()
    assert decrypt_all(key, stored) == data


def test_encryptor_misuse() -> None:
    enc = StreamEncryptor(new_object_key())
    enc.finalize()
    with pytest.raises(ValueError):
        enc.update(b"a")
    with pytest.raises(ValueError):
        enc.finalize()
    with pytest.raises(ValueError):
        StreamEncryptor(b"short")
    with pytest.raises(ValueError):
        StreamEncryptor(new_object_key(), 10001)
    with pytest.raises(ValueError):
        StreamEncryptor(new_object_key(), random_bytes=lambda n: b"\x00").finalize()


def test_decryptor_releases_each_segment_when_complete() -> None:
    key = new_object_key()
    data = os.urandom(3 * S + 5)
    stored = encrypt_all(key, data)
    dec = StreamDecryptor(key, multipart=False, first_segment=0, last_segment=3, total_segments=4)
    assert dec.update(stored[: T - 1]) == b""
    assert dec.update(stored[T - 1 : T]) == data[:S]
    assert dec.update(stored[T : 3 * T]) == data[S : 3 * S]
    assert dec.update(stored[3 * T :]) == b""  # short last segment: wait for finalize
    assert dec.finalize() == data[3 * S :]
    with pytest.raises(ValueError):
        dec.finalize()


def test_decryptor_argument_checks() -> None:
    key = new_object_key()
    for first, last, total in [(1, 0, 2), (0, 2, 2), (-1, 0, 1), (0, 0, 0)]:
        with pytest.raises(ValueError):
            StreamDecryptor(
                key, multipart=False, first_segment=first, last_segment=last, total_segments=total
            )


def test_stream_keys_differ_per_part() -> None:
    key = new_object_key()
    keys = {stream_key(key, p) for p in (0, 1, 2, 3, 10000)}
    assert len(keys) == 5
    with pytest.raises(ValueError):
        stream_key(key, -1)


def build_multipart(key: bytes, parts: list[tuple[int, bytes]]) -> bytes:
    return b"".join(encrypt_all(key, data, number) for number, data in parts)


def test_multipart_object_round_trip() -> None:
    key = new_object_key()
    parts = [(1, os.urandom(2 * S)), (2, os.urandom(S)), (5, os.urandom(S)), (9, os.urandom(17))]
    stored = build_multipart(key, parts)
    plain = b"".join(d for _, d in parts)
    assert len(stored) == ciphertext_size(len(plain))
    assert decrypt_all(key, stored, multipart=True) == plain
    assert decrypt_all(key, build_multipart(key, parts[:3]), multipart=True) == plain[: 4 * S]


def read_range(
    key: bytes, stored: bytes, size: int, start: int, end: int, multipart: bool, chunks: list[int]
) -> bytes:
    r = plan_range(size, start, end)
    total = segment_count(len(stored))
    fetched = stored[r.ct_start : r.ct_end + 1]
    plain = decrypt_chunks(
        key,
        chunked(fetched, chunks),
        multipart=multipart,
        first=r.first_segment,
        last=r.last_segment,
        total=total,
    )
    return plain[r.skip : r.skip + r.length]


@st.composite
def object_and_range(draw: st.DrawFn) -> tuple[int, int, int, list[int], int]:
    size = draw(st.integers(min_value=1, max_value=300 * 1024))
    start = draw(st.integers(min_value=0, max_value=size - 1))
    end = draw(st.integers(min_value=start, max_value=size - 1))
    chunks = draw(st.lists(st.integers(min_value=1, max_value=3 * T), min_size=1, max_size=8))
    seed = draw(st.integers(min_value=0, max_value=2**32))
    return size, start, end, chunks, seed


@settings(max_examples=60, deadline=None)
@given(object_and_range())
def test_range_reads_single_part(case: tuple[int, int, int, list[int], int]) -> None:
    size, start, end, chunks, seed = case
    rng = random.Random(seed)
    key = rng.randbytes(32)
    data = rng.randbytes(size)
    stored = encrypt_all(key, data, random_bytes=rng.randbytes)
    got = read_range(key, stored, size, start, end, False, chunks)
    assert got == data[start : end + 1]


@settings(max_examples=60, deadline=None)
@given(object_and_range(), st.integers(min_value=1, max_value=3))
def test_range_reads_multipart(case: tuple[int, int, int, list[int], int], part_segs: int) -> None:
    size, start, end, chunks, seed = case
    rng = random.Random(seed)
    key = rng.randbytes(32)
    data = rng.randbytes(size)
    parts = []
    number = 0
    pos = 0
    while True:
        number += rng.randint(1, 3)
        piece = data[pos : pos + part_segs * S]
        pos += len(piece)
        if pos == size:
            parts.append((number, piece))
            break
        parts.append((number, piece))
    stored = build_multipart(key, parts)
    assert len(stored) == ciphertext_size(size)
    got = read_range(key, stored, size, start, end, True, chunks)
    assert got == data[start : end + 1]


def test_looks_like_v1_tells_ciphertext_from_plaintext() -> None:
    from proxy.crypto import encrypt_all, looks_like_v1

    key = bytes(range(32))
    for size in (0, 1, 65536, 65537, 3 * 65536 + 5):
        body = encrypt_all(key, b"x" * size)
        assert looks_like_v1(body[:16], len(body))
        part = encrypt_all(key, b"x" * size, part=3)
        assert looks_like_v1(part[:16], len(part))
        assert not looks_like_v1(body[:16], STORED_SEGMENT_SIZE + 5)  # no v1 size
        assert not looks_like_v1(bytes(16), len(body))  # version 0
        assert not looks_like_v1(body[:15], len(body))
    body = encrypt_all(key, b"x" * 70000)
    fake = bytearray(body[:16])
    fake[4:8] = (1).to_bytes(4, "big")  # not index 0
    assert not looks_like_v1(bytes(fake), len(body))
    fake = bytearray(body[:16])
    fake[1] = 1  # a single-part body of two segments cannot start FINAL
    assert not looks_like_v1(bytes(fake), len(body))
