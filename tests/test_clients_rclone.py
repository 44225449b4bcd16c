"""rclone as a client of the proxy: an S3 remote configured only by environment variables.

What rclone makes of the proxy's ETags: an encrypted object's ETag is the backend's with
``-c`` appended, which is not an MD5, so rclone reports the object's MD5 as unknown
("Dst hash empty - aborting Src hash check" after an upload; ``check`` counts "hashes could
not be checked") and compares sizes (and modification times, kept in ``X-Amz-Meta-Mtime``).
For its own multipart uploads rclone stores the MD5 in ``X-Amz-Meta-Md5chksum`` and uses
that, so those objects are hash-checked for real.

rclone's default ``upload_cutoff`` is 200 MiB: with defaults a 6 MiB file is one PutObject.
The multipart test lowers the cutoff and chunk size to 5 MiB, the documented options.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from proxy import crypto
from tests.servers import CLIENT_AK, CLIENT_SK, REGION, ProxyThread, rclone_binary

MiB = 1024 * 1024


def _data(n: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(f"rclone-{n}-{seed}".encode()).digest(n)


def _env(proxy: ProxyThread, home: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "RCLONE_CONFIG": "/dev/null",
        "RCLONE_CONFIG_P_TYPE": "s3",
        "RCLONE_CONFIG_P_PROVIDER": "Other",
        "RCLONE_CONFIG_P_ENDPOINT": proxy.endpoint,
        "RCLONE_CONFIG_P_ACCESS_KEY_ID": CLIENT_AK,
        "RCLONE_CONFIG_P_SECRET_ACCESS_KEY": CLIENT_SK,
        "RCLONE_CONFIG_P_REGION": REGION,
    }


def rclone(proxy: ProxyThread, home: Path, *args: str, ok: bool = True) -> str:
    """Run rclone against remote ``p:``; returns its log (stderr) and output together."""
    done = subprocess.run(
        [rclone_binary(), *args],
        env=_env(proxy, home),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if ok:
        assert done.returncode == 0, f"rclone {' '.join(args)} -> {done.returncode}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


def _tree(root: Path, big: int) -> dict[str, bytes]:
    files = {
        "a.txt": b"alpha\n",
        "empty": b"",
        "sub/b.bin": _data(70_000, 1),
        "sub/big.bin": _data(big, 2),
    }
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
    return files


def _listed_sizes(proxy: ProxyThread, home: Path, remote: str) -> dict[str, int]:
    out = rclone(proxy, home, "lsjson", "-R", "--files-only", remote)
    return {e["Path"]: e["Size"] for e in json.loads(out)}


def test_copy_check_sync(
    proxy: ProxyThread, home: Path, client: Any, direct: Any, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    files = _tree(src, 6 * MiB + 3)
    remote = f"p:{bucket}/dir"

    log = rclone(proxy, home, "copy", str(src), remote, "-v")
    assert log.count("Copied (new)") == len(files), log
    assert "corrupted" not in log.lower()

    assert _listed_sizes(proxy, home, remote) == {k: len(v) for k, v in files.items()}
    for rel, content in files.items():
        stored = direct.get_object(Bucket=bucket, Key=f"dir/{rel}")["Body"].read()
        assert len(stored) == crypto.ciphertext_size(len(content))
        if content:
            assert content[:32] not in stored
        head = client.head_object(Bucket=bucket, Key=f"dir/{rel}")
        assert head["ETag"].endswith('-c"') and head["ContentLength"] == len(content)

    check = rclone(proxy, home, "check", str(src), remote)
    assert "0 differences found" in check and f"{len(files)} matching files" in check, check
    assert f"{len(files)} hashes could not be checked" in check, check
    full = rclone(proxy, home, "check", "--download", str(src), remote)
    assert "0 differences found" in full, full

    again = rclone(proxy, home, "sync", str(src), remote, "-v")
    assert "There was nothing to transfer" in again, again
    assert "Copied" not in again
    dry = rclone(proxy, home, "sync", str(src), remote, "--dry-run", "-v")
    assert "Skipped" not in dry and "There was nothing to transfer" in dry, dry

    down = tmp_path / "down"
    rclone(proxy, home, "copy", remote, str(down))
    for rel, content in files.items():
        assert (down / rel).read_bytes() == content


def test_cat_ranges(proxy: ProxyThread, home: Path, client: Any, bucket: str) -> None:
    data = _data(300_000, 3)
    client.put_object(Bucket=bucket, Key="r.bin", Body=data)
    for offset, count in ((0, 10), (65530, 16), (299_990, 100)):
        out = subprocess.run(
            [
                rclone_binary(),
                "cat",
                f"p:{bucket}/r.bin",
                "--offset",
                str(offset),
                "--count",
                str(count),
            ],
            env=_env(proxy, home),
            capture_output=True,
            timeout=120,
            check=True,
        )
        assert out.stdout == data[offset : offset + count]


def test_multipart_copy_check_sync(
    proxy: ProxyThread, home: Path, client: Any, direct: Any, bucket: str, tmp_path: Path
) -> None:
    """rclone's own multipart upload (cutoff lowered to 5 MiB): MD5 kept in metadata."""
    src = tmp_path / "src"
    files = _tree(src, 11 * MiB + 7)
    remote = f"p:{bucket}/mp"
    opts = ("--s3-upload-cutoff", "5Mi", "--s3-chunk-size", "5Mi")
    log = rclone(proxy, home, "copy", str(src), remote, "-vv", *opts)
    assert log.count("Copied (new)") == len(files), log
    head = client.head_object(Bucket=bucket, Key="mp/sub/big.bin")
    assert head["ContentLength"] == len(files["sub/big.bin"])
    assert head["ServerSideEncryption"] == "aws:kms"
    assert "md5chksum" in head["Metadata"]
    assert _listed_sizes(proxy, home, remote) == {k: len(v) for k, v in files.items()}
    stored = direct.get_object(Bucket=bucket, Key="mp/sub/big.bin")["Body"].read(MiB)
    assert files["sub/big.bin"][:32] not in stored
    check = rclone(proxy, home, "check", str(src), remote)
    assert "0 differences found" in check, check
    full = rclone(proxy, home, "check", "--download", str(src), remote)
    assert "0 differences found" in full, full
    again = rclone(proxy, home, "sync", str(src), remote, "-v", *opts)
    assert "There was nothing to transfer" in again, again
