"""How many KMS calls does cmek-proxy make for 10,000 PUTs and 10,000 GETs?

Starts moto (S3 backend) and ``python -m proxy serve`` with a ``local://`` key on loopback,
writes N small objects into one bucket and reads them all back (async, bounded
concurrency), all within one key-cache period, then prints the KMS calls counted from the
proxy's ``/metrics`` (``cmek_kms_requests_total`` by operation and outcome, before and
after the load), the KMS latency histogram per operation, the proxy's S3 latency
histogram per operation, and the client-side latency percentiles.

    python -m benchmarks.kms_calls [--requests 10000] [--concurrency 64] [--size 1024]

Expected: one ``generate_data_key`` for the whole bucket (the write data key is cached
and also fills the read cache), no ``unwrap`` for the GETs; the only other calls are the
start-up validation (wrap + unwrap) and one probe (generate + unwrap) per probe interval.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.loadgen import LoadResult, S3Client
from benchmarks.targets import (
    CLIENT_AK,
    CLIENT_SK,
    HOST,
    REPO_ROOT,
    fetch_text,
    free_port,
    http_ready,
    moto_backend,
    proxy_config,
    spawn,
    tcp_ready,
    write_local_keyfile,
)

CACHE_TTL = 900.0
PROBE_INTERVAL = 30.0
RUN_TIMEOUT = 600.0

Histogram = dict[str, list[tuple[float, float]]]  # label -> [(le, cumulative count)]


def kms_counts(text: str) -> dict[tuple[str, str, str], float]:
    """``cmek_kms_requests_total`` by (provider, operation, outcome)."""
    out: dict[tuple[str, str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "cmek_kms_requests_total":
                key = (s.labels["provider"], s.labels["operation"], s.labels["outcome"])
                out[key] = float(s.value)
    return out


def histograms(text: str, metric: str, label: str) -> Histogram:
    """Cumulative buckets of histogram ``metric`` summed by one label."""
    acc: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == f"{metric}_bucket":
                acc[s.labels[label]][float(s.labels["le"])] += float(s.value)
    return {k: sorted(v.items()) for k, v in acc.items()}


def render_histogram(title: str, hist: Histogram) -> list[str]:
    lines = [title]
    for name, buckets in sorted(hist.items()):
        total = buckets[-1][1] if buckets else 0.0
        lines.append(f"  {name}: {int(total)} observations")
        prev = 0.0
        for le, cum in buckets:
            n = cum - prev
            prev = cum
            if n:
                bound = "+Inf" if le == float("inf") else f"{le * 1000:g} ms"
                lines.append(f"    <= {bound:>10}: {int(n):>6}")
    return lines


def client_line(name: str, r: LoadResult) -> str:
    return (
        f"  {name}: {r.requests} requests in {r.seconds:.2f} s ({r.rate:.0f}/s), "
        f"p50 {r.percentile(50) * 1000:.1f} ms, p99 {r.percentile(99) * 1000:.1f} ms, "
        f"max {max(r.latencies, default=0.0) * 1000:.1f} ms"
    )


async def timed_all(
    n: int, concurrency: int, op: Callable[[int], Awaitable[None]], timeout: float
) -> LoadResult:
    """Run ``op(i)`` for every i < n on ``concurrency`` workers; record each latency."""
    latencies: list[float] = []
    counter = 0

    async def worker() -> None:
        nonlocal counter
        while counter < n:
            i = counter
            counter += 1
            t0 = time.perf_counter()
            await op(i)
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout)
    return LoadResult(len(latencies), time.perf_counter() - start, latencies)


async def run(requests: int, concurrency: int, size: int) -> str:
    with tempfile.TemporaryDirectory(prefix="cmek-kms-calls-") as tmp:
        work = Path(tmp)
        async with moto_backend(work) as backend:
            key_uri = write_local_keyfile(work / "keyfile.json")
            port, admin = free_port(), free_port()
            cfg = proxy_config(backend.url, port, admin, key_uri)
            cfg["kms"] = {"cache_ttl": CACHE_TTL, "probe_interval": PROBE_INTERVAL}
            (work / "config.yaml").write_text(yaml.safe_dump(cfg))
            argv = [sys.executable, "-m", "proxy", "serve", "--config", str(work / "config.yaml")]
            health, listening = http_ready(f"http://{HOST}:{admin}/healthz"), tcp_ready(port)

            async def ready() -> bool:
                return await health() and await listening()

            env = {"PYTHONPATH": str(REPO_ROOT)}
            async with spawn("proxy", argv, work, ready, env=env):
                metrics_url = f"http://{HOST}:{admin}/metrics"
                await asyncio.sleep(0.5)  # let the first probe finish
                before = await fetch_text(metrics_url)
                body = os.urandom(size)
                bucket = "kms-calls"
                async with S3Client(
                    f"http://{HOST}:{port}", CLIENT_AK, CLIENT_SK, max_connections=concurrency
                ) as s3:
                    await s3.create_bucket(bucket)
                    started = time.monotonic()

                    async def put(i: int) -> None:
                        await s3.put_object(bucket, f"obj/{i:06d}", body)

                    async def get(i: int) -> None:
                        n, _ = await s3.get_object(bucket, f"obj/{i:06d}")
                        if n != size:
                            raise RuntimeError(f"GET obj/{i:06d}: {n} bytes, expected {size}")

                    puts = await timed_all(requests, concurrency, put, RUN_TIMEOUT)
                    gets = await timed_all(requests, concurrency, get, RUN_TIMEOUT)
                    elapsed = time.monotonic() - started
                after = await fetch_text(metrics_url)
    if elapsed >= CACHE_TTL:
        raise RuntimeError(f"load took {elapsed:.0f} s, longer than one cache period")
    return report(requests, concurrency, size, elapsed, before, after, puts, gets)


def report(
    requests: int,
    concurrency: int,
    size: int,
    elapsed: float,
    before: str,
    after: str,
    puts: LoadResult,
    gets: LoadResult,
) -> str:
    b, a = kms_counts(before), kms_counts(after)
    lines = [
        f"cmek-proxy KMS calls: {requests} PUTs + {requests} GETs of {size}-byte objects, "
        f"one bucket, concurrency {concurrency}, local:// key, moto backend, loopback",
        f"load finished in {elapsed:.1f} s (key cache TTL {CACHE_TTL:g} s, probe every "
        f"{PROBE_INTERVAL:g} s)",
        "",
        "KMS calls (cmek_kms_requests_total)   before load   after load   during load",
    ]
    for key in sorted(set(a) | set(b)):
        provider, op, outcome = key
        lines.append(
            f"  {provider:>6} {op:<18} {outcome:<6} {b.get(key, 0):>12.0f} "
            f"{a.get(key, 0):>12.0f} {a.get(key, 0) - b.get(key, 0):>13.0f}"
        )
    total_b, total_a = sum(b.values()), sum(a.values())
    lines.append(f"  {'total':<32} {total_b:>12.0f} {total_a:>12.0f} {total_a - total_b:>13.0f}")
    per = (total_a - total_b) / (2 * requests)
    lines += [f"  KMS calls per S3 request during the load: {per:.6f}", ""]
    lines += render_histogram(
        "KMS latency by operation (cmek_kms_request_duration_seconds, whole run):",
        histograms(after, "cmek_kms_request_duration_seconds", "operation"),
    )
    lines.append("")
    lines += render_histogram(
        "S3 latency by operation at the proxy (cmek_s3_request_duration_seconds):",
        histograms(after, "cmek_s3_request_duration_seconds", "operation"),
    )
    lines += ["", "Client-side latency:", client_line("PUT", puts), client_line("GET", gets)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10_000, help="PUTs, then as many GETs")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--size", type=int, default=1024, help="object size in bytes")
    args = ap.parse_args(argv)
    if not 1 <= args.requests <= 1_000_000 or not 1 <= args.concurrency <= 1024:
        ap.error("requests must be in 1..1000000 and concurrency in 1..1024")
    print(asyncio.run(run(args.requests, args.concurrency, args.size)))


if __name__ == "__main__":
    main()
