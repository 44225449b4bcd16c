"""The terminal progress bar of a job: objects done of the total, percentage, ETA, bytes.

The total is counted by a listing of its own that runs beside the job (listings are cheap:
1000 keys a request), so the bar knows its total long before the job ends and tqdm can
show a percentage and an ETA. Bytes are shown human-readable (``12.5 MiB``).
"""

from __future__ import annotations

from typing import IO, Final

from tqdm import tqdm

_UNITS: Final = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``; whole bytes below 1 KiB."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in _UNITS[1:]:
        n /= 1024
        if n < 1024 or unit == _UNITS[-1]:
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


class Bar:
    """One job's bar on ``file`` (stderr for the CLI)."""

    def __init__(self, kind: str, file: IO[str]) -> None:
        self._bar = tqdm(
            desc=kind,
            unit="obj",
            total=None,
            file=file,
            dynamic_ncols=True,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} objects "
            "[{elapsed}<{remaining}{postfix}]",
        )
        self._listed = 0
        self._listed_bytes = 0
        self._counted = False

    def listed(self, size: int) -> None:
        """The counting listing found one more object of ``size`` stored bytes."""
        self._listed += 1
        self._listed_bytes += size
        self._bar.total = max(self._listed, self._bar.n)

    def counted(self) -> None:
        """The counting listing is complete: the total is exact."""
        self._counted = True
        self._bar.total = max(self._listed, self._bar.n)
        self._bar.refresh()

    def update(self, done_bytes: int, errors: int) -> None:
        post = f"{human_bytes(done_bytes)} of {human_bytes(self._listed_bytes)}"
        if not self._counted:
            post += " (counting)"
        if errors:
            post += f", {errors} errors"
        self._bar.set_postfix_str(post, refresh=False)
        if self._bar.total is not None and self._bar.n + 1 > self._bar.total:
            # the bucket changed between the two listings: never show more than 100%
            self._bar.total = self._bar.n + 1
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
