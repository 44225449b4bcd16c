"""Client checksums through the proxy: stored encrypted, returned on full reads when asked."""

from __future__ import annotations

import base64
import hashlib
import urllib.error
import urllib.request
import zlib
from typing import Any

import botocore.auth
import pytest
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials
from botocore.exceptions import ClientError

from proxy import crypto
from tests.servers import CLIENT_AK, CLIENT_SK, REGION, ProxyThread
from tests.test_chunked import encode_unsigned
from tests.test_e2e_core import _code, _data

S = crypto.SEGMENT_SIZE


def _crc32(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def _sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def test_default_crc32_returned_and_validated(client: Any, direct: Any, bucket: str) -> None:
    data = _data(3 * S + 7, 11)
    put = client.put_object(Bucket=bucket, Key="k", Body=data)
    assert put["ChecksumCRC32"] == _crc32(data)
    got = client.get_object(Bucket=bucket, Key="k", ChecksumMode="ENABLED")
    assert got["Body"].read() == data  # boto3 validates the CRC32 while reading
    assert got["ChecksumCRC32"] == _crc32(data)
    assert got["ChecksumType"] == "FULL_OBJECT"
    head = client.head_object(Bucket=bucket, Key="k", ChecksumMode="ENABLED")
    assert head["ChecksumCRC32"] == _crc32(data)
    assert "ChecksumCRC32" not in client.head_object(Bucket=bucket, Key="k")
    rng = client.get_object(Bucket=bucket, Key="k", Range="bytes=5-70000", ChecksumMode="ENABLED")
    assert rng["Body"].read() == data[5:70001]
    assert "ChecksumCRC32" not in rng
    # What the backend holds is sealed: the plaintext checksum is nowhere in the metadata.
    stored = direct.head_object(Bucket=bucket, Key="k")
    assert _crc32(data) not in str(stored["Metadata"])
    assert "ChecksumCRC32" not in direct.head_object(Bucket=bucket, Key="k", ChecksumMode="ENABLED")


@pytest.mark.parametrize("alg", ["SHA256", "CRC32C", "SHA1", "CRC64NVME"])
def test_other_algorithms(client: Any, bucket: str, alg: str) -> None:
    data = _data(S + 1, 12)
    put = client.put_object(Bucket=bucket, Key=alg, Body=data, ChecksumAlgorithm=alg)
    got = client.get_object(Bucket=bucket, Key=alg, ChecksumMode="ENABLED")
    assert got["Body"].read() == data
    assert got[f"Checksum{alg}"] == put[f"Checksum{alg}"]
    if alg == "SHA256":
        assert got["ChecksumSHA256"] == _sha256(data)


def test_wrong_checksum_is_bad_digest_and_nothing_stored(client: Any, bucket: str) -> None:
    with pytest.raises(ClientError) as ei:
        client.put_object(Bucket=bucket, Key="bad", Body=b"hello", ChecksumCRC32=_crc32(b"other"))
    assert _code(ei.value) == "BadDigest"
    with pytest.raises(ClientError) as ei:
        client.head_object(Bucket=bucket, Key="bad")
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


def test_bad_content_md5_is_invalid_digest(client: Any, bucket: str) -> None:
    with pytest.raises(ClientError) as ei:
        client.put_object(Bucket=bucket, Key="md5", Body=b"hello", ContentMD5="notbase64!")
    assert _code(ei.value) == "InvalidDigest"
    md5 = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    with pytest.raises(ClientError) as ei:
        client.put_object(Bucket=bucket, Key="md5", Body=b"hello", ContentMD5=md5)
    assert _code(ei.value) == "BadDigest"


def _mpu(client: Any, bucket: str, key: str, parts: list[bytes], **create: Any) -> Any:
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, **create)["UploadId"]
    done = []
    for i, part in enumerate(parts, start=1):
        res = client.upload_part(
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=i,
            Body=part,
            ChecksumAlgorithm=create["ChecksumAlgorithm"],
        )
        name = f"Checksum{create['ChecksumAlgorithm']}"
        done.append({"PartNumber": i, "ETag": res["ETag"], name: res[name]})
    return client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": done}
    )


