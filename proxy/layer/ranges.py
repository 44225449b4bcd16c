"""Conditions, ranges and ETags as S3 defines them: pure functions of headers.

Split from the encryption layer (``proxy.layer.objects`` re-exports every public name here).
"""

from __future__ import annotations

import email.utils
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from proxy import crypto
from proxy.errors import S3Error

ETAG_SUFFIX: Final = "-c"


def client_etag(backend_etag: str | None, encrypted: bool) -> str | None:
    """The ETag a client sees.

    For encrypted objects the backend's ETag is the MD5 of ciphertext; showing it
    as-is would make MD5-checking clients (rclone) report corruption, so it gets a
    suffix that no S3 ETag has and that marks it as not-an-MD5.  The mapping is a
    pure function of the backend ETag, so PUT, HEAD, GET and LIST agree.
    """
    if backend_etag is None or not encrypted:
        return backend_etag
    core = backend_etag.strip().strip('"')
    return f'"{core}{ETAG_SUFFIX}"'


def backend_etag(client_value: str) -> str:
    """Map an ETag a client sent (If-Match etc.) back to the backend's form.

    The quoting is kept as the client sent it: some backends (Ceph RGW 16 on PUT) compare an
    unquoted value only, and answer the bare backend's way when the proxy does not add quotes.
    """
    out = []
    for item in client_value.split(","):
        v = item.strip()
        weak = v.startswith("W/")
        core = v[2:] if weak else v
        quoted = core.startswith('"')
        core = core.strip('"')
        if core.endswith(ETAG_SUFFIX):
            core = core[: -len(ETAG_SUFFIX)]
        if v == "*":
            out.append("*")
        else:
            out.append(("W/" if weak else "") + (f'"{core}"' if quoted else core))
    return ", ".join(out)


def etag_matches(header: str, etag: str | None) -> bool:
    if etag is None:
        return False
    core = etag.strip().removeprefix("W/").strip('"')
    for item in header.split(","):
        v = item.strip()
        if v == "*" or v.removeprefix("W/").strip('"') == core:
            return True
    return False


def http_time(value: str) -> float | None:
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def check_preconditions(cond: Mapping[str, str], headers: Mapping[str, str]) -> int | None:
    """Evaluate conditional headers as S3 does; 304, or None. 412 raises PreconditionFailed.

    The backend is asked too, but not every backend enforces them (rclone does not), and the
    proxy must behave as S3 whatever the backend.
    """
    etag = headers.get("etag")
    modified = http_time(headers.get("last-modified", ""))
    if "if-match" in cond:
        if not etag_matches(cond["if-match"], etag):
            raise precondition_failed("If-Match")
    elif "if-unmodified-since" in cond:
        since = http_time(cond["if-unmodified-since"])
        if since is not None and modified is not None and modified > since:
            raise precondition_failed("If-Unmodified-Since")
    if "if-none-match" in cond:
        if etag_matches(cond["if-none-match"], etag):
            return 304
    elif "if-modified-since" in cond:
        since = http_time(cond["if-modified-since"])
        if since is not None and modified is not None and modified <= since:
            return 304
    return None


def precondition_failed(condition: str) -> S3Error:
    return S3Error(
        "PreconditionFailed",
        "At least one of the pre-conditions you specified did not hold",
        412,
        extra={"Condition": condition},
    )


def backend_conditions(cond: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for name in ("if-match", "if-none-match"):
        if name in cond:
            out[name] = backend_etag(cond[name])
    for name in ("if-modified-since", "if-unmodified-since"):
        if name in cond:
            out[name] = cond[name]
    return out


# ---------------------------------------------------------------------- ranges
@dataclass(frozen=True)
class ClientRange:
    """A parsed ``Range: bytes=…`` header: first-last, first-, or -suffix."""

    first: int | None
    last: int | None

    def header(self) -> str:
        first = "" if self.first is None else str(self.first)
        last = "" if self.last is None else str(self.last)
        return f"bytes={first}-{last}"

    def resolve(self, size: int) -> tuple[int, int]:
        """Inclusive (start, end) for an object of ``size`` bytes, or InvalidRange."""
        if self.first is None:
            assert self.last is not None
            if self.last == 0 or size == 0:
                raise invalid_range(size)
            return max(0, size - self.last), size - 1
        if self.first >= size:
            raise invalid_range(size)
        end = size - 1 if self.last is None else min(self.last, size - 1)
        return self.first, end


def parse_range(value: str) -> ClientRange | None:
    """Parse one byte range; unsupported forms (multiple ranges) are ignored as S3 does."""
    value = value.strip()
    if not value.startswith("bytes="):
        return None
    spec = value[6:].strip()
    if "," in spec:
        return None
    first_s, sep, last_s = spec.partition("-")
    if not sep:
        return None
    try:
        if first_s == "":
            return ClientRange(None, int(last_s)) if last_s.isdigit() else None
        first = int(first_s)
        if last_s == "":
            return ClientRange(first, None)
        last = int(last_s)
    except ValueError:
        return None
    if last < first:
        return None
    return ClientRange(first, last)


def stored_range_for(rng: ClientRange) -> str:
    """The backend range that covers the segments a client range needs, without knowing size."""
    seg = crypto.SEGMENT_SIZE
    stored = crypto.STORED_SEGMENT_SIZE
    if rng.first is None:
        assert rng.last is not None
        # Enough trailing segments for the suffix, plus the partial last segment.
        count = -(-rng.last // seg) + 1
        return f"bytes=-{count * stored}"
    first_seg = rng.first // seg
    if rng.last is None:
        return f"bytes={first_seg * stored}-"
    last_seg = rng.last // seg
    return f"bytes={first_seg * stored}-{(last_seg + 1) * stored - 1}"


def invalid_range(size: int) -> S3Error:
    return S3Error(
        "InvalidRange",
        "The requested range is not satisfiable",
        416,
        headers={"content-range": f"bytes */{size}"},
        extra={"ActualObjectSize": str(size)},
    )
