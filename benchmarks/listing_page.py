"""Micro-benchmark: the proxy's rewrite of one 1000-entry ListObjectsV2 page, in-process.

    python -m benchmarks.listing_page [--pages 30] [--rounds 5]

Two pages: ``uniform`` (every entry the same timestamp and size, compact XML) and
``rclone`` (rclone serve s3's indented form, distinct millisecond timestamps, as the
harness's list scenario gets them). Prints the median and the best ms per page over the
rounds; the policy encrypts every key (a default rule), so every size and ETag is rewritten.
No backend, no HTTP: only ``proxy.s3.listing.list_bucket``; and of it, best of the rounds, the
page read (``Page``: the well-formedness check and the cut into entries) and the entries
rewritten (``Page.client_entries``: plaintext sizes, client ETags). Runs whichever ``proxy``
is imported, so the commit before a change can be measured from its own tree.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from proxy.config import Encryption, EncryptionRule
from proxy.control.policy import Policy
from proxy.s3.listing import Page, TokenSealer, list_bucket

NS = "http://s3.amazonaws.com/doc/2006-03-01/"


def uniform_page(n: int = 1000) -> bytes:
    entries = "".join(
        f"<Contents><Key>dir/obj-{i:06d}.bin</Key>"
        "<LastModified>2026-12-02T10:00:00.000Z</LastModified>"
        f"<ETag>&quot;{i:032x}&quot;</ETag><Size>{4096 + 32}</Size>"
        "<StorageClass>STANDARD</StorageClass></Contents>"
        for i in range(n)
    )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="{NS}">'
        "<Name>b</Name><Prefix></Prefix><KeyCount>1000</KeyCount><MaxKeys>1000</MaxKeys>"
        "<IsTruncated>true</IsTruncated><NextContinuationToken>abc</NextContinuationToken>"
        f"{entries}</ListBucketResult>"
    ).encode()


def rclone_page(n: int = 1000) -> bytes:
    entries = "".join(
        f"  <Contents>\n    <Key>list/obj-{i:06d}</Key>\n"
        f"    <LastModified>2026-12-02T10:{i // 60000 % 60:02d}:{i // 1000 % 60:02d}."
        f"{i % 1000:03d}Z</LastModified>\n    <ETag>{i:032x}</ETag>\n"
        f"    <Size>{64 + 32}</Size>\n    <StorageClass>STANDARD</StorageClass>\n  </Contents>\n"
        for i in range(n)
    )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="{NS}">\n'
        "  <Name>b</Name>\n  <IsTruncated>true</IsTruncated>\n  <Prefix>list/</Prefix>\n"
        f"  <MaxKeys>1000</MaxKeys>\n{entries}"
        "  <NextContinuationToken>abc</NextContinuationToken>\n  <KeyCount>1000</KeyCount>\n"
        "</ListBucketResult>"
    ).encode()


def _policy() -> Policy:
    return Policy(Encryption(default=EncryptionRule(key="local:///k")))


async def _measure(page: bytes, pages: int) -> float:
    policy = _policy()
    tokens = TokenSealer("secret")

    async def fetch(_query: tuple[tuple[str, str], ...]) -> bytes:
        return page

    start = time.perf_counter()
    for _ in range(pages):
        await list_bucket(fetch, (("list-type", "2"),), bucket="b", policy=policy, tokens=tokens)
    return (time.perf_counter() - start) / pages * 1000


def _parts(page: bytes, pages: int, rounds: int) -> tuple[float, float]:
    """Best ms per page of reading the page and of rewriting its entries."""
    policy = _policy()
    read = entries = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(pages):
            parsed = Page(page, False)
        read = min(read, (time.perf_counter() - start) / pages * 1000)
        start = time.perf_counter()
        for _ in range(pages):
            parsed.client_entries("b", policy)
        entries = min(entries, (time.perf_counter() - start) / pages * 1000)
    return read, entries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pages", type=int, default=30, help="pages per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    args.pages, args.rounds = max(1, min(200, args.pages)), max(1, min(50, args.rounds))
    for name, page in (("uniform", uniform_page()), ("rclone", rclone_page())):
        runs = [asyncio.run(_measure(page, args.pages)) for _ in range(args.rounds)]
        read, entries = _parts(page, args.pages, args.rounds)
        print(
            f"{name:8s} {len(page) / 1024:6.0f} KiB  ms/page median {statistics.median(runs):6.2f}"
            f"  best {min(runs):6.2f}  (read {read:5.2f}, entries {entries:5.2f})"
        )


if __name__ == "__main__":
    main()
