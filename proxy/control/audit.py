"""The audit trail: hash-chained JSON lines of every configuration event.

One JSON object per line::

    {"seq": 7, "time": "2025-01-02T03:04:05.678901Z", "event": "spec.activated",
     "prev": "<sha256 hex of line 6>", ...event fields}

``prev`` is the SHA-256 of the previous line's bytes (without its newline); the first
line's ``prev`` is 64 zeros. Changing, removing, inserting or reordering a line breaks the
chain at that point, and ``verify`` names the first broken line.

The log is a plain local file, never encrypted under a customer key, so it stays readable
after a revocation. It holds no key material: key URIs, providers, outcomes, reasons.
Appends take an exclusive ``flock`` so several processes sharing one file (a proxy and a
job run from the command line) keep one chain; each line is flushed and fsynced.

Events: ``spec.created``, ``spec.changed``, ``key.validated`` (``ok`` true/false),
``spec.activated``, ``operation.failed``, ``job.started``, ``job.finished``,
``key.revoked`` (revocation detected), ``key.restored`` (cleared), ``key.unreachable``,
``policy.loaded`` (the key policy at start), ``spec.refused`` / ``job.refused`` (outside
``kms.allowed_keys`` or ``encryption.require_cmek``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from proxy.kms.keys import KeyEvent

GENESIS: Final = "0" * 64
_TAIL_BLOCK: Final = 64 * 1024
_MAX_LINE: Final = 1024 * 1024


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _last_line(fd: int) -> bytes | None:
    """The last complete line of the file (without its newline), read from the end."""
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0:
        return None
    buf = b""
    pos = size
    while pos > 0 and len(buf) <= _MAX_LINE:
        step = min(_TAIL_BLOCK, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        body = buf[:-1] if buf.endswith(b"\n") else buf
        nl = body.rfind(b"\n")
        if nl >= 0:
            return body[nl + 1 :]
    body = buf[:-1] if buf.endswith(b"\n") else buf
    return body if pos == 0 else None


class AuditLog:
    """Appends events to one hash-chained JSON-lines file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event; returns the entry written."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            last = _last_line(fd)
            if last is None:
                prev, seq = GENESIS, 0
            else:
                prev = line_hash(last)
                try:
                    seq = int(json.loads(last).get("seq", -1)) + 1
                except (ValueError, AttributeError):
                    seq = -1  # the tail is damaged: keep appending, verify will say where
            entry: dict[str, Any] = {"seq": seq, "time": _now(), "event": event, "prev": prev}
            entry.update({k: v for k, v in fields.items() if k not in entry})
            line = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
            os.write(fd, line + b"\n")
            os.fsync(fd)
            return entry
        finally:
            os.close(fd)

    def key_event(self, ev: KeyEvent) -> None:
        """A ``KeyService`` availability change (revocation detected / cleared)."""
        self.append(f"key.{ev.kind}", kms_key=ev.kek_uri, reason=ev.reason, at=ev.at)


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int
    """Lines checked (all of them when ``ok``)."""
    broken_line: int | None = None
    """1-based number of the first line whose link does not hold."""
    reason: str = ""


def verify(path: Path) -> VerifyResult:
    """Check the whole chain; report the first broken link."""
    prev = GENESIS
    count = 0
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.endswith(b"\n"):
                return VerifyResult(False, count, number, "last line is incomplete")
            line = raw[:-1]
            try:
                entry = json.loads(line)
            except ValueError:
                return VerifyResult(False, count, number, "not valid JSON")
            if not isinstance(entry, dict):
                return VerifyResult(False, count, number, "not a JSON object")
            if entry.get("prev") != prev:
                return VerifyResult(
                    False, count, number, "prev does not match the hash of the line before"
                )
            if entry.get("seq") != number - 1:
                return VerifyResult(False, count, number, f"seq is {entry.get('seq')!r}")
            prev = line_hash(line)
            count += 1
    return VerifyResult(True, count)
