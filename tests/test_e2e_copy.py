"""Server-side copies through the proxy: reseal (ciphertext kept) and streaming re-encryption."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from proxy import crypto
from tests.servers import (
    ProxyThread,
    Server,
    new_keyfile,
    proxy_config,
    stored_envelope,
)
from tests.test_e2e_core import _code, _data

S = crypto.SEGMENT_SIZE
MiB = 1024 * 1024


def _stored(direct: Any, bucket: str, key: str) -> bytes:
    data: bytes = direct.get_object(Bucket=bucket, Key=key)["Body"].read()
    return data


def _user(res: dict[str, Any]) -> dict[str, str]:
    """User metadata, without the ``mtime`` that rclone adds to copies."""
    return {k: v for k, v in res["Metadata"].items() if k != "mtime"}


def _meta(direct: Any, bucket: str, key: str) -> dict[str, str]:
    return stored_envelope(direct, bucket, key)


@pytest.mark.parametrize("size", [0, 3 * S + 5])
def test_copy_same_key_reseals_without_reencrypting(
    client: Any, direct: Any, bucket: str, size: int
) -> None:
    data = _data(size, 1)
    client.put_object(
        Bucket=bucket, Key="src", Body=data, Metadata={"a": "1"}, ContentType="text/x-src"
    )
    other = f"{bucket}-dst"
    client.create_bucket(Bucket=other)
    res = client.copy_object(Bucket=other, Key="dst", CopySource={"Bucket": bucket, "Key": "src"})
    assert res["CopyObjectResult"]["ETag"] == client.head_object(Bucket=other, Key="dst")["ETag"]
    assert res["ServerSideEncryption"] == "aws:kms"
    got = client.get_object(Bucket=other, Key="dst")
    assert got["Body"].read() == data
    assert _user(got) == {"a": "1"} and got["ContentType"] == "text/x-src"
    assert _stored(direct, other, "dst") == _stored(direct, bucket, "src")
    assert _meta(direct, other, "dst")["cmek-ok"] != _meta(direct, bucket, "src")["cmek-ok"]
    # the source is untouched
    assert client.get_object(Bucket=bucket, Key="src")["Body"].read() == data


def test_copy_of_multipart_object_keeps_layout(client: Any, direct: Any, bucket: str) -> None:
    parts = [_data(5 * MiB, 2), _data(1000, 3)]
    upload_id = client.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
    done = [
        {
            "PartNumber": i + 1,
            "ETag": client.upload_part(
                Bucket=bucket, Key="mp", UploadId=upload_id, PartNumber=i + 1, Body=p
            )["ETag"],
        }
        for i, p in enumerate(parts)
    ]
    client.complete_multipart_upload(
        Bucket=bucket, Key="mp", UploadId=upload_id, MultipartUpload={"Parts": done}
    )
    client.copy_object(Bucket=bucket, Key="mp2", CopySource=f"{bucket}/mp")
    assert client.get_object(Bucket=bucket, Key="mp2")["Body"].read() == b"".join(parts)
    assert _stored(direct, bucket, "mp2") == _stored(direct, bucket, "mp")


def test_metadata_directive_replace(client: Any, bucket: str) -> None:
    client.put_object(
        Bucket=bucket, Key="s", Body=b"data", Metadata={"old": "x"}, ContentType="text/old"
    )
    client.copy_object(
        Bucket=bucket,
        Key="s",
        CopySource={"Bucket": bucket, "Key": "s"},
        MetadataDirective="REPLACE",
        Metadata={"new": "y"},
        ContentType="text/new",
    )
    head = client.head_object(Bucket=bucket, Key="s")
    assert head["ContentType"] == "text/new"
    assert head["Metadata"].get("new") == "y"
    assert client.get_object(Bucket=bucket, Key="s")["Body"].read() == b"data"
    with pytest.raises(ClientError) as ei:  # onto itself with nothing changed
        client.copy_object(Bucket=bucket, Key="s", CopySource={"Bucket": bucket, "Key": "s"})
    assert _code(ei.value) == "InvalidRequest"


def test_copy_source_conditions(client: Any, bucket: str) -> None:
    etag = client.put_object(Bucket=bucket, Key="c", Body=b"v")["ETag"]
    src = {"Bucket": bucket, "Key": "c"}
    client.copy_object(Bucket=bucket, Key="c1", CopySource=src, CopySourceIfMatch=etag)
    for kwargs in ({"CopySourceIfMatch": '"00"'}, {"CopySourceIfNoneMatch": etag}):
        with pytest.raises(ClientError) as ei:
            client.copy_object(Bucket=bucket, Key="c2", CopySource=src, **kwargs)
        assert _code(ei.value) == "PreconditionFailed"
    with pytest.raises(ClientError) as ei:
        client.head_object(Bucket=bucket, Key="c2")
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


def test_copy_missing_source(client: Any, bucket: str) -> None:
    with pytest.raises(ClientError) as ei:
        client.copy_object(Bucket=bucket, Key="d", CopySource={"Bucket": bucket, "Key": "nope"})
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


def test_large_reseal_uses_backend_multipart_copy(
    client: Any, direct: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.layer import copy

    monkeypatch.setattr(copy, "MAX_SINGLE_COPY", 6 * MiB)
    monkeypatch.setattr(copy, "COPY_PART_SIZE", 5 * MiB)
    data = _data(11 * MiB + 7, 4)
    client.put_object(Bucket=bucket, Key="big", Body=data)
    res = client.copy_object(Bucket=bucket, Key="big2", CopySource=f"{bucket}/big")
    assert res["CopyObjectResult"]["ETag"] == client.head_object(Bucket=bucket, Key="big2")["ETag"]
    assert client.get_object(Bucket=bucket, Key="big2")["Body"].read() == data
    assert _stored(direct, bucket, "big2") == _stored(direct, bucket, "big")


def test_plaintext_source_is_encrypted_by_copy(client: Any, direct: Any, bucket: str) -> None:
    # S + 32 + 9 stored bytes: a size no v1 object has, so even with sidecar envelopes (where an
    # envelope-less object is otherwise refused) the proxy knows this one is plaintext.
    data = _data(S + 32 + 9, 5)
    direct.put_object(Bucket=bucket, Key="plain", Body=data, Metadata={"m": "1"})
    client.copy_object(Bucket=bucket, Key="enc", CopySource=f"{bucket}/plain")
    assert client.get_object(Bucket=bucket, Key="enc")["Body"].read() == data
    assert "cmek-v" in _meta(direct, bucket, "enc")
    assert len(_stored(direct, bucket, "enc")) == crypto.ciphertext_size(len(data))
    assert _user(client.head_object(Bucket=bucket, Key="enc")) == {"m": "1"}


@pytest.fixture
def two_keys(backend: Server, keyfile: Path, tmp_path: Path) -> Iterator[ProxyThread]:
    """A proxy where bucket ``other-key-*`` uses a second KEK and ``plain-*`` passes through."""
    second = new_keyfile(tmp_path / "second.json")
    cfg = proxy_config(
        backend.url,
        keyfile,
        encryption={
            "default": {"key": f"local://{keyfile}"},
            "buckets": {
                "otherkey-b": {"key": f"local://{second}"},
                "plain-b": {"passthrough": True},
            },
        },
    )
    with ProxyThread(cfg) as p:
        yield p


def test_other_kek_and_passthrough_destinations(
    two_keys: ProxyThread, direct: Any, bucket: str
) -> None:
    c = two_keys.client()
    for b in ("otherkey-b", "plain-b"):
        with contextlib.suppress(ClientError):
            c.create_bucket(Bucket=b)
    data = _data(2 * S + 3, 6)
    c.put_object(Bucket=bucket, Key="src", Body=data, ChecksumAlgorithm="SHA256")
    c.copy_object(Bucket="otherkey-b", Key="k", CopySource=f"{bucket}/src")
    got = c.get_object(Bucket="otherkey-b", Key="k", ChecksumMode="ENABLED")
    assert got["Body"].read() == data
    assert (
        got["ChecksumSHA256"]
        == c.head_object(Bucket=bucket, Key="src", ChecksumMode="ENABLED")["ChecksumSHA256"]
    )
    assert _stored(direct, "otherkey-b", "k") != _stored(direct, bucket, "src")
    assert _meta(direct, "otherkey-b", "k")["cmek-kek"] != _meta(direct, bucket, "src")["cmek-kek"]
    c.copy_object(Bucket="plain-b", Key="k", CopySource=f"{bucket}/src")
    assert _stored(direct, "plain-b", "k") == data
    assert c.get_object(Bucket="plain-b", Key="k")["Body"].read() == data


def test_upload_part_copy_decrypts_the_range(client: Any, bucket: str) -> None:
    src = _data(12 * MiB, 7)
    client.put_object(Bucket=bucket, Key="src", Body=src)
    upload_id = client.create_multipart_upload(Bucket=bucket, Key="pc")["UploadId"]
    r1 = client.upload_part_copy(
        Bucket=bucket,
        Key="pc",
        UploadId=upload_id,
        PartNumber=1,
        CopySource=f"{bucket}/src",
        CopySourceRange=f"bytes=0-{5 * MiB - 1}",
    )
    r2 = client.upload_part_copy(
        Bucket=bucket,
        Key="pc",
        UploadId=upload_id,
        PartNumber=2,
        CopySource=f"{bucket}/src",
        CopySourceRange=f"bytes={7 * MiB + 3}-{12 * MiB - 1}",
    )
    with pytest.raises(ClientError) as ei:
        client.upload_part_copy(
            Bucket=bucket,
            Key="pc",
            UploadId=upload_id,
            PartNumber=3,
            CopySource=f"{bucket}/src",
            CopySourceIfMatch='"00"',
        )
    assert _code(ei.value) == "PreconditionFailed"
    parts = [
        {"PartNumber": 1, "ETag": r1["CopyPartResult"]["ETag"]},
        {"PartNumber": 2, "ETag": r2["CopyPartResult"]["ETag"]},
    ]
    client.complete_multipart_upload(
        Bucket=bucket, Key="pc", UploadId=upload_id, MultipartUpload={"Parts": parts}
    )
    got = client.get_object(Bucket=bucket, Key="pc")["Body"].read()
    assert got == src[: 5 * MiB] + src[7 * MiB + 3 :]


def test_delete_objects(client: Any, bucket: str) -> None:
    for i in range(3):
        client.put_object(Bucket=bucket, Key=f"d{i}", Body=b"x")
    res = client.delete_objects(
        Bucket=bucket, Delete={"Objects": [{"Key": "d0"}, {"Key": "d1"}, {"Key": "nope"}]}
    )
    assert sorted(d["Key"] for d in res["Deleted"]) == ["d0", "d1", "nope"]
    assert [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]] == ["d2"]
