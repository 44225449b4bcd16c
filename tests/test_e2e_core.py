"""End to end through the proxy with boto3 (default settings) on moto and rclone backends."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
from botocore.exceptions import ClientError

from proxy import crypto

S = crypto.SEGMENT_SIZE
SIZES = [0, 1, S - 1, S, S + 1, 5 * 1024 * 1024]


def _data(n: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(f"{n}-{seed}".encode()).digest(n) if n else b""


def _code(exc: ClientError) -> str:
    return str(exc.response["Error"]["Code"])


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_and_stored_ciphertext(client: Any, direct: Any, bucket: str, size: int) -> None:
    data = _data(size)
    put = client.put_object(Bucket=bucket, Key=f"obj-{size}", Body=data)
    assert put["ServerSideEncryption"] == "aws:kms"
    got = client.get_object(Bucket=bucket, Key=f"obj-{size}")
    assert got["Body"].read() == data
    assert got["ContentLength"] == size
    assert got["ETag"] == put["ETag"]
    assert got["ServerSideEncryption"] == "aws:kms"
    assert got["SSEKMSKeyId"].startswith("local://")
    assert not any(k.startswith("cmek") for k in got["Metadata"])
    head = client.head_object(Bucket=bucket, Key=f"obj-{size}")
    assert head["ContentLength"] == size and head["ETag"] == put["ETag"]
    listed = client.list_objects_v2(Bucket=bucket)["Contents"]
    entry = next(o for o in listed if o["Key"] == f"obj-{size}")
    assert entry["Size"] == size and entry["ETag"] == put["ETag"]
    stored = direct.get_object(Bucket=bucket, Key=f"obj-{size}")["Body"].read()
    assert len(stored) == crypto.ciphertext_size(size)
    if size >= 16:
        assert data[:16] not in stored


def test_range_shapes_at_segment_boundaries(client: Any, bucket: str) -> None:
    size = 3 * S + 100
    data = _data(size, 1)
    client.put_object(Bucket=bucket, Key="r", Body=data)
    cases = [
        (0, 0),
        (0, S - 1),
        (S - 1, S),
        (S, S),
        (S, 2 * S - 1),
        (S - 1, 2 * S + 1),
        (3 * S, size - 1),
        (size - 1, size - 1),
        (10, size + 1000),
    ]
    for a, b in cases:
        got = client.get_object(Bucket=bucket, Key="r", Range=f"bytes={a}-{b}")
        end = min(b, size - 1)
        assert got["Body"].read() == data[a : end + 1], (a, b)
        assert got["ContentRange"] == f"bytes {a}-{end}/{size}"
        assert got["ContentLength"] == end - a + 1
    for a in (0, S, size - 1):
        got = client.get_object(Bucket=bucket, Key="r", Range=f"bytes={a}-")
        assert got["Body"].read() == data[a:]
    for n in (1, 100, S, S + 101, size, size + 5):
        got = client.get_object(Bucket=bucket, Key="r", Range=f"bytes=-{n}")
        assert got["Body"].read() == data[-n:], n
    for a in (size, size + S * 2):
        with pytest.raises(ClientError) as ei:
            client.get_object(Bucket=bucket, Key="r", Range=f"bytes={a}-")
        assert _code(ei.value) == "InvalidRange"


def test_listing_prefix_delimiter_pagination(client: Any, bucket: str) -> None:
    for i in range(7):
        client.put_object(Bucket=bucket, Key=f"dir{i % 2}/f{i}", Body=_data(i * 1000))
    client.put_object(Bucket=bucket, Key="top", Body=b"x")
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix="dir", PaginationConfig={"PageSize": 2}
    )
    keys = [(o["Key"], o["Size"]) for p in pages for o in p.get("Contents", [])]
    assert sorted(keys) == sorted((f"dir{i % 2}/f{i}", i * 1000) for i in range(7))
    res = client.list_objects_v2(Bucket=bucket, Delimiter="/")
    assert {p["Prefix"] for p in res["CommonPrefixes"]} == {"dir0/", "dir1/"}
    assert [o["Key"] for o in res["Contents"]] == ["top"]
    v1 = client.list_objects(Bucket=bucket, Prefix="dir1/", MaxKeys=2)
    assert len(v1["Contents"]) == 2 and v1["IsTruncated"]
    assert all(o["Size"] % 1000 == 0 for o in v1["Contents"])


def test_legacy_plaintext_object_served_as_stored(
    client: Any, direct: Any, bucket: str, proxy: Any
) -> None:
    data = _data(70_000, 3)
    direct.put_object(Bucket=bucket, Key="legacy", Body=data)
    if proxy.config.backend.envelope_store == "sidecar":
        # Without metadata an envelope-less object cannot be told from a lost envelope:
        # it is refused, never served as if it were plaintext...
        with pytest.raises(ClientError) as ei:
            client.get_object(Bucket=bucket, Key="legacy")
        assert "no envelope" in ei.value.response["Error"]["Message"]
        # ...unless its size is one no v1 object can have.
        data = _data(crypto.STORED_SEGMENT_SIZE + 5, 4)
        direct.put_object(Bucket=bucket, Key="legacy", Body=data)
    assert client.get_object(Bucket=bucket, Key="legacy")["Body"].read() == data
    got = client.get_object(Bucket=bucket, Key="legacy", Range="bytes=65530-65545")
    assert got["Body"].read() == data[65530:65546]
    assert "ServerSideEncryption" not in client.head_object(Bucket=bucket, Key="legacy")


def test_missing_key_and_bucket_errors(client: Any, bucket: str) -> None:
    with pytest.raises(ClientError) as ei:
        client.get_object(Bucket=bucket, Key="nope")
    assert _code(ei.value) == "NoSuchKey"
    with pytest.raises(ClientError) as ei:
        client.head_object(Bucket=bucket, Key="nope")
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    with pytest.raises(ClientError) as ei:
        client.list_objects_v2(Bucket="no-such-bucket-xyz")
    assert _code(ei.value) == "NoSuchBucket"


def test_bucket_lifecycle(client: Any) -> None:
    client.create_bucket(Bucket="lifecycle-b")
    client.head_bucket(Bucket="lifecycle-b")
    assert "lifecycle-b" in [b["Name"] for b in client.list_buckets()["Buckets"]]
    client.put_object(Bucket="lifecycle-b", Key="k", Body=b"v")
    client.delete_object(Bucket="lifecycle-b", Key="k")
    client.delete_bucket(Bucket="lifecycle-b")
    assert "lifecycle-b" not in [b["Name"] for b in client.list_buckets()["Buckets"]]


def test_conditional_get_with_seen_etag(client: Any, bucket: str) -> None:
    etag = client.put_object(Bucket=bucket, Key="c", Body=b"hello")["ETag"]
    assert client.get_object(Bucket=bucket, Key="c", IfMatch=etag)["Body"].read() == b"hello"
    with pytest.raises(ClientError) as ei:
        client.get_object(Bucket=bucket, Key="c", IfNoneMatch=etag)
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 304
    with pytest.raises(ClientError) as ei:
        client.get_object(Bucket=bucket, Key="c", IfMatch='"0123"')
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412


def test_user_metadata_and_content_type(client: Any, bucket: str) -> None:
    client.put_object(
        Bucket=bucket,
        Key="m",
        Body=b"x",
        ContentType="text/x-test",
        Metadata={"colour": "blue"},
    )
    head = client.head_object(Bucket=bucket, Key="m")
    assert head["ContentType"] == "text/x-test"
    assert head["Metadata"] == {"colour": "blue"}
    with pytest.raises(ClientError) as ei:
        client.put_object(Bucket=bucket, Key="m2", Body=b"x", Metadata={"cmek-v": "9"})
    assert _code(ei.value) == "InvalidArgument"


def test_random_bytes_object(client: Any, bucket: str) -> None:
    data = os.urandom(200_000)
    client.put_object(Bucket=bucket, Key="rnd", Body=data)
    assert client.get_object(Bucket=bucket, Key="rnd")["Body"].read() == data
