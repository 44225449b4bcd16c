"""The proxy's own state follows the client's objects: envelopes go with overwrites, DeleteObject
and DeleteObjects; DeleteBucket succeeds once no client data remains (on both backends)."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from botocore.exceptions import ClientError

from proxy.layer.envelopes import SIDECAR_PREFIX, current_names, sidecar_prefix
from proxy.wire.reserved import RESERVED_PREFIX


def _reserved(direct: Any, bucket: str, prefix: str = RESERVED_PREFIX) -> list[str]:
    keys: list[str] = []
    for page in direct.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def _envelopes_of(direct: Any, bucket: str, key: str) -> list[str]:
    return [k.rsplit("/", 1)[1] for k in _reserved(direct, bucket, sidecar_prefix(key))]


def test_overwrite_keeps_only_the_current_envelope(client: Any, direct: Any, bucket: str) -> None:
    for i in range(3):
        client.put_object(Bucket=bucket, Key="k", Body=b"version %d" % i * 1000)
    etag = direct.head_object(Bucket=bucket, Key="k")["ETag"].strip('"')
    stored = _envelopes_of(direct, bucket, "k")
    assert stored in ([etag], [])  # [] with metadata envelopes
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"version 2" * 1000


def test_racing_writers_leave_the_current_object_readable(client: Any, bucket: str) -> None:
    bodies = [hashlib.sha256(b"%d" % i).digest() * (100 + i) for i in range(8)]

    def put(body: bytes) -> bool:
        try:
            client.put_object(Bucket=bucket, Key="race", Body=body)
        except ClientError as exc:  # rclone answers some racing writes with 500/503
            assert exc.response["ResponseMetadata"]["HTTPStatusCode"] >= 500
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        acknowledged = list(pool.map(put, bodies))
    assert any(acknowledged)
    assert client.get_object(Bucket=bucket, Key="race")["Body"].read() in bodies


@pytest.mark.parametrize("quiet", [False, True])
def test_delete_objects_removes_envelopes(
    client: Any, direct: Any, bucket: str, quiet: bool
) -> None:
    keys = [f"d/{i}" for i in range(5)]
    for k in keys:
        client.put_object(Bucket=bucket, Key=k, Body=k.encode() * 100)
    res = client.delete_objects(
        Bucket=bucket,
        Delete={"Objects": [{"Key": k} for k in keys[:4]], "Quiet": quiet},
    )
    assert not res.get("Errors")
    left = _reserved(direct, bucket, SIDECAR_PREFIX)
    assert all(not k.startswith(sidecar_prefix(d)) for d in keys[:4] for k in left)
    assert client.get_object(Bucket=bucket, Key="d/4")["Body"].read() == b"d/4" * 100


def test_delete_object_removes_envelope(client: Any, direct: Any, bucket: str) -> None:
    client.put_object(Bucket=bucket, Key="one", Body=b"1" * 10)
    client.delete_object(Bucket=bucket, Key="one")
    assert _envelopes_of(direct, bucket, "one") == []


def test_delete_bucket_after_deleting_everything(client: Any, direct: Any) -> None:
    client.create_bucket(Bucket="rb-empty")
    for i in range(3):
        client.put_object(Bucket="rb-empty", Key=f"x/{i}", Body=b"z" * 70_000)
    mp = client.create_multipart_upload(Bucket="rb-empty", Key="aborted")
    client.abort_multipart_upload(Bucket="rb-empty", Key="aborted", UploadId=mp["UploadId"])
    client.delete_objects(
        Bucket="rb-empty", Delete={"Objects": [{"Key": f"x/{i}"} for i in range(3)]}
    )
    # a leftover from a killed job or an expired upload is the proxy's, not the client's
    direct.put_object(Bucket="rb-empty", Key=RESERVED_PREFIX + "jobs/tmp/keep", Body=b"")
    client.delete_bucket(Bucket="rb-empty")
    names = [b["Name"] for b in direct.list_buckets()["Buckets"]]
    assert "rb-empty" not in names


def test_delete_bucket_with_client_data_keeps_everything(client: Any, direct: Any) -> None:
    client.create_bucket(Bucket="rb-full")
    client.put_object(Bucket="rb-full", Key="keep", Body=b"k" * 70_000)
    with pytest.raises(ClientError) as ei:
        client.delete_bucket(Bucket="rb-full")
    assert ei.value.response["Error"]["Code"] == "BucketNotEmpty"
    assert client.get_object(Bucket="rb-full", Key="keep")["Body"].read() == b"k" * 70_000


def test_delete_bucket_with_an_upload_in_progress_keeps_it(client: Any) -> None:
    client.create_bucket(Bucket="rb-upload")
    mp = client.create_multipart_upload(Bucket="rb-upload", Key="big")
    with pytest.raises(ClientError) as ei:
        client.delete_bucket(Bucket="rb-upload")
    assert ei.value.response["Error"]["Code"] == "BucketNotEmpty"
    part = client.upload_part(
        Bucket="rb-upload", Key="big", UploadId=mp["UploadId"], PartNumber=1, Body=b"p" * 1000
    )
    client.complete_multipart_upload(
        Bucket="rb-upload",
        Key="big",
        UploadId=mp["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
    )
    assert client.get_object(Bucket="rb-upload", Key="big")["Body"].read() == b"p" * 1000


def test_multipart_and_copy_overwrites_keep_only_the_current_envelope(
    client: Any, direct: Any, bucket: str
) -> None:
    client.put_object(Bucket=bucket, Key="src", Body=b"s" * 70_000)
    client.put_object(Bucket=bucket, Key="k", Body=b"first" * 100)
    mp = client.create_multipart_upload(Bucket=bucket, Key="k")
    part = client.upload_part(
        Bucket=bucket, Key="k", UploadId=mp["UploadId"], PartNumber=1, Body=b"p" * 1000
    )
    client.complete_multipart_upload(
        Bucket=bucket,
        Key="k",
        UploadId=mp["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
    )
    head = direct.head_object(Bucket=bucket, Key="k")
    meta = {"x-amz-meta-" + k: v for k, v in head["Metadata"].items()}
    name = current_names({**meta, "etag": head["ETag"]})[-1]  # upload's (metadata store) or ETag
    assert _envelopes_of(direct, bucket, "k") == [name]
    client.copy_object(Bucket=bucket, Key="k", CopySource={"Bucket": bucket, "Key": "src"})
    etag = direct.head_object(Bucket=bucket, Key="k")["ETag"].strip('"')
    assert _envelopes_of(direct, bucket, "k") in ([etag], [])
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"s" * 70_000
