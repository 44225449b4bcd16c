"""``cmek-proxy job`` as an operator runs it: progress bar, Ctrl-C, --json, --dry-run."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.cli import EXIT_INTERRUPTED
from proxy.config import Config
from proxy.control.jobs.progress import Bar, human_bytes
from tests.servers import (
    BACKEND_AK,
    BACKEND_SK,
    ProxyThread,
    Server,
    new_keyfile,
    proxy_config,
    s3_client,
    wait_until,
)


@pytest.fixture(scope="module")
def direct(moto: Server) -> Any:
    return s3_client(moto.url, BACKEND_AK, BACKEND_SK)


@pytest.fixture
def config(moto: Server, tmp_path: Path) -> Config:
    return proxy_config(
        moto.url,
        new_keyfile(tmp_path / "k.json"),
        audit={"path": str(tmp_path / "audit.jsonl")},
    )


def _bucket(direct: Any, name: str) -> str:
    bucket = f"{name}-{time.monotonic_ns()}"
    direct.create_bucket(Bucket=bucket)
    return bucket


def _cfg(config: Config, tmp_path: Path) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
    return str(path)


def _job(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "job", *args],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def _audit(config: Config) -> list[dict[str, Any]]:
    path = config.audit_path()
    assert path is not None
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_human_bytes() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(5 * 1024**3) == "5.0 GiB"
    assert human_bytes(3 * 1024**6) == "3072.0 PiB"


def test_bar_never_shows_more_than_the_total() -> None:
    """The counting listing and the job's listing race; objects may come and go between."""
    out = io.StringIO()
    bar = Bar("verify", out)
    bar.update(100, 0)  # done before the counter saw anything
    bar.listed(1000)
    bar.update(2000, 1)
    bar.counted()  # the counter saw fewer objects than the job is doing
    bar.update(3000, 1)
    bar.close()
    final = out.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert "100%" in final and "3/3 objects" in final and "1 errors" in final, final


def test_progress_bar_shows_total_percentage_and_human_bytes(
    config: Config, direct: Any, tmp_path: Path
) -> None:
    bucket = _bucket(direct, "bar")
    with ProxyThread(config) as p:
        c = p.client()
        for i in range(5):
            c.put_object(Bucket=bucket, Key=f"o/{i}", Body=os.urandom(300_000))
    res = _job("verify", "--config", _cfg(config, tmp_path), "--bucket", bucket)
    assert res.returncode == 0, res.stderr
    final = res.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert "100%" in final and "5/5 objects" in final, res.stderr
    assert "1.4 MiB of 1.4 MiB" in final, final  # read of listed (stored) bytes
    assert "<00:00" in final, final  # tqdm's ETA field, run out at the end
    assert "e+" not in res.stderr, "no scientific notation"
    assert "1.4 MiB read" in res.stdout


def test_json_prints_json_only(config: Config, direct: Any, tmp_path: Path) -> None:
    bucket = _bucket(direct, "json")
    direct.put_object(Bucket=bucket, Key="plain", Body=b"as sent")
    res = _job("verify", "--config", _cfg(config, tmp_path), "--bucket", bucket, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)  # the whole of stdout is one JSON document
    assert out["objects"] == 1 and out["interrupted"] is False
    assert res.stderr == "", "no progress bar either"


