"""The listing rewrite alone, in-process: ``python -m benchmarks.listing_rewrite [--rounds R]``.

Builds one backend page of 1,000 encrypted objects in each of two shapes - rclone's (indented,
unquoted ETags) and moto's / AWS's (one line, ETags as ``&quot;...&quot;``) - and times, best
of ``R`` (5) rounds of 20 calls each, in milliseconds per page: reading it (``Page``: the
well-formedness check and the cut into entries), rewriting its entries (plaintext sizes, client
ETags) and the whole ``list_bucket`` (both, and the document put together) on one event loop.
Runs whichever ``proxy`` is imported, so the commit before a change can be measured from its own
tree against the one after. Bounded: ``R`` at most 50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from proxy import crypto
from proxy.layer.decision import Decision
from proxy.s3 import listing

ENTRIES = 1000
STORED = crypto.ciphertext_size(64)
"""The stored size of a 64-byte object, as the harness's list scenario writes them."""


def _page(shape: str) -> bytes:
    head = '<?xml version="1.0" encoding="UTF-8"?>\n'
    ns = "http://s3.amazonaws.com/doc/2006-03-01/"
    if shape == "rclone":
        items = [
            f"  <Contents>\n    <Key>list/obj-{i:06d}</Key>\n"
            "    <LastModified>2026-12-03T06:30:43.953Z</LastModified>\n"
            f"    <ETag>{i:032x}</ETag>\n    <Size>{STORED}</Size>\n"
            "    <StorageClass>STANDARD</StorageClass>\n  </Contents>\n"
            for i in range(ENTRIES)
        ]
        fields = "  <Name>b</Name>\n  <IsTruncated>true</IsTruncated>\n  <Prefix>list/</Prefix>\n"
        tail = "  <KeyCount>1000</KeyCount>\n  <NextContinuationToken>t</NextContinuationToken>\n"
        return f'{head}<ListBucketResult xmlns="{ns}">\n{fields}{"".join(items)}{tail}'.encode() + (
            b"</ListBucketResult>"
        )
    items = [
        f"<Contents><Key>list/obj-{i:06d}</Key>"
        "<LastModified>2026-12-03T06:30:43.000Z</LastModified>"
        f"<ETag>&quot;{i:032x}&quot;</ETag><Size>{STORED}</Size>"
        "<StorageClass>STANDARD</StorageClass></Contents>"
        for i in range(ENTRIES)
    ]
    fields = "<Name>b</Name><Prefix>list/</Prefix><KeyCount>1000</KeyCount><MaxKeys>1000</MaxKeys>"
    tail = "<IsTruncated>true</IsTruncated><NextContinuationToken>t</NextContinuationToken>"
    return f'{head}<ListBucketResult xmlns="{ns}">{fields}{"".join(items)}{tail}'.encode() + (
        b"</ListBucketResult>"
    )


class _EncryptAll:
    """A policy under which every key of the bucket is encrypted (what the harness runs)."""

    strict = False

    def bucket_decision(self, bucket: str) -> Decision:
        return Decision("local:bench", "default")

    def decide(self, bucket: str, key: str, headers: Any = None) -> Decision:
        return self.bucket_decision(bucket)

    def may_be_encrypted(self, *args: Any, **kwargs: Any) -> bool:
        return True


def _best_ms(fn: Callable[[], object], rounds: int, calls: int = 20) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - started) / calls)
    return round(best * 1000, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    rounds = max(1, min(50, parser.parse_args().rounds))
    policy = _EncryptAll()
    tokens = listing.TokenSealer("bench-" * 6)
    loop = asyncio.new_event_loop()
    out: dict[str, dict[str, float]] = {}
    for shape in ("rclone", "moto"):
        data = _page(shape)
        page = listing.Page(data, False)
        assert len(page.entries) == ENTRIES, "the page was not read as the harness expects"

        async def fetch(query: tuple[tuple[str, str], ...], data: bytes = data) -> bytes:
            return data

        def whole(fetch: Callable[..., Any] = fetch) -> bytes:
            return loop.run_until_complete(
                listing.list_bucket(
                    fetch, (("list-type", "2"),), bucket="b", policy=policy, tokens=tokens
                )
            )

        out[shape] = {
            "page_bytes": len(data),
            "read_ms": _best_ms(lambda data=data: listing.Page(data, False), rounds),
            "entries_ms": _best_ms(lambda page=page: page.client_entries("b", policy), rounds),
            "list_bucket_ms": _best_ms(whole, rounds),
        }
    loop.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
