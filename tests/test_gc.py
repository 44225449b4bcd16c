"""The ``gc`` job: orphaned envelopes, state of aborted uploads and job leftovers go; live
state stays; dry run changes nothing; a run is bounded and the next goes on (moto, rclone)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from proxy.control.activation import ACTIVATION_PREFIX
from proxy.control.jobs.common import TMP_PREFIX
from proxy.layer.envelopes import KEY_FIELD, sidecar_prefix
from proxy.layer.multipart import STATE_PREFIX
from proxy.wire.reserved import RESERVED_PREFIX
from tests.servers import ProxyThread, Server, proxy_config
from tests.test_jobs import _write_config, new_bucket, run, with_store


def _reserved(direct: Any, bucket: str) -> list[str]:
    """Reserved keys but the activation records (``gc`` keeps those, as it must)."""
    res = direct.list_objects_v2(Bucket=bucket, Prefix=RESERVED_PREFIX)
    keys = (o["Key"] for o in res.get("Contents", []))
    return sorted(k for k in keys if not k.startswith(ACTIVATION_PREFIX))


def _plain(backend: Server, keyfile: Path, **kw: Any) -> Any:
    """A config that encrypts nothing: no activation records in the buckets."""
    return proxy_config(backend.url, keyfile, encryption={"default": "passthrough"}, **kw)


def _litter(config: Any, direct: Any, bucket: str) -> dict[str, str]:
    """Live objects through a proxy, then leftovers a crash or a bypass would leave."""
    with ProxyThread(config) as p:
        c = p.client()
        c.put_object(Bucket=bucket, Key="live", Body=b"l" * 70_000)
        c.put_object(Bucket=bucket, Key="gone", Body=b"g" * 70_000)
        live_up = c.create_multipart_upload(Bucket=bucket, Key="up")["UploadId"]
        dead_up = c.create_multipart_upload(Bucket=bucket, Key="up2")["UploadId"]
    gone_etag = direct.head_object(Bucket=bucket, Key="gone")["ETag"].strip('"')
    direct.delete_object(Bucket=bucket, Key="gone")  # behind the proxy's back
    direct.abort_multipart_upload(Bucket=bucket, Key="up2", UploadId=dead_up)
    direct.put_object(Bucket=bucket, Key=TMP_PREFIX + "0123", Body=b"x")
    # an envelope of a version overwritten while the proxy could not clean up
    stale = sidecar_prefix("live") + "0" * 32
    direct.put_object(Bucket=bucket, Key=stale, Body=json.dumps({KEY_FIELD: "live"}).encode())
    return {
        "gone": sidecar_prefix("gone") + gone_etag,
        "stale": stale,
        "dead_up": STATE_PREFIX + dead_up,
        "live_up": STATE_PREFIX + live_up,
        "tmp": TMP_PREFIX + "0123",
    }


def test_gc_removes_orphans_and_keeps_live_state(
    backend: Server, direct: Any, keyfile: Path
) -> None:
    config = with_store(proxy_config(backend.url, keyfile), "sidecar")
    bucket = new_bucket(direct, "gc")
    names = _litter(config, direct, bucket)
    before = _reserved(direct, bucket)
    assert set(names.values()) <= set(before)

    young = run(config, "gc", bucket, min_age=3600)
    assert set(young.outcomes) == {"young"}, young.to_json()

    dry = run(config, "gc", bucket, min_age=0, dry_run=True)
    assert dry.outcomes["would-remove-envelope"] == 2, dry.summary()
    assert dry.outcomes["would-remove-upload-state"] == 1
    assert dry.outcomes["would-remove-job-tmp"] == 1
    assert _reserved(direct, bucket) == before

    done = run(config, "gc", bucket, min_age=0)
    assert done.outcomes["removed-envelope"] == 2, done.to_json()
    assert done.outcomes["removed-upload-state"] == 1
    assert done.outcomes["removed-job-tmp"] == 1
    assert done.outcomes["envelope-live"] == 1 and done.outcomes["upload-live"] == 1
    left = _reserved(direct, bucket)
    assert names["live_up"] in left
    assert not {names[k] for k in ("gone", "stale", "dead_up", "tmp")} & set(left)
    with ProxyThread(config) as p:
        assert p.client().get_object(Bucket=bucket, Key="live")["Body"].read() == b"l" * 70_000


def test_gc_is_bounded_and_goes_on(backend: Server, direct: Any, keyfile: Path) -> None:
    config = with_store(_plain(backend, keyfile), "sidecar")
    bucket = new_bucket(direct, "gcb")
    for i in range(5):
        direct.put_object(Bucket=bucket, Key=f"{TMP_PREFIX}{i}", Body=b"")
    first = run(config, "gc", bucket, min_age=0, limit=2)
    assert first.objects == 2 and first.last_key == TMP_PREFIX + "1"
    rest = run(config, "gc", bucket, min_age=0, start_after=first.last_key)
    assert rest.outcomes["removed-job-tmp"] == 3 and rest.last_key == ""
    assert _reserved(direct, bucket) == []


def test_cli_gc_dry_run(backend: Server, direct: Any, keyfile: Path, tmp_path: Path) -> None:
    bucket = new_bucket(direct, "gccli")
    direct.put_object(Bucket=bucket, Key=TMP_PREFIX + "left", Body=b"")
    cfg = _write_config(_plain(backend, keyfile), tmp_path / "c.yaml")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy.cli",
            "job",
            "gc",
            "--config",
            str(cfg),
            "--bucket",
            bucket,
            "--dry-run",
            "--min-age",
            "0",
            "--no-progress",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    report = json.loads(out)  # --json prints the summary as JSON only
    assert report["dry_run"] and report["objects"] == 1
    assert report["outcomes"]["would-remove-job-tmp"] == 1
    assert _reserved(direct, bucket) == [TMP_PREFIX + "left"]


def test_the_proxys_own_gc_covers_every_bucket_bounded(
    backend: Server, direct: Any, keyfile: Path
) -> None:
    from proxy.config import Gc
    from proxy.control.jobs.gc import GcRunner

    buckets = [new_bucket(direct, "gcrun") for _ in range(2)]
    for b in buckets:
        for i in range(3):
            direct.put_object(Bucket=b, Key=f"{TMP_PREFIX}{i}", Body=b"")
    config = _plain(backend, keyfile, gc={"interval": 0, "max_objects": 2, "min_age": 0})
    with ProxyThread(config) as p:
        assert p.proxy is not None
        runner = GcRunner(p.proxy.jobs, Gc(interval=0, max_objects=2, min_age=0))
        first = p.call(runner.run_once())
        assert all(_reserved(direct, b) == [TMP_PREFIX + "2"] for b in buckets)
        assert {pr.options.bucket for pr in first} >= set(buckets)
        p.call(runner.run_once())
    assert all(_reserved(direct, b) == [] for b in buckets)
