"""Size arithmetic of the v1 body (docs/FORMAT.md sections 4 and 6). Pure functions on ints."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.errors import FormatError

FORMAT_VERSION = 1
SEGMENT_SIZE = 65536
"""Plaintext bytes in every segment except the last of a stream (S)."""
HEADER_SIZE = 16
TAG_SIZE = 16
SEGMENT_OVERHEAD = HEADER_SIZE + TAG_SIZE
STORED_SEGMENT_SIZE = SEGMENT_SIZE + SEGMENT_OVERHEAD
MAX_PART = 10000
"""The highest S3 part number (a single-part stream is part 0)."""


def _segments_for_plaintext(plaintext_size: int) -> int:
    return max(1, -(-plaintext_size // SEGMENT_SIZE))


def ciphertext_size(plaintext_size: int) -> int:
    """Stored size of an aligned body holding ``plaintext_size`` bytes."""
    if plaintext_size < 0:
        raise ValueError("plaintext size must not be negative")
    return plaintext_size + SEGMENT_OVERHEAD * _segments_for_plaintext(plaintext_size)


def plaintext_size(ciphertext_size: int) -> int:
    """Plaintext size of an aligned body of ``ciphertext_size`` stored bytes.

    Raises ``FormatError`` for sizes no v1 body can have.
    """
    if ciphertext_size < SEGMENT_OVERHEAD:
        raise FormatError(f"stored size {ciphertext_size} is too small for a v1 body")
    full, rest = divmod(ciphertext_size, STORED_SEGMENT_SIZE)
    if rest == 0:
        return full * SEGMENT_SIZE
    if rest < SEGMENT_OVERHEAD or (rest == SEGMENT_OVERHEAD and full > 0):
        raise FormatError(f"stored size {ciphertext_size} is not a v1 body size")
    return full * SEGMENT_SIZE + rest - SEGMENT_OVERHEAD


def segment_count(ciphertext_size: int) -> int:
    """Number of stored segments in an aligned body of ``ciphertext_size`` bytes."""
    return _segments_for_plaintext(plaintext_size(ciphertext_size))


@dataclass(frozen=True)
class SegmentRange:
    """Which stored bytes serve a plaintext range, and what to cut from their plaintext.

    ``first_segment``/``last_segment`` are inclusive global segment numbers, ``ct_start``/
    ``ct_end`` inclusive stored-byte offsets, ``skip`` the plaintext bytes to drop from the start
    of the first decrypted segment and ``length`` the plaintext bytes to deliver.
    """

    first_segment: int
    last_segment: int
    ct_start: int
    ct_end: int
    skip: int
    length: int


def plan_range(plaintext_size: int, start: int, end_inclusive: int) -> SegmentRange:
    """Plan the read of plaintext bytes ``start..end_inclusive`` of a body.

    Requires ``0 <= start <= end_inclusive < plaintext_size`` (``ValueError`` otherwise).
    """
    if not 0 <= start <= end_inclusive < plaintext_size:
        raise ValueError("range must satisfy 0 <= start <= end < size")
    first = start // SEGMENT_SIZE
    last = end_inclusive // SEGMENT_SIZE
    total = ciphertext_size(plaintext_size)
    return SegmentRange(
        first_segment=first,
        last_segment=last,
        ct_start=first * STORED_SEGMENT_SIZE,
        ct_end=min((last + 1) * STORED_SEGMENT_SIZE, total) - 1,
        skip=start - first * SEGMENT_SIZE,
        length=end_inclusive - start + 1,
    )
