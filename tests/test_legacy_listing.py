"""Honest listings for data that was there before a config spec turned encryption on: the
spec's activation is recorded in the bucket's reserved state, so LIST size equals HEAD size,
and a plain `aws s3 sync` run twice copies nothing the second time (moto and rclone)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from proxy.control.activation import record_key
from tests.servers import (
    CLIENT_AK,
    CLIENT_SK,
    REGION,
    ProxyThread,
    Server,
    envelope_store,
    proxy_config,
    wait_until,
)
from tests.test_jobs import new_bucket

LEGACY = {f"old/{i}.bin": bytes([i]) * 1000 for i in range(3)} | {"top.txt": b"t" * 1000}


def _after_the_legacy_second(direct: Any, bucket: str) -> None:
    """Let the backend's whole-second clock move past the legacy objects' LastModified."""
    newest = max(direct.head_object(Bucket=bucket, Key=k)["LastModified"] for k in LEGACY)

    def later() -> bool:
        direct.put_object(Bucket=bucket, Key="probe", Body=b"")
        return bool(direct.head_object(Bucket=bucket, Key="probe")["LastModified"] > newest)

    wait_until(later, 10, "the backend clock to pass a second")
    direct.delete_object(Bucket=bucket, Key="probe")


def _sync(proxy: ProxyThread, home: Path, src: str, dst: str) -> str:
    aws = shutil.which("aws")
    assert aws is not None
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        "HOME": str(home),
        "AWS_ACCESS_KEY_ID": CLIENT_AK,
        "AWS_SECRET_ACCESS_KEY": CLIENT_SK,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }
    done = subprocess.run(
        [aws, "--endpoint-url", proxy.endpoint, "s3", "sync", "--no-progress", src, dst],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("rule", ["bucket-spec", "default-key"])
def test_config_spec_turned_on_late_lists_legacy_sizes(
    backend: Server, direct: Any, keyfile: Path, tmp_path: Path, rule: str
) -> None:
    bucket = new_bucket(direct, "late")
    for k, v in LEGACY.items():
        direct.put_object(Bucket=bucket, Key=k, Body=v)
    _after_the_legacy_second(direct, bucket)
    config = proxy_config(
        backend.url,
        keyfile,
        envelope_store=envelope_store(backend),
        encryption=(
            {"default": "refuse", "buckets": {bucket: {"key": f"local://{keyfile}"}}}
            if rule == "bucket-spec"
            else {"default": {"key": f"local://{keyfile}"}}
        ),
    )
    name = bucket if rule == "bucket-spec" else "default"
    with ProxyThread(config) as p:
        c = p.client()
        c.put_object(Bucket=bucket, Key="new.bin", Body=b"n" * 1000)
        listed = {o["Key"]: o["Size"] for o in c.list_objects_v2(Bucket=bucket)["Contents"]}
        assert listed == {**{k: 1000 for k in LEGACY}, "new.bin": 1000}
        for k in listed:
            assert c.head_object(Bucket=bucket, Key=k)["ContentLength"] == 1000
            assert len(c.get_object(Bucket=bucket, Key=k)["Body"].read()) == 1000
        assert "ServerSideEncryption" in c.head_object(Bucket=bucket, Key="new.bin")
        assert "ServerSideEncryption" not in c.head_object(Bucket=bucket, Key="top.txt")

        down = tmp_path / "down"
        first = _sync(p, tmp_path, f"s3://{bucket}", str(down))
        assert first.count("download:") == len(LEGACY) + 1
        assert _sync(p, tmp_path, f"s3://{bucket}", str(down)) == ""
        assert _sync(p, tmp_path, str(down), f"s3://{bucket}") == ""
    record = direct.head_object(Bucket=bucket, Key=record_key(name))["LastModified"]

    with ProxyThread(config) as p:  # a restart reads the same activation
        c = p.client()
        listed = {o["Key"]: o["Size"] for o in c.list_objects_v2(Bucket=bucket)["Contents"]}
        assert set(listed.values()) == {1000}
    assert direct.head_object(Bucket=bucket, Key=record_key(name))["LastModified"] == record


def test_objects_encrypted_before_any_record_stay_encrypted_in_listings(
    backend: Server, direct: Any, keyfile: Path, client: Any, proxy: ProxyThread
) -> None:
    """A bucket written by a proxy that recorded nothing (an earlier version; here the session
    proxy, started before the bucket existed): a new start must not call its encrypted
    objects legacy just because they are older than a fresh record."""
    import json

    bucket = new_bucket(direct, "upgraded")
    client.put_object(Bucket=bucket, Key="enc.bin", Body=b"e" * 1000)
    _after_the_legacy_second_of(direct, bucket, "enc.bin")
    with ProxyThread(proxy.config) as p:
        listed = p.client().list_objects_v2(Bucket=bucket)["Contents"]
        assert [(o["Key"], o["Size"]) for o in listed] == [("enc.bin", 1000)]
    record = direct.get_object(Bucket=bucket, Key=record_key("default"))["Body"].read()
    assert json.loads(record)["known"] is False


def _after_the_legacy_second_of(direct: Any, bucket: str, key: str) -> None:
    newest = direct.head_object(Bucket=bucket, Key=key)["LastModified"]

    def later() -> bool:
        direct.put_object(Bucket=bucket, Key="probe", Body=b"")
        return bool(direct.head_object(Bucket=bucket, Key="probe")["LastModified"] > newest)

    wait_until(later, 10, "the backend clock to pass a second")
    direct.delete_object(Bucket=bucket, Key="probe")
