"""Smoke tests of the benchmark harness (benchmarks/): tiny sizes, seconds not minutes.

They check that the harness runs end to end against real servers on 127.0.0.1 and that its
JSON and Markdown outputs hold the expected rows with positive figures.  Nothing here asserts
on speed.
"""

from __future__ import annotations

import calendar
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from benchmarks.loadgen import LoadResult
from benchmarks.report import Results, render_markdown
from benchmarks.sigv4 import SigV4Signer, canonical_query, uri_encode_path
from benchmarks.targets import counting_relay, kms_requests_total, relay_from_upstream

REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 900  # four targets on two backends; the machine is shared and loaded

# Metrics that must be strictly positive in every row where a target has a value.
POSITIVE = {
    "throughput",
    "rate",
    "p50 latency",
    "p99 latency",
    "full listing",
    "page latency",
    "PUT rate",
    "peak RSS (VmHWM)",
    "backend bytes read",
    "peak RSS per process",
    "processes",
}


def _run_harness(out: Path, *args: str) -> tuple[dict[str, Any], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out), *args],
        cwd=REPO,
        capture_output=True,
        timeout=RUN_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-4000:]
    doc = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    return doc, md


def _rows(doc: dict[str, Any], backend: str) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {
        (r["scenario"], r["params"], r["metric"]): r for r in doc["rows"] if r["backend"] == backend
    }


def _expected_keys() -> set[tuple[str, str, str]]:
    keys: set[tuple[str, str, str]] = set()
    for size in ("256 KiB", "1 MiB"):
        for op in ("large PUT", "large GET"):
            keys |= {(op, size, "throughput"), (op, size, "server CPU")}
    for conc in ("c=1", "c=4"):
        for op in ("small PUT 4 KiB", "small GET 4 KiB"):
            for m in ("rate", "p50 latency", "p99 latency", "server CPU", "load-generator CPU"):
                keys.add((op, conc, m))
    for m in ("rate", "p50 latency", "p99 latency", "server CPU"):
        keys.add(("range GET 1 KiB", "in 256 KiB, c=1", m))
    keys.add(("multipart upload", "6 MiB in 5 MiB parts, 2 parallel", "throughput"))
    lp = "120 objects, 50/page"
    keys |= {("list", lp, "full listing"), ("list", lp, "page latency")}
    keys.add(("list (populate)", lp, "PUT rate"))
    keys |= {("process", "whole run", "peak RSS (VmHWM)"), ("process", "whole run", "CPU time")}
    keys.add(("process", "whole run", "peak RSS per process"))
    for op in ("PUT", "GET"):
        keys |= {(f"s5cmd small {op}", "32 x 4 KiB, 32 workers", m) for m in ("rate", "server CPU")}
    for op in ("upload", "download"):
        keys |= {(f"s5cmd large {op}", "6 MiB in 5 MiB parts", m) for m in ("throughput",)}
    return keys


def _check_target(rows: dict[tuple[str, str, str], dict[str, Any]], target: str) -> None:
    missing = {k for k in _expected_keys() if not rows.get(k, {}).get("targets", {}).get(target)}
    assert not missing, f"{target}: rows without values: {sorted(missing)}"
    for key, row in rows.items():
        summary = row["targets"].get(target)
        if summary is None:
            continue
        assert summary["min"] <= summary["median"] <= summary["max"], key
        if key[2] in POSITIVE:
            assert summary["min"] > 0, (target, key, summary)
        else:
            assert summary["min"] >= 0, (target, key, summary)


