"""Profile the proxy on the small-object path: ``python -m benchmarks.profile_small``.

Starts ``rclone serve s3`` and the proxy (``--workers`` from ``WORKERS``, default 1) in front
of it, stores 64 objects of 4 KiB, warms up with 300 requests, then runs ``N`` boto3 GETs or
PUTs (``OP=get|put``) at c=16 (``C`` sets it, 1 to 64) under ``py-spy record -r 200 -f raw``
(``SPY=0`` to skip; with several workers ``--subprocesses``; ``NATIVE=1`` adds native frames),
and prints the proxy's CPU per request (utime+stime over its process tree).  ``OUT`` is the raw
profile (default ``/tmp/cmek-prof.txt``); ``STORE`` the envelope store (metadata|sidecar);
``ACCESS_LOG=0`` turns the access log off.
Summarise a profile with ``python -m benchmarks.profile_small --summary FILE``: inclusive share
of every frame.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from benchmarks.targets import proc_usage, sched_counters


def summary(path: str, top: int = 60) -> None:
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, n_s = line.rpartition(" ")
        n = int(n_s)
        total += n
        seen = set()
        for frame in stack.split(";"):
            name = frame.split(" (")[0]
            if " (" in frame:
                name += " (" + frame.split(" (")[1].split(":")[0] + ")"
            if name not in seen:
                seen.add(name)
                incl[name] += n
    print(f"total samples {total}")
    for name, n in incl.most_common(top):
        print(f"{100 * n / total:5.1f}% {name}")


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--summary":
        summary(sys.argv[2])
        return 0
    from tests.servers import (
        BACKEND_AK,
        BACKEND_SK,
        CLIENT_AK,
        CLIENT_SK,
        REGION,
        free_port,
        http_ok,
        new_keyfile,
        rclone_server,
        s3_client,
        wait_until,
    )

    workers = int(os.environ.get("WORKERS", "1"))
    op = os.environ.get("OP", "get")
    n = int(os.environ.get("N", "3000"))
    concurrency = max(1, min(64, int(os.environ.get("C", "16"))))
    tmp = Path(tempfile.mkdtemp(prefix="cmek-prof-"))
    with rclone_server(tmp / "root", tmp) as backend:
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
                "envelope_store": os.environ.get("STORE", "metadata"),
            },
            "encryption": {"default": {"key": f"local://{key}"}},
            "workers": workers,
            "logging": {"access_log": os.environ.get("ACCESS_LOG", "1") == "1"},
        }
        (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
        argv = [sys.executable, "-m", "proxy", "serve", "--config", str(tmp / "c.yaml")]
        proc = subprocess.Popen(argv)
        try:
            wait_until(lambda: http_ok(f"http://127.0.0.1:{admin}/readyz"), 120, "proxy")
            c = s3_client(f"http://127.0.0.1:{port}", CLIENT_AK, CLIENT_SK, max_pool_connections=32)
            c.create_bucket(Bucket="prof")
            for i in range(64):
                c.put_object(Bucket="prof", Key=f"k{i}", Body=os.urandom(4096))

            def one(i: int) -> None:
                if op == "get":
                    c.get_object(Bucket="prof", Key=f"k{i % 64}")["Body"].read()
                else:
                    c.put_object(Bucket="prof", Key=f"w{i % 64}", Body=b"x" * 4096)

            with ThreadPoolExecutor(concurrency) as ex:  # warm-up, not measured
                list(ex.map(one, range(300)))
            spy = None
            if os.environ.get("SPY", "1") == "1":
                spy_argv = ["py-spy", "record", "-p", str(proc.pid), "-f", "raw", "-r", "200"]
                spy_argv += ["-o", os.environ.get("OUT", "/tmp/cmek-prof.txt")]
                spy_argv += ["-d", os.environ.get("DUR", "15")]
                if workers > 1:
                    spy_argv.append("--subprocesses")
                if os.environ.get("NATIVE") == "1":
                    spy_argv.append("--native")
                spy = subprocess.Popen(
                    spy_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                time.sleep(1.5)
            u0, s0 = proc_usage(proc.pid), sched_counters(proc.pid)
            start = time.time()
            with ThreadPoolExecutor(concurrency) as ex:
                list(ex.map(one, range(n)))
            elapsed = time.time() - start
            u1, s1 = proc_usage(proc.pid), sched_counters(proc.pid)
            per = (u1.cpu_seconds - u0.cpu_seconds) * 1000 / n
            doc = {"op": op, "workers": workers, "concurrency": concurrency, "requests": n}
            doc["seconds"] = round(elapsed, 2)
            doc["proxy_cpu_ms_per_req"] = round(per, 3)
            if workers == 1:  # the one process: user and kernel time, sleeps per request
                doc["user_ms_per_req"] = round((s1[0] - s0[0]) * 1000 / n, 3)
                doc["system_ms_per_req"] = round((s1[1] - s0[1]) * 1000 / n, 3)
                doc["voluntary_switches_per_req"] = round((s1[2] - s0[2]) / n, 2)
            print(json.dumps(doc))
            if spy is not None:
                spy.wait()
        finally:
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
