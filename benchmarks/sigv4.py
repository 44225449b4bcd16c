"""A minimal AWS Signature Version 4 signer for S3 requests (header auth).

Kept small and allocation-light so that signing is never the load generator's bottleneck;
``benchmarks.run`` measures its rate and reports it next to the results.  The payload is
signed as ``UNSIGNED-PAYLOAD`` (allowed by S3 over any transport; the benchmark only runs
over loopback).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence
from urllib.parse import quote

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_ALGORITHM = "AWS4-HMAC-SHA256"


def uri_encode_path(path: str) -> str:
    """Encode an S3 object path the way SigV4 wants it (``/`` kept, everything else strict)."""
    return quote(path, safe="/-_.~")


def canonical_query(params: Sequence[tuple[str, str]]) -> str:
    """The canonical (and also the wire) query string: sorted, strictly percent-encoded."""
    enc = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in params)
    return "&".join(f"{k}={v}" for k, v in enc)


class SigV4Signer:
    """Signs S3 requests for one access key / secret / region; caches the daily signing key."""

    def __init__(self, access_key: str, secret_key: str, region: str, service: str = "s3") -> None:
        self._access_key = access_key
        self._secret = secret_key
        self._region = region
        self._service = service
        self._key_date = ""
        self._key = b""

    def _signing_key(self, date: str) -> bytes:
        if date != self._key_date:
            k = hmac.new(("AWS4" + self._secret).encode(), date.encode(), hashlib.sha256).digest()
            for part in (self._region, self._service, "aws4_request"):
                k = hmac.new(k, part.encode(), hashlib.sha256).digest()
            self._key, self._key_date = k, date
        return self._key

    def sign(
        self,
        method: str,
        host: str,
        encoded_path: str,
        encoded_query: str,
        extra_headers: Mapping[str, str] | None = None,
        payload_hash: str = UNSIGNED_PAYLOAD,
        now: float | None = None,
    ) -> dict[str, str]:
        """Return the headers to send (``Host``, ``x-amz-*``, ``Authorization`` and extras).

        ``encoded_path`` and ``encoded_query`` must be exactly what goes on the wire
        (see :func:`uri_encode_path` and :func:`canonical_query`).  ``extra_headers`` are
        signed too.
        """
        stamp = time.gmtime(time.time() if now is None else now)
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", stamp)
        date = amz_date[:8]
        headers = {"host": host, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
        if extra_headers:
            for k, v in extra_headers.items():
                headers[k.lower()] = v.strip()
        names = sorted(headers)
        signed = ";".join(names)
        canonical = "\n".join(
            (
                method,
                encoded_path,
                encoded_query,
                "".join(f"{n}:{headers[n]}\n" for n in names),
                signed,
                payload_hash,
            )
        )
        scope = f"{date}/{self._region}/{self._service}/aws4_request"
        to_sign = "\n".join(
            (_ALGORITHM, amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest())
        )
        sig = hmac.new(self._signing_key(date), to_sign.encode(), hashlib.sha256).hexdigest()
        out = {
            "Host": host,
            "x-amz-content-sha256": payload_hash,
            "x-amz-date": amz_date,
            "Authorization": (
                f"{_ALGORITHM} Credential={self._access_key}/{scope}, "
                f"SignedHeaders={signed}, Signature={sig}"
            ),
        }
        if extra_headers:
            for k, v in extra_headers.items():
                out[k] = v
        return out


def signing_rate(seconds: float = 0.3, max_ops: int = 200_000) -> float:
    """Signatures per second this machine manages (bounded in time and count)."""
    signer = SigV4Signer("AKIDBENCHMARK", "benchmark-secret", "us-east-1")
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while n < max_ops:
        signer.sign("GET", "127.0.0.1:9000", f"/bench/small/{n % 1024:08d}", "")
        n += 1
        if n % 256 == 0 and time.perf_counter() >= deadline:
            break
    return n / (time.perf_counter() - start)
