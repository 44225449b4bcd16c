"""The audit trail: hash-chained JSON lines of every configuration event.

One JSON object per line::

    {"seq": 7, "time": "2025-01-02T03:04:05.678901Z", "event": "spec.activated",
     "prev": "<sha256 hex of line 6>", ...event fields}

``prev`` is the SHA-256 of the previous line's bytes (without its newline); the first
line's ``prev`` is 64 zeros. ``hash`` is the SHA-256 of the line's own canonical JSON
without the ``hash`` field, so an edited line fails its own check and ``verify`` names it
(lines written before ``hash`` existed are checked through the next line's ``prev``).
Changing, removing, inserting or reordering a line breaks the chain at that point, and
``verify`` names the first broken line: the edited one, or the first line out of sequence.

Cutting entries off the end leaves a valid, shorter chain: no verifier of the file alone
can see that. The chain's *head* (entry count and SHA-256 of the last line) is therefore
exported (``cmek_audit_entries``, ``cmek_audit_head_info`` and ``GET /v1/audit/head``): a
monitor that records it detects a truncation with ``verify(path, expect=Head(...))``
(``cmek-proxy audit verify FILE --head COUNT:HASH``), or from the metric going down.

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
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.kms.keys import KeyEvent

log = logging.getLogger(__name__)

GENESIS: Final = "0" * 64
_TAIL_BLOCK: Final = 64 * 1024
_MAX_LINE: Final = 1024 * 1024


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()


def self_hash(entry: dict[str, Any]) -> str:
    """The hash a line carries of itself: its canonical JSON without ``hash``."""
    return hashlib.sha256(_canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


@dataclass(frozen=True)
class Head:
    """The end of the chain: how many entries it has and the SHA-256 of the last line."""

    entries: int
    last_hash: str

    def to_json(self) -> dict[str, Any]:
        return {"entries": self.entries, "last_hash": self.last_hash}

    @classmethod
    def parse(cls, text: str) -> Head:
        """``COUNT:HASH`` as ``audit verify --head`` takes it."""
        count, sep, digest = text.partition(":")
        if not sep or not count.isdigit() or len(digest) != 64:
            raise ValueError(f"expected COUNT:SHA256HEX, got {text[:80]!r}")
        return cls(int(count), digest.lower())


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
            entry.update({k: v for k, v in fields.items() if k not in entry and k != "hash"})
            entry["hash"] = self_hash(entry)
            line = _canonical(entry)
            os.write(fd, line + b"\n")
            os.fsync(fd)
            return entry
        finally:
            os.close(fd)

    def head(self) -> Head:
        """The chain's head as the file holds it now (read from its end, not whole)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return Head(0, GENESIS)
        try:
            last = _last_line(fd)
        finally:
            os.close(fd)
        if last is None:
            return Head(0, GENESIS)
        try:
            seq = json.loads(last).get("seq")
        except (ValueError, AttributeError):
            seq = None
        return Head(seq + 1 if isinstance(seq, int) and seq >= 0 else -1, line_hash(last))

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


def verify(path: Path, expect: Head | None = None) -> VerifyResult:
    """Check the whole chain; report the first broken link.

    With ``expect`` (a head recorded earlier), also check that the chain still reaches it:
    entry ``expect.entries`` exists and is the line that was hashed then.
    """
    prev = GENESIS
    count = 0
    hashes_at_head: str | None = None
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
            if "hash" in entry and entry["hash"] != self_hash(entry):
                return VerifyResult(
                    False, count, number, "line was edited: its own hash does not match"
                )
            if entry.get("seq") != number - 1:
                return VerifyResult(
                    False,
                    count,
                    number,
                    f"seq is {entry.get('seq')!r}, expected {number - 1}: "
                    "lines were removed, inserted or reordered here",
                )
            if entry.get("prev") != prev:
                # this line is in sequence, so the line before is not the one it was chained
                # to: that line was edited (or replaced whole)
                before = max(number - 1, 1)
                return VerifyResult(
                    False,
                    count - 1 if number > 1 else 0,
                    before,
                    f"line {before} was edited: line {number} was chained to another line",
                )
            prev = line_hash(line)
            count += 1
            if expect is not None and count == expect.entries:
                hashes_at_head = prev
    if expect is not None and expect.entries > 0:
        if count < expect.entries:
            return VerifyResult(
                False,
                count,
                count + 1,
                f"truncated: the recorded head has {expect.entries} entries, the file {count}",
            )
        if hashes_at_head != expect.last_hash:
            return VerifyResult(
                False,
                expect.entries - 1,
                expect.entries,
                f"line {expect.entries} is not the recorded head: the log was rewritten",
            )
    return VerifyResult(True, count)


class AuditHeadCollector(Collector):
    """``cmek_audit_entries`` and ``cmek_audit_head_info{hash}``, read from the file at
    every scrape, so a truncation by anyone shows as the count going down."""

    def __init__(self, log: AuditLog) -> None:
        self._log = log

    def collect(self) -> list[Metric]:
        try:
            head = self._log.head()
        except OSError as exc:  # an unreadable log must not break the whole scrape
            log.warning("audit log %s unreadable for its head metric: %s", self._log.path, exc)
            return []
        entries = GaugeMetricFamily(
            "cmek_audit_entries", "Entries in the audit log's hash chain (its head's count)."
        )
        entries.add_metric([], float(head.entries))
        info = GaugeMetricFamily(
            "cmek_audit_head_info",
            "Always 1; the hash label is the SHA-256 of the audit log's last line.",
            labels=["hash"],
        )
        info.add_metric([head.last_hash], 1.0)
        return [entries, info]

    def describe(self) -> list[Metric]:
        return []