def test_dry_runs_read_no_object_body(config: Config, direct: Any, tmp_path: Path) -> None:
    bucket = _bucket(direct, "dry")
    with ProxyThread(config) as p:
        p.client().put_object(Bucket=bucket, Key="enc", Body=os.urandom(100_000))
    stored = direct.get_object(Bucket=bucket, Key="enc")
    body = bytearray(stored["Body"].read())
    body[1000] ^= 1  # damaged: a read of the body would find it
    direct.put_object(Bucket=bucket, Key="enc", Body=bytes(body), Metadata=stored["Metadata"])
    direct.put_object(Bucket=bucket, Key="plain", Body=b"x" * 5000)
    cfg = _cfg(config, tmp_path)

    dry = _job("verify", "--config", cfg, "--bucket", bucket, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    out = json.loads(dry.stdout)
    assert out["outcomes"] == {"would-verify": 2}
    assert out["bytes"] == 0 and out["planned_bytes"] == len(body) + 5000

    dry = _job("encrypt-existing", "--config", cfg, "--bucket", bucket, "--dry-run", "--json")
    out = json.loads(dry.stdout)
    assert out["outcomes"] == {"already": 1, "would-encrypt": 1}, out
    assert out["bytes"] == 0 and out["planned_bytes"] == 5000

    real = _job("verify", "--config", cfg, "--bucket", bucket, "--json")
    assert real.returncode == 1  # a real run reads the body and finds the damage
    assert json.loads(real.stdout)["outcomes"]["error"] == 1


@pytest.fixture
def many_plain(direct: Any) -> Iterator[str]:
    bucket = _bucket(direct, "sigint")
    for i in range(60):
        direct.put_object(Bucket=bucket, Key=f"data/{i:03}", Body=os.urandom(500_000))
    yield bucket


def test_ctrl_c_prints_partial_summary_and_how_to_resume(
    config: Config, direct: Any, tmp_path: Path, many_plain: str
) -> None:
    bucket = many_plain
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy.cli",
            "job",
            "encrypt-existing",
            "--config",
            _cfg(config, tmp_path),
            "--bucket",
            bucket,
            "--concurrency",
            "1",
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:

        def one_done() -> bool:  # the second written: the first is counted (one at a time)
            meta = direct.head_object(Bucket=bucket, Key="data/001")["Metadata"]
            return any(k.startswith("cmek-") for k in meta)

        wait_until(one_done, 120, "two objects encrypted")
        assert proc.poll() is None, "the job finished before Ctrl-C"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err, err
    assert f"encrypt-existing s3://{bucket}/: " in out  # the partial summary
    assert "encrypted: " in out
    assert "interrupted after" in err and "run the same command again" in err, err
    last = _audit(config)[-1]
    assert last["event"] == "job.interrupted", last
    assert 1 <= last["objects"] < 60
    assert last["outcomes"].get("encrypted", 0) >= 1

    again = _job(
        "encrypt-existing",
        "--config",
        _cfg(config, tmp_path),
        "--bucket",
        bucket,
        "--json",
        "--concurrency",
        "8",
    )
    out2 = json.loads(again.stdout)
    assert out2["outcomes"]["already"] >= 1
    assert out2["outcomes"]["already"] + out2["outcomes"]["encrypted"] == 60, out2
    assert _audit(config)[-1]["event"] == "job.finished"


def test_a_job_in_the_proxy_is_recorded_interrupted_when_the_proxy_stops(
    moto: Server, direct: Any, tmp_path: Path, many_plain: str
) -> None:
    bucket = many_plain
    token = "admin-token-" + os.urandom(8).hex()
    config = proxy_config(
        moto.url,
        new_keyfile(tmp_path / "k.json"),
        admin={"host": "127.0.0.1", "port": 0, "token": token},
        audit={"path": str(tmp_path / "audit.jsonl")},
    )
    with ProxyThread(config) as p:
        req = urllib.request.Request(
            f"{p.admin}/v1/buckets/{bucket}/jobs",
            data=json.dumps({"job": "encrypt-existing", "concurrency": 1}).encode(),
            method="POST",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200

        def two_done() -> bool:
            meta = direct.head_object(Bucket=bucket, Key="data/001")["Metadata"]
            return any(k.startswith("cmek-") for k in meta)

        wait_until(two_done, 120, "two objects encrypted")
    events = [e for e in _audit(config) if e["event"].startswith("job.")]
    assert [e["event"] for e in events] == ["job.started", "job.interrupted"], events
    assert 1 <= events[-1]["objects"] < 60
