"""Each client's "delete everything, then the bucket" against `cmek-proxy dev` (sidecar
envelopes on `rclone serve s3`): the proxy's own state must never make DeleteBucket answer
BucketNotEmpty once the client's objects are gone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config as BotoConfig

from proxy.control.jobs.common import TMP_PREFIX
from tests.servers import free_port, rclone_binary, s3_client
from tests.test_devmode import _env, _start, _stop


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], Path]]:
    data_dir = tmp_path_factory.mktemp("devclients") / "dev"
    proc = _start(data_dir, free_port())
    try:
        yield _env(data_dir), data_dir
    finally:
        _stop(proc)


def _boto(env: dict[str, str]) -> Any:
    return boto3.resource(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
        config=BotoConfig(s3={"addressing_style": "path"}),
    )


def _fill(env: dict[str, str], bucket: str, data_dir: Path) -> None:
    """Single-part and multipart objects, an overwrite, a copy, an aborted upload, and the
    marker an encrypt-existing job used to leave behind."""
    s3 = _boto(env)
    b = s3.create_bucket(Bucket=bucket)
    for i in range(4):
        b.put_object(Key=f"dir/{i}.bin", Body=os.urandom(70_000 + i))
    b.put_object(Key="dir/0.bin", Body=b"overwritten")
    c = s3.meta.client
    mp = c.create_multipart_upload(Bucket=bucket, Key="big")
    parts = [
        c.upload_part(
            Bucket=bucket, Key="big", UploadId=mp["UploadId"], PartNumber=n, Body=os.urandom(size)
        )
        for n, size in ((1, 5 * 1024 * 1024), (2, 1000))
    ]
    c.complete_multipart_upload(
        Bucket=bucket,
        Key="big",
        UploadId=mp["UploadId"],
        MultipartUpload={
            "Parts": [{"PartNumber": n + 1, "ETag": p["ETag"]} for n, p in enumerate(parts)]
        },
    )
    gone = c.create_multipart_upload(Bucket=bucket, Key="aborted")
    c.abort_multipart_upload(Bucket=bucket, Key="aborted", UploadId=gone["UploadId"])
    c.copy_object(Bucket=bucket, Key="copy", CopySource={"Bucket": bucket, "Key": "dir/1.bin"})
    _backend(data_dir).put_object(Bucket=bucket, Key=TMP_PREFIX + "keep", Body=b"")


def _backend(data_dir: Path) -> Any:
    """A client of dev mode's own `rclone serve s3` (its address from its command line)."""
    ps = subprocess.run(["pgrep", "-af", f"serve s3 .*{data_dir}"], capture_output=True, text=True)
    addr = ps.stdout.split("--addr", 1)[1].split()[0]
    creds = json.loads((data_dir / "dev-secrets.json").read_text())
    return s3_client(f"http://{addr}", creds["backend_access_key"], creds["backend_secret_key"])


def _gone(env: dict[str, str], data_dir: Path, bucket: str) -> None:
    names = [b.name for b in _boto(env).buckets.all()]
    assert bucket not in names
    assert not (data_dir / "backend" / bucket).exists()


def _aws_env(env: dict[str, str], home: Path) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        **env,
        "AWS_REGION": env["AWS_DEFAULT_REGION"],
        "HOME": str(home),
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }


def _run(cmd: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"{' '.join(cmd[:3])} -> {done.returncode}\n{done.stderr}"
    return done.stdout


def test_aws_cli_rb_force(dev: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    env, data_dir = dev
    _fill(env, "aws-rb", data_dir)
    aws = shutil.which("aws")
    assert aws is not None
    url = ["--endpoint-url", env["AWS_ENDPOINT_URL"]]
    _run([aws, *url, "s3", "rb", "--force", "s3://aws-rb"], _aws_env(env, tmp_path))
    _gone(env, data_dir, "aws-rb")


def test_s5cmd_rm_then_rb(dev: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    env, data_dir = dev
    _fill(env, "s5cmd-rb", data_dir)
    s5 = shutil.which("s5cmd")
    assert s5 is not None
    e = _aws_env(env, tmp_path)
    url = ["--endpoint-url", env["AWS_ENDPOINT_URL"]]
    _run([s5, *url, "rm", "s3://s5cmd-rb/*"], e)
    _run([s5, *url, "rb", "s3://s5cmd-rb"], e)
    _gone(env, data_dir, "s5cmd-rb")


def test_s3cmd_del_recursive_then_rb(dev: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    env, data_dir = dev
    _fill(env, "s3cmd-rb", data_dir)
    s3cmd = shutil.which("s3cmd")
    assert s3cmd is not None
    cfg = tmp_path / "s3cfg"
    cfg.write_text("[default]\n")
    host = env["AWS_ENDPOINT_URL"].removeprefix("http://")
    base = [
        s3cmd,
        "-c",
        str(cfg),
        f"--host={host}",
        f"--host-bucket={host}",
        "--no-ssl",
        f"--access_key={env['AWS_ACCESS_KEY_ID']}",
        f"--secret_key={env['AWS_SECRET_ACCESS_KEY']}",
        f"--region={env['AWS_DEFAULT_REGION']}",
    ]
    e = _aws_env(env, tmp_path)
    _run([*base, "del", "-r", "--force", "s3://s3cmd-rb"], e)
    _run([*base, "rb", "s3://s3cmd-rb"], e)
    _gone(env, data_dir, "s3cmd-rb")


def test_s3fs_rm_recursive(dev: tuple[dict[str, str], Path]) -> None:
    import s3fs

    env, data_dir = dev
    _fill(env, "s3fs-rb", data_dir)
    fs = s3fs.S3FileSystem(
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=env["AWS_ENDPOINT_URL"],
        client_kwargs={"region_name": env["AWS_DEFAULT_REGION"]},
        skip_instance_cache=True,
    )
    fs.rm("s3fs-rb", recursive=True)
    if fs.exists("s3fs-rb"):
        fs.rmdir("s3fs-rb")
    _gone(env, data_dir, "s3fs-rb")


def test_rclone_purge(dev: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    env, data_dir = dev
    _fill(env, "rclone-rb", data_dir)
    e = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "RCLONE_CONFIG": "/dev/null",
        "RCLONE_CONFIG_P_TYPE": "s3",
        "RCLONE_CONFIG_P_PROVIDER": "Other",
        "RCLONE_CONFIG_P_ENDPOINT": env["AWS_ENDPOINT_URL"],
        "RCLONE_CONFIG_P_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"],
        "RCLONE_CONFIG_P_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"],
        "RCLONE_CONFIG_P_REGION": env["AWS_DEFAULT_REGION"],
    }
    _run([rclone_binary(), "purge", "p:rclone-rb"], e)
    _gone(env, data_dir, "rclone-rb")


def test_boto3_delete_all_then_bucket(dev: tuple[dict[str, str], Path]) -> None:
    env, data_dir = dev
    _fill(env, "boto-rb", data_dir)
    bucket = _boto(env).Bucket("boto-rb")
    bucket.objects.all().delete()
    bucket.delete()
    _gone(env, data_dir, "boto-rb")
