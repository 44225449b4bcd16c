"""GetObjectAttributes with plaintext values (both backends): size, client ETag, the stored
checksum, plaintext part sizes (paged), storage class; plaintext objects as the backend says."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from botocore.exceptions import ClientError

ALL = ["ETag", "Checksum", "ObjectParts", "StorageClass", "ObjectSize"]
MIB = 1024 * 1024


def _data(n: int, seed: int) -> bytes:
    return hashlib.shake_256(b"%d" % seed).digest(n)


def test_single_part_object(client: Any, bucket: str) -> None:
    data = _data(200_000, 1)
    put = client.put_object(Bucket=bucket, Key="one", Body=data, ChecksumAlgorithm="SHA256")
    got = client.get_object_attributes(Bucket=bucket, Key="one", ObjectAttributes=ALL)
    assert got["ObjectSize"] == len(data)
    assert got["ETag"] == put["ETag"].strip('"') and got["ETag"].endswith("-c")
    assert got["Checksum"]["ChecksumSHA256"] == put["ChecksumSHA256"]
    assert got["Checksum"].get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT"
    assert got["StorageClass"] == "STANDARD"
    assert "ObjectParts" not in got
    assert "LastModified" in got


def test_multipart_object_parts_are_plaintext_sizes(client: Any, bucket: str) -> None:
    sizes = [5 * MIB, 5 * MIB, 1000]
    mp = client.create_multipart_upload(Bucket=bucket, Key="mp", ChecksumAlgorithm="CRC32")
    parts = []
    for n, size in enumerate(sizes, 1):
        r = client.upload_part(
            Bucket=bucket,
            Key="mp",
            UploadId=mp["UploadId"],
            PartNumber=n,
            Body=_data(size, n),
            ChecksumAlgorithm="CRC32",
        )
        parts.append({"PartNumber": n, "ETag": r["ETag"], "ChecksumCRC32": r["ChecksumCRC32"]})
    done = client.complete_multipart_upload(
        Bucket=bucket, Key="mp", UploadId=mp["UploadId"], MultipartUpload={"Parts": parts}
    )
    got = client.get_object_attributes(Bucket=bucket, Key="mp", ObjectAttributes=ALL)
    assert got["ObjectSize"] == sum(sizes)
    assert got["ETag"] == done["ETag"].strip('"')
    assert got["Checksum"]["ChecksumCRC32"] == done["ChecksumCRC32"]
    op = got["ObjectParts"]
    assert op["TotalPartsCount"] == 3 and not op["IsTruncated"]
    assert [(p["PartNumber"], p["Size"]) for p in op["Parts"]] == [
        (1, 5 * MIB),
        (2, 5 * MIB),
        (3, 1000),
    ]

    page = client.get_object_attributes(
        Bucket=bucket, Key="mp", ObjectAttributes=["ObjectParts"], MaxParts=2
    )["ObjectParts"]
    assert page["IsTruncated"] and [p["PartNumber"] for p in page["Parts"]] == [1, 2]
    rest = client.get_object_attributes(
        Bucket=bucket,
        Key="mp",
        ObjectAttributes=["ObjectParts"],
        PartNumberMarker=page["NextPartNumberMarker"],
    )["ObjectParts"]
    assert not rest["IsTruncated"] and [p["Size"] for p in rest["Parts"]] == [1000]


def test_plaintext_object_is_the_backends_answer(
    client: Any, direct: Any, bucket: str, proxy: Any
) -> None:
    if proxy.config.backend.envelope_store == "sidecar":
        pytest.skip("with sidecars an envelope-less object on an encrypted path is refused")
    direct.put_object(Bucket=bucket, Key="legacy", Body=b"legacy bytes")
    try:
        bare = direct.get_object_attributes(Bucket=bucket, Key="legacy", ObjectAttributes=ALL)
    except ClientError as exc:
        with pytest.raises(ClientError) as ei:
            client.get_object_attributes(Bucket=bucket, Key="legacy", ObjectAttributes=ALL)
        assert ei.value.response["Error"]["Code"] == exc.response["Error"]["Code"]
        return
    got = client.get_object_attributes(Bucket=bucket, Key="legacy", ObjectAttributes=ALL)
    assert got["ObjectSize"] == bare["ObjectSize"] == 12 and got["ETag"] == bare["ETag"]


def test_bad_attribute_name_is_refused(client: Any, bucket: str) -> None:
    client.put_object(Bucket=bucket, Key="x", Body=b"x")
    with pytest.raises(ClientError) as ei:
        client.get_object_attributes(Bucket=bucket, Key="x", ObjectAttributes=["Nonsense"])
    assert ei.value.response["Error"]["Code"] == "InvalidArgument"


def test_missing_object(client: Any, bucket: str) -> None:
    with pytest.raises(ClientError) as ei:
        client.get_object_attributes(Bucket=bucket, Key="nope", ObjectAttributes=ALL)
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
