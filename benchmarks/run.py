"""Run the benchmark: ``python -m benchmarks.run [options]`` (see ``--help`` and README.md).

For each backend (rclone-dir, moto) the harness starts the backend, then measures each
target in turn - the backend directly, cmek-proxy in front of it at one worker and at the
default worker count (connected straight to the backend; the range scenario alone runs
through a counting relay, which measures backend bytes per request), and the rclone crypt
peer (rclone-dir backend only) - with the same client and scenarios, and writes
``results.json`` and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import replace
from pathlib import Path

from benchmarks.loadgen import S3Client
from benchmarks.report import PEER_BACKEND, TARGETS, Results, write
from benchmarks.scenarios import (
    SCENARIO_ERRORS,
    SCENARIOS,
    Ctx,
    MiB,
    Options,
    one_line,
    run_all,
    size_label,
)
from benchmarks.sigv4 import signing_rate
from benchmarks.targets import (
    REGION,
    Server,
    StartError,
    cmek_proxy,
    moto_backend,
    rclone_binary,
    rclone_crypt_peer,
    rclone_dir_backend,
)

BACKEND_NAMES = ("rclone-dir", "moto")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": MiB, "mib": MiB, "g": 1 << 30, "gib": 1 << 30}
RUN_ERRORS = (StartError, *SCENARIO_ERRORS)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 4KiB, 64MiB, 1GiB)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def _csv(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)}; got {text!r}")
        return items

    return parse


def _ints(text: str) -> list[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"positive integers expected: {text!r}")
    return vals


def _sizes(text: str) -> list[int]:
    return [parse_size(t) for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--scenarios", type=_csv(SCENARIOS), default=list(SCENARIOS))
    p.add_argument("--sizes", type=_sizes, help="large-object sizes (default 64MiB,256MiB)")
    p.add_argument("--concurrency", type=_ints, help="small-object concurrencies (1,16,64)")
    p.add_argument("--duration", type=float, help="seconds per measured timed run (0.6)")
    p.add_argument("--repeats", type=int, help="measured repetitions (3)")
    p.add_argument("--targets", type=_csv(TARGETS), default=list(TARGETS))
    p.add_argument("--backends", type=_csv(BACKEND_NAMES), default=list(BACKEND_NAMES))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument(
        "--list-objects",
        type=int,
        help="objects in the listing scenario (10000; 1000 on moto unless given)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes and durations (seconds)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--relay-all",
        action="store_true",
        help="run every proxy scenario through the counting relay (runs before 2026-12-02 "
        "did; by default only the range scenario, which counts backend bytes, uses it)",
    )
    p.add_argument(
        "--proxy-workers",
        type=int,
        help="workers of the proxy-default target (default: the proxy's own default, the CPUs "
        "available to it); the proxy target always runs --workers 1",
    )
    return p


def options_from(a: argparse.Namespace) -> Options:
    if a.smoke:
        base = Options(
            scenarios=a.scenarios,
            sizes=[256 * 1024, 1 * MiB],
            concurrency=[1, 4],
            duration=0.2,
            repeats=2,
            warmup=0.1,
            list_objects=120,
            list_objects_slow=120,
            list_page=50,
            part_size=5 * MiB,
            multipart_size=6 * MiB,
            part_parallel=2,
            small_keys=32,
            seed=a.seed,
            relay_all=a.relay_all,
        )
    else:
        base = Options(
            scenarios=a.scenarios,
            sizes=[64 * MiB, 256 * MiB],
            concurrency=[1, 16, 64],
            duration=0.6,
            repeats=3,
            warmup=0.2,
            list_objects=10_000,
            list_objects_slow=1_000,
            list_page=1000,
            part_size=8 * MiB,
            multipart_size=64 * MiB,
            part_parallel=4,
            small_keys=256,
            seed=a.seed,
            relay_all=a.relay_all,
        )
    if a.sizes:
        base.sizes = a.sizes
        if not a.smoke:
            base.multipart_size = max(a.sizes[0], base.part_size)
    if a.concurrency:
        base.concurrency = a.concurrency
    if a.duration is not None:
        base.duration = a.duration
        base.warmup = min(base.warmup, a.duration)
    if a.repeats is not None:
        base.repeats = max(1, a.repeats)
    if a.list_objects is not None:
        base.list_objects = base.list_objects_slow = max(1, a.list_objects)
    if min(base.sizes) <= 1024:
        raise SystemExit("--sizes must be larger than 1 KiB (range GETs read 1 KiB)")
    return base


def _rclone_version() -> str:
    try:
        out = subprocess.run(
            [rclone_binary(), "version"], capture_output=True, timeout=30, check=True
        )
    except (StartError, OSError, subprocess.SubprocessError):
        return "unavailable"
    return out.stdout.decode().splitlines()[0]


def _backend_cm(name: str, workdir: Path) -> AbstractAsyncContextManager[Server]:
    return rclone_dir_backend(workdir) if name == "rclone-dir" else moto_backend(workdir)


@asynccontextmanager
async def _direct(backend: Server) -> AsyncIterator[Server]:
    yield backend


async def measure_target(
    backend_name: str,
    target: str,
    backend: Server,
    workdir: Path,
    opts: Options,
    res: Results,
    payloads: dict[int, bytes],
    proxy_workers: int | None = None,
) -> None:
    if target in ("proxy", "proxy-default") and "range" in opts.scenarios and not opts.relay_all:
        # The range scenario counts backend bytes through a relay; every other scenario runs
        # with the proxy straight on the backend, as the direct target and the peer are.
        rest = [s for s in opts.scenarios if s != "range"]
        for scenarios, relay in ((rest, False), (["range"], True)):
            if scenarios:
                part = replace(opts, scenarios=scenarios)
                await _measure_one(
                    backend_name,
                    target,
                    backend,
                    workdir,
                    part,
                    res,
                    payloads,
                    proxy_workers,
                    relay=relay,
                    process_figures=bool(rest) != relay,
                )
        return
    await _measure_one(
        backend_name,
        target,
        backend,
        workdir,
        opts,
        res,
        payloads,
        proxy_workers,
        relay=opts.relay_all,
        process_figures=True,
    )


async def _measure_one(
    backend_name: str,
    target: str,
    backend: Server,
    workdir: Path,
    opts: Options,
    res: Results,
    payloads: dict[int, bytes],
    proxy_workers: int | None,
    *,
    relay: bool,
    process_figures: bool,
) -> None:
    bucket = f"bench-{target}{'-relay' if relay and target != 'direct' else ''}"
    # Buckets are made on the backend (direct, proxy) or on the peer itself.
    async with AsyncExitStack() as stack:
        if target == "direct":
            server = await stack.enter_async_context(_direct(backend))
        elif target in ("proxy", "proxy-default"):
            workers = 1 if target == "proxy" else proxy_workers
            server = await stack.enter_async_context(
                cmek_proxy(workdir, backend, backend_name, workers, relay=relay)
            )
        else:
            server = await stack.enter_async_context(rclone_crypt_peer(workdir))
        setup = server if target == "peer" else backend
        async with S3Client(setup.url, setup.access_key, setup.secret_key, REGION) as admin:
            await admin.create_bucket(bucket)
        conns = max([*opts.concurrency, 32]) + 8
        async with S3Client(
            server.url, server.access_key, server.secret_key, REGION, max_connections=conns
        ) as client:
            ctx = Ctx(backend_name, target, server, client, bucket, res, opts, payloads)
            await run_all(ctx, process_figures=process_figures)


async def run(
    opts: Options,
    targets: list[str],
    backends: list[str],
    res: Results,
    proxy_workers: int | None = None,
) -> None:
    payloads: dict[int, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="cmek-bench-") as tmp:
        root = Path(tmp)
        for bname in backends:
            bdir = root / bname
            bdir.mkdir()
            try:
                async with _backend_cm(bname, bdir) as backend:
                    for target in targets:
                        if target == "peer" and bname != PEER_BACKEND:
                            continue
                        t0 = time.monotonic()
                        print(f"[bench] {bname} / {target} ...", file=sys.stderr, flush=True)
                        try:
                            await measure_target(
                                bname, target, backend, bdir, opts, res, payloads, proxy_workers
                            )
                        except RUN_ERRORS as e:
                            res.errors.append(
                                {"backend": bname, "target": target, "error": one_line(e)}
                            )
                            print(f"[bench]   FAILED: {e}", file=sys.stderr, flush=True)
                        print(
                            f"[bench]   {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True
                        )
            except StartError as e:
                res.errors.append({"backend": bname, "target": "backend", "error": one_line(e)})
                print(f"[bench] backend {bname} FAILED: {e}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = options_from(args)
    res = Results()
    loop_name = "asyncio"
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        factory = uvloop.new_event_loop
        loop_name = "uvloop"
    except ImportError:
        pass
    res.meta = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": "python -m benchmarks.run "
        + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "host": f"{platform.machine()}, {_cpus()} CPUs, Python {platform.python_version()}, "
        f"{_rclone_version()}",
        "loop": f"load generator on {loop_name} + aiohttp",
        "signing_rate": f"{signing_rate():,.0f} SigV4 signatures/s on one core",
        "load": "load average at start {:.2f} {:.2f} {:.2f} (1, 5, 15 min)".format(
            *os.getloadavg()
        ),
        "proxy_workers": f"proxy w=1, and w=default = {args.proxy_workers or _default_workers()}"
        + ("" if args.proxy_workers else " (the CPUs available to the proxy)"),
        "repeats": opts.repeats,
        "duration_s": opts.duration,
        "sizes": [size_label(s) for s in opts.sizes],
        "concurrency": opts.concurrency,
        "targets": args.targets,
        "backends": args.backends,
        "smoke": args.smoke,
    }
    t0 = time.monotonic()
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(run(opts, args.targets, args.backends, res, args.proxy_workers))
    res.meta["wall_s"] = round(time.monotonic() - t0, 1)
    jpath, mpath = write(res, args.out)
    print(f"[bench] wrote {jpath} and {mpath} in {res.meta['wall_s']}s", file=sys.stderr)
    return 1 if res.errors else 0


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


def _default_workers() -> int:
    from proxy.workers import available_cpus

    return available_cpus()


if __name__ == "__main__":
    sys.exit(main())
