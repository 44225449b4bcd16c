"""The AWS CLI v2 (Debian's ``awscli`` at /usr/bin/aws) through the proxy.

Default settings; the endpoint comes from ``--endpoint-url`` and the credentials from the
environment, with no configuration file and a private HOME.  Uploads above 8 MiB are
multipart (the CLI's default threshold); downloads above 8 MiB are concurrent ranged GETs.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from proxy import crypto
from tests.servers import CLIENT_AK, CLIENT_SK, REGION, ProxyThread

AWS = Path("/usr/bin/aws")
MiB = 1024 * 1024
pytestmark = pytest.mark.skipif(
    not AWS.exists(), reason="AWS CLI v2 not installed at /usr/bin/aws (apt-get install awscli)"
)


def _data(n: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(f"awscli-{n}-{seed}".encode()).digest(n)


def aws(proxy: ProxyThread, home: Path, *args: str) -> str:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "AWS_ACCESS_KEY_ID": CLIENT_AK,
        "AWS_SECRET_ACCESS_KEY": CLIENT_SK,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_PAGER": "",
    }
    done = subprocess.run(
        [str(AWS), "--endpoint-url", proxy.endpoint, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"aws {' '.join(args)} -> {done.returncode}\n{done.stderr}"
    return done.stdout


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


def test_version_is_v2(home: Path, proxy: ProxyThread) -> None:
    out = subprocess.run(
        [str(AWS), "--version"], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.startswith("aws-cli/2."), out.stdout


def test_cp_single_part_both_ways(
    proxy: ProxyThread, home: Path, client: Any, direct: Any, bucket: str, tmp_path: Path
) -> None:
    data = _data(3 * MiB + 5)
    src = tmp_path / "small.bin"
    src.write_bytes(data)
    aws(proxy, home, "s3", "cp", str(src), f"s3://{bucket}/cli/small.bin")
    stored = direct.get_object(Bucket=bucket, Key="cli/small.bin")["Body"].read()
    assert len(stored) == crypto.ciphertext_size(len(data)) and data[:32] not in stored
    head = client.head_object(Bucket=bucket, Key="cli/small.bin")
    assert head["ContentLength"] == len(data) and head["ServerSideEncryption"] == "aws:kms"
    back = tmp_path / "small.out"
    aws(proxy, home, "s3", "cp", f"s3://{bucket}/cli/small.bin", str(back))
    assert back.read_bytes() == data


def test_cp_download_50mib(
    proxy: ProxyThread, home: Path, client: Any, direct: Any, bucket: str, tmp_path: Path
) -> None:
    """A single-part 50 MiB object, fetched by the CLI in concurrent 8 MiB ranges."""
    data = _data(50 * MiB, 1)
    client.put_object(Bucket=bucket, Key="big", Body=data)
    stored_size = direct.head_object(Bucket=bucket, Key="big")["ContentLength"]
    assert stored_size == crypto.ciphertext_size(len(data))
    out = tmp_path / "big.out"
    aws(proxy, home, "s3", "cp", f"s3://{bucket}/big", str(out))
    assert out.read_bytes() == data


def test_cp_upload_50mib(
    proxy: ProxyThread, home: Path, client: Any, direct: Any, bucket: str, tmp_path: Path
) -> None:
    """A 50 MiB file uploaded by the CLI as a multipart upload, and downloaded again."""
    data = _data(50 * MiB, 2)
    src = tmp_path / "big.in"
    src.write_bytes(data)
    aws(proxy, home, "s3", "cp", str(src), f"s3://{bucket}/big")
    head = client.head_object(Bucket=bucket, Key="big")
    assert head["ContentLength"] == len(data) and head["ServerSideEncryption"] == "aws:kms"
    stored = direct.get_object(Bucket=bucket, Key="big")["Body"].read(1 * MiB)
    assert data[:32] not in stored
    out = tmp_path / "big.out"
    aws(proxy, home, "s3", "cp", f"s3://{bucket}/big", str(out))
    assert out.read_bytes() == data


def _tree(root: Path) -> dict[str, bytes]:
    files = {
        "a.txt": b"alpha\n",
        "empty": b"",
        "sub/b.bin": _data(70_000, 3),
        "sub/deeper/c.bin": _data(1 * MiB + 1, 4),
        "sub/deeper/space name.txt": b"spaces\n",
    }
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
    return files


_UPLOAD = re.compile(r"^upload: (.+) to s3://[^/]+/(.+)$")
_DOWNLOAD = re.compile(r"^download: s3://[^/]+/(.+) to (.+)$")
_LS = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\s+(\d+) (.+)$")
_DELETE = re.compile(r"^delete: s3://[^/]+/(.+)$")


def _lines(out: str, pattern: re.Pattern[str]) -> list[re.Match[str]]:
    return [m for line in out.splitlines() if (m := pattern.match(line.strip("\r")))]


def test_sync_ls_rm(
    proxy: ProxyThread, home: Path, client: Any, direct: Any, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    files = _tree(src)
    # sync re-uploads a file whose mtime is newer than the object's LastModified; a file
    # written in the same second as its upload (LastModified has whole seconds on some
    # backends) would look newer, so date the sources a minute back, as real files are.
    past = time.time() - 60
    for rel in files:
        os.utime(src / rel, (past, past))
    dest = f"s3://{bucket}/synced"

    first = aws(proxy, home, "s3", "sync", str(src), dest, "--no-progress")
    uploaded = sorted(m.group(2) for m in _lines(first, _UPLOAD))
    assert uploaded == sorted(f"synced/{k}" for k in files)
    second = aws(proxy, home, "s3", "sync", str(src), dest, "--no-progress")
    assert second.strip() == "", second

    listing = aws(proxy, home, "s3", "ls", "--recursive", f"{dest}/")
    sizes = {m.group(2): int(m.group(1)) for m in _lines(listing, _LS)}
    assert sizes == {f"synced/{k}": len(v) for k, v in files.items()}
    top = aws(proxy, home, "s3", "ls", f"{dest}/")
    assert "PRE sub/" in top and re.search(r"\s6 a\.txt$", top, re.M), top

    for rel, content in files.items():
        stored = direct.get_object(Bucket=bucket, Key=f"synced/{rel}")["Body"].read()
        assert len(stored) == crypto.ciphertext_size(len(content))
        if len(content) >= 32:
            assert content[:32] not in stored

    down = tmp_path / "down"
    got = aws(proxy, home, "s3", "sync", dest, str(down), "--no-progress")
    assert len(_lines(got, _DOWNLOAD)) == len(files)
    for rel, content in files.items():
        assert (down / rel).read_bytes() == content
    again = aws(proxy, home, "s3", "sync", dest, str(down), "--no-progress")
    assert again.strip() == "", again

    removed = aws(proxy, home, "s3", "rm", "--recursive", f"{dest}/")
    assert sorted(m.group(1) for m in _lines(removed, _DELETE)) == sorted(
        f"synced/{k}" for k in files
    )
    assert client.list_objects_v2(Bucket=bucket).get("Contents", []) == []
    assert direct.list_objects_v2(Bucket=bucket).get("Contents", []) == []
