"""The benchmark scenarios; each runs a warm-up (not recorded) and then ``repeats`` measured runs.

A scenario talks to one target through one :class:`~benchmarks.loadgen.S3Client` and records
into :class:`~benchmarks.report.Results`.  Besides its own figures, every scenario records the
front process's CPU use and, for cmek-proxy, KMS calls per 10,000 requests and backend bytes
read (through the counting relay).
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from benchmarks import parallel
from benchmarks.loadgen import LoadResult, S3Client, S3RequestError, run_bounded, run_load
from benchmarks.report import Results
from benchmarks.targets import Server, kms_calls, proc_usage, relay_from_upstream

MiB = 1 << 20
GiB = 1 << 30
SMALL_SIZE = 4096
RANGE_LEN = 1024
MAX_REQUESTS = 1_000_000
POPULATE_CONCURRENCY = 32
LARGE_OP_TIMEOUT = 600.0
SCENARIOS = ("large", "small", "range", "multipart", "list", "s5cmd")
SCENARIO_ERRORS = (S3RequestError, aiohttp.ClientError, TimeoutError, RuntimeError, OSError)


@dataclass
class Options:
    """What a run measures (from the command line)."""

    scenarios: list[str]
    sizes: list[int]
    concurrency: list[int]
    duration: float
    repeats: int
    warmup: float
    list_objects: int
    list_objects_slow: int  # on moto (about 150 PUT/s here); the same unless reduced
    list_page: int
    part_size: int
    multipart_size: int
    part_parallel: int
    small_keys: int
    seed: int
    relay_all: bool = False


@dataclass
class Ctx:
    """One target on one backend, being measured."""

    backend: str
    target: str
    server: Server
    client: S3Client
    bucket: str
    res: Results
    opts: Options
    payloads: dict[int, bytes]
    small_ready: bool = False
    state: dict[str, int] = field(default_factory=dict)

    def add(
        self, scenario: str, params: str, metric: str, unit: str, better: str, v: float
    ) -> None:
        self.res.add(self.backend, scenario, params, metric, unit, better, self.target, v)

    def cpu(self) -> float:
        return proc_usage(self.server.pid).cpu_seconds

    async def relay_bytes(self) -> int | None:
        if self.server.relay_stats_url is None:
            return None
        return await relay_from_upstream(self.server.relay_stats_url)


def size_label(n: int) -> str:
    if n >= GiB and n % GiB == 0:
        return f"{n // GiB} GiB"
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB} MiB"
    if n % 1024 == 0:
        return f"{n // 1024} KiB"
    return f"{n} B"


def payload(ctx: Ctx, size: int) -> bytes:
    data = ctx.payloads.get(size)
    if data is None:
        data = os.urandom(size)  # incompressible, generated once per run and size
        ctx.payloads[size] = data
    return data


async def _timed(coro: Awaitable[object]) -> float:
    t0 = time.perf_counter()
    await coro
    return time.perf_counter() - t0


async def _check_roundtrip(ctx: Ctx, key: str, data: bytes) -> None:
    n, body = await ctx.client.get_object(ctx.bucket, key, keep_body=True)
    if n != len(data) or hashlib.sha256(body).digest() != hashlib.sha256(data).digest():
        raise RuntimeError(f"{ctx.target}: {key} read back differs from what was written")


async def large(ctx: Ctx) -> None:
    """Large-object PUT and GET throughput, one object at a time.

    One warm-up round trip (verified byte for byte) at the first size; every measured GET
    checks the byte count.
    """
    for i, size in enumerate(ctx.opts.sizes):
        data = payload(ctx, size)
        key = f"large/{size}"
        label = size_label(size)
        if i == 0:  # warm-up (connections, caches, page cache), with a content check
            await ctx.client.put_object(ctx.bucket, key, data)
            await _check_roundtrip(ctx, key, data)
        for _ in range(ctx.opts.repeats):
            c0 = ctx.cpu()
            dt = await _timed(ctx.client.put_object(ctx.bucket, key, data))
            c1 = ctx.cpu()
            ctx.add("large PUT", label, "throughput", "MiB/s", "higher", size / MiB / dt)
            ctx.add("large PUT", label, "server CPU", "s/GiB", "lower", (c1 - c0) * GiB / size)
            t0 = time.perf_counter()
            n, _ = await ctx.client.get_object(ctx.bucket, key)
            dt = time.perf_counter() - t0
            c2 = ctx.cpu()
            if n != size:
                raise RuntimeError(f"{ctx.target}: GET {key} returned {n} bytes, want {size}")
            ctx.add("large GET", label, "throughput", "MiB/s", "higher", size / MiB / dt)
            ctx.add("large GET", label, "server CPU", "s/GiB", "lower", (c2 - c1) * GiB / size)
        await ctx.client.delete_object(ctx.bucket, key)


def _small_key(i: int, nkeys: int) -> str:
    return f"small/{i % nkeys:06d}"


async def _populate_small(ctx: Ctx) -> None:
    if ctx.small_ready:
        return
    data = payload(ctx, SMALL_SIZE)
    n = ctx.opts.small_keys

    async def put(i: int) -> None:
        await ctx.client.put_object(ctx.bucket, _small_key(i, n), data)

    await run_bounded(n, 16, put, LARGE_OP_TIMEOUT)
    await _check_roundtrip(ctx, _small_key(0, n), data)
    ctx.small_ready = True


def _record_load(ctx: Ctx, scenario: str, params: str, r: LoadResult, cpu: float) -> None:
    ctx.add(scenario, params, "rate", "req/s", "higher", r.rate)
    ctx.add(scenario, params, "p50 latency", "ms", "lower", r.percentile(50) * 1000)
    ctx.add(scenario, params, "p99 latency", "ms", "lower", r.percentile(99) * 1000)
    if r.requests:
        ctx.add(scenario, params, "server CPU", "ms/req", "lower", cpu * 1000 / r.requests)


async def _measured_load(
    ctx: Ctx,
    scenario: str,
    params: str,
    op: Callable[[int, random.Random], Awaitable[int]],
    concurrency: int,
) -> list[LoadResult]:
    o = ctx.opts
    await run_load(op, concurrency, o.warmup, MAX_REQUESTS, seed=o.seed)
    out = []
    for rep in range(o.repeats):
        c0, p0 = ctx.cpu(), time.process_time()
        r = await run_load(op, concurrency, o.duration, MAX_REQUESTS, seed=o.seed + rep + 1)
        cpu, client_cpu = ctx.cpu() - c0, time.process_time() - p0
        _record_load(ctx, scenario, params, r, cpu)
        ctx.add(scenario, params, "load-generator CPU", "%", "lower", 100 * client_cpu / r.seconds)
        out.append(r)
    return out


async def small(ctx: Ctx) -> None:
    """4 KiB PUT and GET: requests/s and p50/p99 latency at each concurrency."""
    data = payload(ctx, SMALL_SIZE)
    nkeys = ctx.opts.small_keys
    await _populate_small(ctx)

    async def put(i: int, rng: random.Random) -> int:
        await ctx.client.put_object(ctx.bucket, _small_key(i, nkeys), data)
        return SMALL_SIZE

    async def get(i: int, rng: random.Random) -> int:
        n, _ = await ctx.client.get_object(ctx.bucket, _small_key(rng.randrange(nkeys), nkeys))
        if n != SMALL_SIZE:
            raise RuntimeError(f"{ctx.target}: small GET returned {n} bytes")
        return n

    for conc in ctx.opts.concurrency:
        await _measured_load(ctx, "small PUT 4 KiB", f"c={conc}", put, conc)
        await _measured_load(ctx, "small GET 4 KiB", f"c={conc}", get, conc)


async def range_get(ctx: Ctx) -> None:
    """1 KiB range GETs at random offsets in a large object, one at a time."""
    size = ctx.opts.sizes[0]
    data = payload(ctx, size)
    key = "range/source"
    await ctx.client.put_object(ctx.bucket, key, data)
    await _check_roundtrip(ctx, key, data)

    async def op(i: int, rng: random.Random) -> int:
        n = await ctx.client.get_range(ctx.bucket, key, rng.randrange(size - RANGE_LEN), RANGE_LEN)
        if n != RANGE_LEN:
            raise RuntimeError(f"{ctx.target}: range GET returned {n} bytes")
        return n

    scenario, params = "range GET 1 KiB", f"in {size_label(size)}, c=1"
    o = ctx.opts
    await run_load(op, 1, o.warmup, MAX_REQUESTS, seed=o.seed)
    for rep in range(o.repeats):
        b0 = await ctx.relay_bytes()
        c0 = ctx.cpu()
        r = await run_load(op, 1, o.duration, MAX_REQUESTS, seed=o.seed + rep + 1)
        cpu = ctx.cpu() - c0
        b1 = await ctx.relay_bytes()
        _record_load(ctx, scenario, params, r, cpu)
        if b0 is not None and b1 is not None and r.requests:
            ctx.add(
                scenario, params, "backend bytes read", "B/req", "lower", (b1 - b0) / r.requests
            )
    await ctx.client.delete_object(ctx.bucket, key)


async def multipart(ctx: Ctx) -> None:
    """Multipart upload of one large object in fixed-size parts."""
    o = ctx.opts
    size = o.multipart_size
    data = payload(ctx, size)
    key = "multipart/object"
    params = f"{size_label(size)} in {size_label(o.part_size)} parts, {o.part_parallel} parallel"
    await ctx.client.multipart_upload(ctx.bucket, key, data, o.part_size, o.part_parallel)
    await _check_roundtrip(ctx, key, data)
    for _ in range(o.repeats):
        c0 = ctx.cpu()
        dt = await _timed(
            ctx.client.multipart_upload(ctx.bucket, key, data, o.part_size, o.part_parallel)
        )
        cpu = ctx.cpu() - c0
        ctx.add("multipart upload", params, "throughput", "MiB/s", "higher", size / MiB / dt)
        ctx.add("multipart upload", params, "server CPU", "s/GiB", "lower", cpu * GiB / size)
    await ctx.client.delete_object(ctx.bucket, key)


async def listing(ctx: Ctx) -> None:
    """ListObjectsV2 over ``list_objects`` keys, paged; objects are written first (64 B)."""
    o = ctx.opts
    n = o.list_objects if ctx.backend == "rclone-dir" else o.list_objects_slow
    data = payload(ctx, 64)

    async def put(i: int) -> None:
        await ctx.client.put_object(ctx.bucket, f"list/{i:06d}", data)

    populate = await run_bounded(n, POPULATE_CONCURRENCY, put, LARGE_OP_TIMEOUT)
    params = f"{n:,} objects, {o.list_page}/page"
    ctx.add("list (populate)", params, "PUT rate", "req/s", "higher", n / populate)
    keys, _ = await ctx.client.list_all(ctx.bucket, "list/", o.list_page)  # warm-up
    if keys != n:
        raise RuntimeError(f"{ctx.target}: listing found {keys} keys, want {n}")
    for _ in range(o.repeats):
        c0 = ctx.cpu()
        t0 = time.perf_counter()
        keys, pages = await ctx.client.list_all(ctx.bucket, "list/", o.list_page)
        dt = time.perf_counter() - t0
        cpu = ctx.cpu() - c0
        if keys != n:
            raise RuntimeError(f"{ctx.target}: listing found {keys} keys, want {n}")
        ctx.add("list", params, "full listing", "s", "lower", dt)
        ctx.add("list", params, "page latency", "ms", "lower", dt * 1000 / pages)
        ctx.add("list", params, "server CPU", "ms/page", "lower", cpu * 1000 / pages)


RUNNERS: dict[str, Callable[[Ctx], Awaitable[None]]] = {
    "large": large,
    "small": small,
    "range": range_get,
    "multipart": multipart,
    "list": listing,
    "s5cmd": parallel.s5cmd,
}


async def run_all(ctx: Ctx, *, process_figures: bool = True) -> None:
    """Every selected scenario in order, then per-target KMS and (``process_figures``) the
    process's figures for the whole run.

    A scenario that fails (e.g. an operation the target does not support) is recorded in
    ``ctx.res.errors`` and the next scenario runs.
    """
    c_start = ctx.cpu()
    for name in ctx.opts.scenarios:
        k0 = await kms_calls(ctx.server.metrics_url) if ctx.server.metrics_url else None
        r0 = ctx.client.requests
        t0 = time.monotonic()
        try:
            await RUNNERS[name](ctx)
        except SCENARIO_ERRORS as e:
            ctx.res.errors.append(
                {
                    "backend": ctx.backend,
                    "target": ctx.target,
                    "scenario": name,
                    "error": one_line(e),
                }
            )
            print(f"[bench]     {name}: FAILED: {one_line(e)}", file=sys.stderr, flush=True)
            continue
        print(f"[bench]     {name}: {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
        if k0 is not None and ctx.server.metrics_url:
            k1 = await kms_calls(ctx.server.metrics_url)
            reqs = ctx.client.requests - r0
            if reqs:
                per10k = (k1 - k0) * 10_000 / reqs
                ctx.add("KMS calls", name, "per 10,000 requests", "calls", "lower", per10k)
    if not process_figures:
        return
    usage = proc_usage(ctx.server.pid)
    ctx.add("process", "whole run", "peak RSS (VmHWM)", "MiB", "lower", usage.peak_rss_bytes / MiB)
    ctx.add(
        "process", "whole run", "peak RSS per process", "MiB", "lower", usage.max_rss_bytes / MiB
    )
    ctx.add("process", "whole run", "processes", "count", "lower", usage.processes)
    ctx.add("process", "whole run", "CPU time", "s", "lower", usage.cpu_seconds - c_start)


def one_line(e: BaseException) -> str:
    """An exception as one bounded line (S3 error bodies can be long)."""
    text = f"{type(e).__name__}: {e}"
    return " ".join(text.split())[:600]
