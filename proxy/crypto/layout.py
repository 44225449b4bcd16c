"""The layout of a completed multipart object, bound into its v2 envelope (FORMAT.md s. 5.1).

A layout lists the object's parts in order as runs of consecutive part numbers whose streams
have the same segment count: ``1-9:128,10-10:37`` is parts 1 to 9 of 128 segments each (8 MiB
parts), then part 10 of 37. It tells every global segment number the (part, index, FINAL) that
must stand there, so reads of any range check each segment's position, and the total segment
count, which the stored size must match.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from proxy.crypto.sizes import MAX_PART, SEGMENT_SIZE
from proxy.errors import FormatError

MAX_RUNS: Final = 16
"""At most this many runs are bound (a typical upload has 1 or 2); an upload whose layout needs
more is rewritten by the proxy into one that does not (FORMAT.md section 5)."""
_RUN = re.compile(r"([1-9][0-9]{0,4})-([1-9][0-9]{0,4}):([1-9][0-9]{0,9})")


@dataclass(frozen=True)
class PartRun:
    """Parts ``first..last`` (inclusive), each a stream of ``segments`` segments."""

    first: int
    last: int
    segments: int


@dataclass(frozen=True)
class PartLayout:
    """The runs of a multipart object's parts, in part-number order."""

    runs: tuple[PartRun, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.runs) <= MAX_RUNS:
            raise ValueError(f"a layout holds 1..{MAX_RUNS} runs")
        previous = 0
        for r in self.runs:
            if not previous < r.first <= r.last <= MAX_PART or not 1 <= r.segments < 2**32:
                raise ValueError("layout runs must be increasing part numbers in 1..10000")
            previous = r.last

    @classmethod
    def from_parts(cls, parts: Iterable[tuple[int, int]]) -> PartLayout | None:
        """The layout of ``(part number, plaintext size)`` pairs in order, or ``None`` when it
        is not aligned (a part but the last not a whole number of segments, an empty part
        that is not the only one) or needs more than ``MAX_RUNS`` runs."""
        listed = list(parts)
        runs: list[PartRun] = []
        for i, (number, size) in enumerate(listed):
            last = i == len(listed) - 1
            if not last and (size == 0 or size % SEGMENT_SIZE):
                return None
            if last and size == 0 and len(listed) > 1:
                return None
            segments = max(1, -(-size // SEGMENT_SIZE))
            if runs and runs[-1].last + 1 == number and runs[-1].segments == segments:
                runs[-1] = PartRun(runs[-1].first, number, segments)
            else:
                runs.append(PartRun(number, number, segments))
        if not runs or len(runs) > MAX_RUNS:
            return None
        try:
            return cls(tuple(runs))
        except ValueError:
            return None

    @classmethod
    def from_text(cls, text: str) -> PartLayout:
        """Parse the canonical text form (``FormatError`` otherwise)."""
        runs = []
        for item in text.split(","):
            m = _RUN.fullmatch(item)
            if m is None:
                raise FormatError("multipart layout does not parse")
            runs.append(PartRun(int(m[1]), int(m[2]), int(m[3])))
        try:
            layout = cls(tuple(runs))
        except ValueError as exc:
            raise FormatError(f"multipart layout is invalid: {exc}") from None
        if layout.to_text() != text:
            raise FormatError("multipart layout is not canonical")
        return layout

    def to_text(self) -> str:
        return ",".join(f"{r.first}-{r.last}:{r.segments}" for r in self.runs)

    def to_bytes(self) -> bytes:
        """The binary form bound into the sealed object key's associated data."""
        out = bytearray(len(self.runs).to_bytes(2, "big"))
        for r in self.runs:
            out += r.first.to_bytes(2, "big") + r.last.to_bytes(2, "big")
            out += r.segments.to_bytes(4, "big")
        return bytes(out)

    @property
    def total_segments(self) -> int:
        return sum((r.last - r.first + 1) * r.segments for r in self.runs)

    def parts(self) -> Iterator[tuple[int, int, int]]:
        """``(part number, first global segment, segment count)`` for every part."""
        g = 0
        for r in self.runs:
            for number in range(r.first, r.last + 1):
                yield number, g, r.segments
                g += r.segments

    def position(self, segment: int) -> tuple[int, int, bool]:
        """The ``(part, index, final)`` that must stand at global segment ``segment``."""
        g = segment
        for r in self.runs:
            span = (r.last - r.first + 1) * r.segments
            if g < span:
                part, index = divmod(g, r.segments)
                return r.first + part, index, index == r.segments - 1
            g -= span
        raise IndexError(f"segment {segment} is past the layout's end")
