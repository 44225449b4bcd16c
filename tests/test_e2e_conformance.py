"""Differences ceph/s3-tests found between a bare backend and the proxy in front of it
(docs/CONFORMANCE.md), each pinned on every backend."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError


def _source(client: Any, bucket: str) -> dict[str, str]:
    client.put_object(Bucket=bucket, Key="source", Body=b"12345")
    return {"Bucket": bucket, "Key": "source"}


@pytest.mark.parametrize(
    "rng", ["0-2", "bytes=0", "bytes=hello-world", "bytes=0-bar", "bytes=hello-", "bytes=0-2,3-5"]
)
def test_upload_part_copy_refuses_improper_ranges(client: Any, bucket: str, rng: str) -> None:
    src = _source(client, bucket)
    up = client.create_multipart_upload(Bucket=bucket, Key="dest")["UploadId"]
    with pytest.raises(ClientError) as err:
        client.upload_part_copy(
            Bucket=bucket,
            Key="dest",
            UploadId=up,
            CopySource=src,
            CopySourceRange=rng,
            PartNumber=1,
        )
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert err.value.response["Error"]["Code"] == "InvalidArgument"


def test_upload_part_copy_refuses_a_range_past_the_end(client: Any, bucket: str) -> None:
    src = _source(client, bucket)
    up = client.create_multipart_upload(Bucket=bucket, Key="dest")["UploadId"]
    with pytest.raises(ClientError) as err:
        client.upload_part_copy(
            Bucket=bucket,
            Key="dest",
            UploadId=up,
            CopySource=src,
            CopySourceRange="bytes=0-21",
            PartNumber=1,
        )
    assert err.value.response["Error"]["Code"] == "InvalidRange"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] in (400, 416)
    assert client.list_parts(Bucket=bucket, Key="dest", UploadId=up).get("Parts", []) == []


def test_put_if_match_with_an_unquoted_etag(client: Any, bucket: str) -> None:
    """An unquoted If-Match reaches the backend unquoted, as the client sent it."""
    etag = client.put_object(Bucket=bucket, Key="k", Body=b"one")["ETag"]
    client.put_object(Bucket=bucket, Key="k", Body=b"two", IfMatch=etag.strip('"'))
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"two"


def test_object_tagging_never_destroys_the_object(client: Any, bucket: str, backend: Any) -> None:
    """rclone serve s3 stores a PutObjectTagging body as the object's data: with sidecar
    envelopes (its store) tagging is refused, elsewhere it works as S3's."""
    client.put_object(Bucket=bucket, Key="t", Body=b"keep me")
    tags = {"TagSet": [{"Key": "a", "Value": "b"}]}
    if backend.name == "rclone":
        with pytest.raises(ClientError) as err:
            client.put_object_tagging(Bucket=bucket, Key="t", Tagging=tags)
        assert err.value.response["Error"]["Code"] == "NotImplemented"
    else:
        client.put_object_tagging(Bucket=bucket, Key="t", Tagging=tags)
        assert client.get_object_tagging(Bucket=bucket, Key="t")["TagSet"] == tags["TagSet"]
    assert client.get_object(Bucket=bucket, Key="t")["Body"].read() == b"keep me"