def test_multipart_composite_checksum(client: Any, bucket: str) -> None:
    parts = [_data(5 * 1024 * 1024, 20), _data(1000, 21)]
    res = _mpu(client, bucket, "comp", parts, ChecksumAlgorithm="SHA256")
    raw = b"".join(base64.b64decode(_sha256(p)) for p in parts)
    want = base64.b64encode(hashlib.sha256(raw).digest()).decode() + "-2"
    assert res["ChecksumSHA256"] == want and res["ChecksumType"] == "COMPOSITE"
    got = client.get_object(Bucket=bucket, Key="comp", ChecksumMode="ENABLED")
    assert got["Body"].read() == b"".join(parts)
    assert got["ChecksumSHA256"] == want and got["ChecksumType"] == "COMPOSITE"
    assert got["ETag"] == res["ETag"] == client.head_object(Bucket=bucket, Key="comp")["ETag"]


def test_multipart_full_object_crc_validated_by_boto3(client: Any, bucket: str) -> None:
    parts = [_data(5 * 1024 * 1024 + 1, 22), _data(5 * 1024 * 1024, 23), _data(3, 24)]
    data = b"".join(parts)
    res = _mpu(client, bucket, "full", parts, ChecksumAlgorithm="CRC32", ChecksumType="FULL_OBJECT")
    assert res["ChecksumCRC32"] == _crc32(data) and res["ChecksumType"] == "FULL_OBJECT"
    got = client.get_object(Bucket=bucket, Key="full", ChecksumMode="ENABLED")
    assert got["Body"].read() == data  # boto3 checks the full-object CRC32 while reading
    assert got["ChecksumCRC32"] == _crc32(data)


def test_upload_file_default_checksum(client: Any, bucket: str, tmp_path: Any) -> None:
    data = _data(9 * 1024 * 1024, 25)
    (tmp_path / "f").write_bytes(data)
    client.upload_file(str(tmp_path / "f"), bucket, "uf")
    got = client.get_object(Bucket=bucket, Key="uf", ChecksumMode="ENABLED")
    assert got["Body"].read() == data
    assert "ChecksumCRC32" in got


class _TrailerSigner(botocore.auth.S3SigV4Auth):
    def payload(self, request: AWSRequest) -> str:
        return "STREAMING-UNSIGNED-PAYLOAD-TRAILER"


def _put_with_trailer(endpoint: str, bucket: str, key: str, data: bytes, crc: str) -> int:
    """A PUT whose CRC32 comes in the aws-chunked trailer (what boto3 sends over TLS)."""
    body = encode_unsigned(data, 65536, {"x-amz-checksum-crc32": crc})
    headers = {
        "Content-Encoding": "aws-chunked",
        "X-Amz-Decoded-Content-Length": str(len(data)),
        "X-Amz-Trailer": "x-amz-checksum-crc32",
        "Content-Length": str(len(body)),
        "Content-Type": "application/octet-stream",  # urllib's default form type upsets moto
    }
    request = AWSRequest(method="PUT", url=f"{endpoint}/{bucket}/{key}", headers=headers)
    _TrailerSigner(BotoCredentials(CLIENT_AK, CLIENT_SK), "s3", REGION).add_auth(request)
    req = urllib.request.Request(
        request.url, data=body, method="PUT", headers=dict(request.headers.items())
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_trailer_checksum_stored_by_self_copy(
    proxy: ProxyThread, client: Any, direct: Any, bucket: str
) -> None:
    data = _data(2 * S + 11, 30)
    assert _put_with_trailer(proxy.endpoint, bucket, "tr", data, _crc32(data)) == 200
    got = client.get_object(Bucket=bucket, Key="tr", ChecksumMode="ENABLED")
    assert got["Body"].read() == data
    assert got["ChecksumCRC32"] == _crc32(data)
    put_etag = client.head_object(Bucket=bucket, Key="tr")["ETag"]
    assert got["ETag"] == put_etag
    assert _put_with_trailer(proxy.endpoint, bucket, "tr2", data, _crc32(b"x")) == 400
    with pytest.raises(ClientError):
        client.head_object(Bucket=bucket, Key="tr2")
