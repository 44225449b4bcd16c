"""Profile the proxy on multipart uploads or listings: ``python -m benchmarks.profile_paths``.

Starts ``rclone serve s3`` on a local directory and the proxy (``--workers 1``) in front of it,
then with the harness's own client (``benchmarks.loadgen``, as ``benchmarks.run`` measures):

- ``OP=multipart``: uploads ``SIZE_MIB`` (64) MiB in 8 MiB parts, 4 in flight, ``N`` (6) times;
- ``OP=list``: stores ``OBJECTS`` (10,000) keys once, then lists them all ``N`` times (1000 a page);
- ``OP=put`` / ``OP=get``: one PUT / GET of a ``SIZE_MIB`` (256, at most 1024) MiB object;

each first straight to the backend and then through the proxy, alternating, after one warm-up
round of each, and prints the median seconds of each and the proxy's CPU per round
(utime+stime).  ``BACKEND=moto`` puts ``moto.server`` behind it instead of rclone;
``VIA=relay`` puts ``benchmarks.relay`` (a Python process that only copies bytes) where the
proxy was, to show what any extra process on the path costs on this machine.
The proxy rounds run under ``py-spy record -r 200 -f raw`` (``SPY=0`` to skip; ``OUT`` is the
raw profile, default ``/tmp/cmek-prof-<op>.txt``); ``NATIVE=1`` adds native frames
(uvloop, OpenSSL, the kernel calls); summarise it with ``python -m benchmarks.profile_small
--summary FILE``.  Bounded: ``N`` at most 50, ``OBJECTS`` at most 20,000.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import yaml

from benchmarks.loadgen import S3Client
from benchmarks.targets import proc_usage

MiB = 1 << 20


async def _rounds(
    direct: S3Client, proxied: S3Client, pid: int, n: int, op: Callable[[S3Client], Awaitable[None]]
) -> dict[str, float]:
    await op(direct)
    await op(proxied)
    d: list[float] = []
    p: list[float] = []
    cpu = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        await op(direct)
        d.append(time.perf_counter() - t0)
        u0 = proc_usage(pid).cpu_seconds
        t0 = time.perf_counter()
        await op(proxied)
        p.append(time.perf_counter() - t0)
        cpu += proc_usage(pid).cpu_seconds - u0
    dm, pm = statistics.median(d), statistics.median(p)
    return {
        "direct_s": round(dm, 4),
        "proxy_s": round(pm, 4),
        "proxy_over_direct_time": round(pm / dm, 3),
        "proxy_cpu_s_per_round": round(cpu / n, 4),
    }


async def _measure(
    backend_url: str, proxy_url: str, pid: int, op_name: str, relay: bool
) -> dict[str, float]:
    from tests.servers import BACKEND_AK, BACKEND_SK, CLIENT_AK, CLIENT_SK, REGION

    n = min(int(os.environ.get("N", "6")), 50)
    ak, sk = (BACKEND_AK, BACKEND_SK) if relay else (CLIENT_AK, CLIENT_SK)
    async with (
        S3Client(backend_url, BACKEND_AK, BACKEND_SK, REGION) as direct,
        S3Client(proxy_url, ak, sk, REGION) as proxied,
    ):
        for c in (direct, proxied):
            await c.create_bucket("prof")
        if op_name == "multipart":
            data = os.urandom(int(os.environ.get("SIZE_MIB", "64")) * MiB)

            async def op(c: S3Client) -> None:
                await c.multipart_upload("prof", "mp/object", data, 8 * MiB, 4)

        elif op_name == "put":
            data = os.urandom(min(int(os.environ.get("SIZE_MIB", "256")), 1024) * MiB)

            async def op(c: S3Client) -> None:
                await c.put_object("prof", "large/object", data)

        elif op_name == "get":
            data = os.urandom(min(int(os.environ.get("SIZE_MIB", "256")), 1024) * MiB)
            for c in (direct, proxied):  # one backend: each its own key
                await c.put_object("prof", f"large/{id(c)}", data)

            async def op(c: S3Client) -> None:
                n, _ = await c.get_object("prof", f"large/{id(c)}")
                if n != len(data):
                    raise RuntimeError(f"GET gave {n} bytes of {len(data)}")

        else:
            objects = min(int(os.environ.get("OBJECTS", "10000")), 20_000)
            sem = asyncio.Semaphore(32)

            async def put(c: S3Client, i: int) -> None:
                async with sem:
                    await c.put_object("prof", f"list/{i:06d}", b"x" * 16)

            for c in (direct, proxied):
                await asyncio.gather(*(put(c, i) for i in range(objects)))

            async def op(c: S3Client) -> None:
                keys, _ = await c.list_all("prof", "list/", 1000)
                if keys != objects:
                    raise RuntimeError(f"listed {keys} keys, stored {objects}")

        return await _rounds(direct, proxied, pid, n, op)


def main() -> int:
    from tests.servers import (
        BACKEND_AK,
        BACKEND_SK,
        CLIENT_AK,
        CLIENT_SK,
        REGION,
        free_port,
        http_ok,
        moto_server,
        new_keyfile,
        rclone_server,
        wait_until,
    )

    op = os.environ.get("OP", "multipart")
    if op not in ("multipart", "list", "put", "get"):
        raise SystemExit("OP is multipart, list, put or get")
    via = os.environ.get("VIA", "proxy")
    if via not in ("proxy", "relay"):
        raise SystemExit("VIA is proxy or relay")
    tmp = Path(tempfile.mkdtemp(prefix="cmek-prof-"))
    on_moto = os.environ.get("BACKEND", "rclone") == "moto"
    with moto_server(tmp) if on_moto else rclone_server(tmp / "root", tmp) as backend:
        key = new_keyfile(tmp / "k.json")
        port, admin = free_port(), free_port()
        cfg = {
            "listen": {"host": "127.0.0.1", "port": port},
            "admin": {"host": "127.0.0.1", "port": admin},
            "region": REGION,
            "clients": [{"access_key": CLIENT_AK, "secret_key": CLIENT_SK}],
            "backend": {
                "endpoint": backend.url,
                "region": REGION,
                "access_key": BACKEND_AK,
                "secret_key": BACKEND_SK,
            },
            "encryption": {"default": {"key": f"local://{key}"}},
            "workers": 1,
        }
        (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
        argv = [sys.executable, "-m", "proxy", "serve", "--config", str(tmp / "c.yaml")]
        if via == "relay":
            target = backend.url.rsplit(":", 1)[1]
            argv = [sys.executable, "-m", "benchmarks.relay", "--listen-port", str(port)]
            argv += ["--target-port", target, "--stats-port", str(admin)]
        proc = subprocess.Popen(argv)
        spy = None
        try:
            ready = f"http://127.0.0.1:{admin}/" + ("stats" if via == "relay" else "readyz")
            wait_until(lambda: http_ok(ready), 120, via)
            if os.environ.get("SPY", "1") == "1":
                out = os.environ.get("OUT", f"/tmp/cmek-prof-{op}.txt")
                spy_argv = ["py-spy", "record", "-p", str(proc.pid), "-f", "raw", "-r", "200"]
                spy_argv += ["-o", out, "-d", os.environ.get("DUR", "600")]
                if os.environ.get("NATIVE") == "1":
                    spy_argv.append("--native")
                spy = subprocess.Popen(
                    spy_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                time.sleep(1.5)
            url = f"http://127.0.0.1:{port}"
            doc = asyncio.run(_measure(backend.url, url, proc.pid, op, via == "relay"))
            print(json.dumps({"op": op, "backend": backend.name, "via": via, **doc}))
        finally:
            proc.terminate()
            proc.wait(30)
            if spy is not None:
                spy.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