def test_signer_matches_botocore() -> None:
    path = uri_encode_path("/bkt/dir name/obj+1~é")
    query = canonical_query(
        [("list-type", "2"), ("prefix", "a/b c"), ("continuation-token", "x+/=")]
    )
    req = AWSRequest(
        method="GET", url=f"http://127.0.0.1:9000{path}?{query}", headers={"Range": "bytes=0-9"}
    )
    S3SigV4Auth(Credentials("AKID", "SECRET"), "s3", "us-east-1").add_auth(req)
    now = calendar.timegm(time.strptime(req.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
    # botocore signs the payload over plain http; sign the same empty-body hash.
    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    ours = SigV4Signer("AKID", "SECRET", "us-east-1").sign(
        "GET", "127.0.0.1:9000", path, query, {"Range": "bytes=0-9"}, payload_hash=empty, now=now
    )
    assert ours["Authorization"] == req.headers["Authorization"]


def test_kms_counter_parsing_and_percentiles() -> None:
    text = (
        "# TYPE cmek_kms_requests_total counter\n"
        'cmek_kms_requests_total{provider="local",operation="unwrap",outcome="ok"} 3.0\n'
        'cmek_kms_requests_total{provider="local",operation="wrap",outcome="ok"} 2.0\n'
        'cmek_kms_requests_created{provider="local",operation="wrap",outcome="ok"} 1.7e9\n'
    )
    assert kms_requests_total(text) == 5.0
    r = LoadResult(requests=4, seconds=2.0, latencies=[0.4, 0.1, 0.3, 0.2])
    assert r.rate == 2.0
    assert r.percentile(50) == 0.2
    assert r.percentile(99) == 0.4


def test_markdown_marks_peer_not_applicable_on_moto() -> None:
    res = Results()
    res.add("moto", "large PUT", "1 MiB", "throughput", "MiB/s", "higher", "direct", 10.0)
    res.add("moto", "large PUT", "1 MiB", "throughput", "MiB/s", "higher", "proxy", 5.0)
    md = render_markdown(res)
    assert "n/a (peer runs on rclone-dir only)" in md
    assert "0.50x" in md


async def test_relay_counts_bytes(aiohttp_server: Any, tmp_path: Path) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=b"z" * 5000)

    app = web.Application()
    app.router.add_get("/", handler)
    upstream = await aiohttp_server(app, host="127.0.0.1")
    import aiohttp

    async with counting_relay(tmp_path, "test", upstream.port) as relay:
        assert relay.relay_stats_url is not None
        before = await relay_from_upstream(relay.relay_stats_url)
        async with aiohttp.ClientSession() as s, s.get(relay.url + "/") as r:
            assert len(await r.read()) == 5000
        after = await relay_from_upstream(relay.relay_stats_url)
    assert after - before >= 5000


def test_smoke_direct_and_peer(tmp_path: Path) -> None:
    doc, md = _run_harness(tmp_path / "out", "--targets", "direct,peer")
    assert doc["errors"] == []
    dir_rows = _rows(doc, "rclone-dir")
    _check_target(dir_rows, "direct")
    _check_target(dir_rows, "peer")
    moto_rows = _rows(doc, "moto")
    _check_target(moto_rows, "direct")
    assert all(r["targets"]["peer"] is None for r in moto_rows.values())
    assert "## Backend: rclone-dir" in md and "## Backend: moto" in md
    assert "| large PUT | 1 MiB | throughput (MiB/s) ↑ |" in md
    assert "n/a (peer runs on rclone-dir only)" in md


def test_smoke_proxy(tmp_path: Path) -> None:
    """The proxy at --workers 1 and at two workers, every scenario, both backends."""
    pytest.importorskip("proxy.app")
    doc, md = _run_harness(
        tmp_path / "out", "--targets", "direct,proxy,proxy-default,peer", "--proxy-workers", "2"
    )
    assert doc["errors"] == [], doc["errors"]
    for backend in ("rclone-dir", "moto"):
        rows = _rows(doc, backend)
        _check_target(rows, "proxy")
        _check_target(rows, "proxy-default")
        procs = rows[("process", "whole run", "processes")]["targets"]
        # w=2: the parent and two workers (and multiprocessing's resource tracker) are sampled.
        assert procs["proxy"]["min"] == 1 and procs["proxy-default"]["min"] >= 3, procs
        default_ratio = rows[("small GET 4 KiB", "c=4", "rate")]["ratios"]["proxy-default/direct"]
        assert default_ratio is not None and default_ratio > 0
        bytes_row = rows[("range GET 1 KiB", "in 256 KiB, c=1", "backend bytes read")]
        assert bytes_row["targets"]["proxy"]["min"] > 0
        kms = [r for k, r in rows.items() if k[0] == "KMS calls"]
        assert kms, "no KMS rows for the proxy"
        assert all(r["targets"]["proxy"]["min"] >= 0 for r in kms)
        ratio = rows[("large PUT", "1 MiB", "throughput")]["ratios"]["proxy/direct"]
        assert ratio is not None and ratio > 0
    peer_ratio = _rows(doc, "rclone-dir")[("large GET", "1 MiB", "throughput")]["ratios"]
    assert peer_ratio["proxy/peer"] is not None and peer_ratio["proxy/peer"] > 0
    assert "| KMS calls |" in md
    assert "| direct | proxy w=1 | proxy w=default | peer |" in md
    assert "w=default = 2" in md
