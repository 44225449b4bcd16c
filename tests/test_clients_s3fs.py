"""s3fs / fsspec through the proxy: writes, seeks, partial reads, listings.

``client_kwargs={"endpoint_url": ...}`` is s3fs's documented way to name an endpoint;
everything else is default (5 MiB write blocks: larger files are multipart uploads).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
import s3fs

from proxy import crypto
from tests.servers import CLIENT_AK, CLIENT_SK, REGION, ProxyThread

MiB = 1024 * 1024
S = crypto.SEGMENT_SIZE


def _data(n: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(f"s3fs-{n}-{seed}".encode()).digest(n)


@pytest.fixture
def fs(proxy: ProxyThread) -> Iterator[Any]:
    filesystem = s3fs.S3FileSystem(
        key=CLIENT_AK,
        secret=CLIENT_SK,
        client_kwargs={"endpoint_url": proxy.endpoint, "region_name": REGION},
        skip_instance_cache=True,
    )
    yield filesystem
    filesystem.clear_instance_cache()


def test_write_read_seek(fs: Any, direct: Any, bucket: str) -> None:
    data = _data(3 * S + 1234)
    with fs.open(f"{bucket}/dir/f.bin", "wb") as f:
        for i in range(0, len(data), 10_000):
            f.write(data[i : i + 10_000])
    stored = direct.get_object(Bucket=bucket, Key="dir/f.bin")["Body"].read()
    assert len(stored) == crypto.ciphertext_size(len(data)) and data[:32] not in stored

    with fs.open(f"{bucket}/dir/f.bin", "rb", block_size=S // 2) as f:
        assert f.size == len(data)
        assert f.read(100) == data[:100]
        f.seek(S - 10)
        assert f.read(20) == data[S - 10 : S + 10]
        f.seek(-5, 2)
        assert f.read() == data[-5:]
        f.seek(2 * S + 7)
        assert f.tell() == 2 * S + 7
        assert f.read(S) == data[2 * S + 7 : 3 * S + 7]
        f.seek(10)
        assert f.read(0) == b""
        assert f.read(1) == data[10:11]
    assert fs.cat_file(f"{bucket}/dir/f.bin") == data


def test_cat_file_ranges(fs: Any, bucket: str) -> None:
    data = _data(200_000, 1)
    fs.pipe_file(f"{bucket}/r.bin", data)
    path = f"{bucket}/r.bin"
    for start, end in ((0, 1), (65535, 65537), (100, None), (None, 10), (-100, None)):
        assert fs.cat_file(path, start=start, end=end) == data[start:end], (start, end)
    assert fs.read_block(path, 70_000, 1000) == data[70_000:71_000]


def test_ls_info_sizes(fs: Any, direct: Any, bucket: str) -> None:
    sizes = {"a": 0, "b": 1, "sub/c": S + 1, "sub/d": 100_000}
    for name, n in sizes.items():
        fs.pipe_file(f"{bucket}/{name}", _data(n, 2))
    fs.invalidate_cache()
    top = {e["name"]: e for e in fs.ls(bucket, detail=True)}
    assert top[f"{bucket}/a"]["size"] == 0 and top[f"{bucket}/b"]["size"] == 1
    assert top[f"{bucket}/sub"]["type"] == "directory"
    found = {p[len(bucket) + 1 :]: info["size"] for p, info in fs.find(bucket, detail=True).items()}
    assert found == sizes
    assert fs.info(f"{bucket}/sub/c")["size"] == S + 1
    assert fs.du(bucket) == sum(sizes.values())
    stored = direct.head_object(Bucket=bucket, Key="sub/c")["ContentLength"]
    assert stored == crypto.ciphertext_size(S + 1)
    fs.rm(f"{bucket}/sub", recursive=True)
    fs.invalidate_cache()
    assert sorted(fs.ls(bucket)) == [f"{bucket}/a", f"{bucket}/b"]


def test_multipart_write(fs: Any, client: Any, bucket: str) -> None:
    """Above s3fs's 5 MiB block size a write becomes a multipart upload."""
    data = _data(12 * MiB + 5, 3)
    with fs.open(f"{bucket}/big.bin", "wb") as f:
        f.write(data)
    head = client.head_object(Bucket=bucket, Key="big.bin")
    assert head["ContentLength"] == len(data) and head["ServerSideEncryption"] == "aws:kms"
    assert fs.info(f"{bucket}/big.bin")["size"] == len(data)
    assert fs.cat_file(f"{bucket}/big.bin") == data
    assert (
        fs.cat_file(f"{bucket}/big.bin", start=5 * MiB - 3, end=5 * MiB + 3)
        == (data[5 * MiB - 3 : 5 * MiB + 3])
    )
