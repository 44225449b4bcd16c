"""boto3 beyond put/get: presigned URLs used with ``requests``, and the transfer manager.

The transfer manager uploads in parts above 8 MiB (multipart) and downloads with
concurrent ranged GETs; the two directions are separate tests so that one does not
hide the other.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest.mock import patch
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from xml.etree import ElementTree

import pytest
import requests
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from proxy import crypto
from tests.servers import ProxyThread

TIMEOUT = 60
MiB = 1024 * 1024


def _data(n: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(f"presigned-{n}-{seed}".encode()).digest(n)


def _code(resp: requests.Response) -> str:
    code = ElementTree.fromstring(resp.content).findtext("Code")
    assert code is not None, resp.content
    return code


def _stored_is_ciphertext(direct: Any, bucket: str, key: str, data: bytes) -> None:
    stored = direct.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert len(stored) == crypto.ciphertext_size(len(data))
    assert data[:32] not in stored


def _with_param(url: str, name: str, value: str) -> str:
    parts = urlsplit(url)
    query = [(k, value if k == name else v) for k, v in parse_qsl(parts.query)]
    return urlunsplit(parts._replace(query=urlencode(query)))


# --------------------------------------------------------------------------- presigned


@pytest.fixture(scope="module")
def signer(proxy: ProxyThread) -> Any:
    """boto3 presigns with SigV2 unless told otherwise; ``signature_version="s3v4"`` is
    boto3's documented setting for SigV4 presigned URLs (SigV2 ones are tested on their own)."""
    return proxy.client(signature_version="s3v4")


def test_default_sigv2_presigned_get_and_put(client: Any, direct: Any, bucket: str) -> None:
    """boto3's default presigned URLs (SigV2 query-string auth) work with ``requests``."""
    data = _data(120_000, 2)
    put_url = client.generate_presigned_url(
        "put_object", Params={"Bucket": bucket, "Key": "v2/up load+1.bin"}, ExpiresIn=300
    )
    assert "AWSAccessKeyId=" in put_url and "X-Amz-" not in put_url
    r = requests.put(put_url, data=data, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.headers["x-amz-server-side-encryption"] == "aws:kms"
    _stored_is_ciphertext(direct, bucket, "v2/up load+1.bin", data)
    get_url = client.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "v2/up load+1.bin"}, ExpiresIn=300
    )
    assert "AWSAccessKeyId=" in get_url and "X-Amz-" not in get_url
    r = requests.get(get_url, timeout=TIMEOUT)
    assert r.status_code == 200 and r.content == data
    r = requests.get(get_url, headers={"Range": "bytes=65530-65545"}, timeout=TIMEOUT)
    assert r.status_code == 206 and r.content == data[65530:65546]
    overridden = client.generate_presigned_url(
        "get_object",
        Params={
            "Bucket": bucket,
            "Key": "v2/up load+1.bin",
            "ResponseContentDisposition": 'attachment; filename="x.bin"',
        },
    )
    r = requests.get(overridden, timeout=TIMEOUT)
    assert r.content == data
    assert r.headers["Content-Disposition"] == 'attachment; filename="x.bin"'
    # The signature binds the key, the method and the expiry.
    r = requests.get(get_url.replace("/up%20load", "/other"), timeout=TIMEOUT)
    assert r.status_code == 403 and _code(r) == "SignatureDoesNotMatch"
    r = requests.put(get_url, data=b"overwrite", timeout=TIMEOUT)
    assert r.status_code == 403 and _code(r) == "SignatureDoesNotMatch"
    expires = dict(parse_qsl(urlsplit(get_url).query))["Expires"]
    r = requests.get(_with_param(get_url, "Expires", str(int(expires) + 1)), timeout=TIMEOUT)
    assert r.status_code == 403 and _code(r) == "SignatureDoesNotMatch"
    r = requests.get(_with_param(get_url, "Expires", "1000000000"), timeout=TIMEOUT)
    assert r.status_code == 403 and _code(r) == "AccessDenied" and b"expired" in r.content
    assert client.get_object(Bucket=bucket, Key="v2/up load+1.bin")["Body"].read() == data


def test_presigned_get(client: Any, signer: Any, direct: Any, bucket: str) -> None:
    data = _data(150_000)
    client.put_object(Bucket=bucket, Key="dir/pre get.bin", Body=data)
    url = signer.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "dir/pre get.bin"}, ExpiresIn=300
    )
    r = requests.get(url, timeout=TIMEOUT)
    assert r.status_code == 200 and r.content == data
    assert r.headers["x-amz-server-side-encryption"] == "aws:kms"
    r = requests.get(url, headers={"Range": "bytes=65530-65545"}, timeout=TIMEOUT)
    assert r.status_code == 206 and r.content == data[65530:65546]
    r = requests.head(
        signer.generate_presigned_url(
            "head_object", Params={"Bucket": bucket, "Key": "dir/pre get.bin"}
        ),
        timeout=TIMEOUT,
    )
    assert r.status_code == 200 and int(r.headers["Content-Length"]) == len(data)
    overridden = signer.generate_presigned_url(
        "get_object",
        Params={
            "Bucket": bucket,
            "Key": "dir/pre get.bin",
            "ResponseContentDisposition": 'attachment; filename="x.bin"',
        },
    )
    r = requests.get(overridden, timeout=TIMEOUT)
    assert r.content == data
    assert r.headers["Content-Disposition"] == 'attachment; filename="x.bin"'
    _stored_is_ciphertext(direct, bucket, "dir/pre get.bin", data)


def test_presigned_put(client: Any, signer: Any, direct: Any, bucket: str) -> None:
    data = _data(200_000, 1)
    url = signer.generate_presigned_url(
        "put_object", Params={"Bucket": bucket, "Key": "uploaded"}, ExpiresIn=300
    )
    r = requests.put(url, data=data, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.headers["x-amz-server-side-encryption"] == "aws:kms"
    got = client.get_object(Bucket=bucket, Key="uploaded")
    assert got["Body"].read() == data and got["ETag"] == r.headers["ETag"]
    _stored_is_ciphertext(direct, bucket, "uploaded", data)
    listed = client.list_objects_v2(Bucket=bucket)["Contents"]
    assert [(o["Key"], o["Size"]) for o in listed] == [("uploaded", len(data))]


def test_presigned_expired(client: Any, signer: Any, direct: Any, bucket: str) -> None:
    client.put_object(Bucket=bucket, Key="old", Body=b"old data")
    past = datetime.now(UTC) - timedelta(minutes=5)

    def clock(remove_tzinfo: bool = True) -> datetime:
        return past.replace(tzinfo=None) if remove_tzinfo else past

    # botocore signs with the CRT signer when awscrt is installed, else in Python.
    with (
        patch("botocore.auth.get_current_datetime", clock),
        patch("botocore.crt.auth.get_current_datetime", clock),
    ):
        get_url = signer.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": "old"}, ExpiresIn=60
        )
        put_url = signer.generate_presigned_url(
            "put_object", Params={"Bucket": bucket, "Key": "late"}, ExpiresIn=60
        )
    r = requests.get(get_url, timeout=TIMEOUT)
    assert r.status_code == 403 and _code(r) == "AccessDenied"
    assert b"expired" in r.content
    r = requests.put(put_url, data=b"too late", timeout=TIMEOUT)
    assert r.status_code == 403 and _code(r) == "AccessDenied"
    with pytest.raises(ClientError):
        direct.head_object(Bucket=bucket, Key="late")


def test_presigned_tampered(client: Any, signer: Any, direct: Any, bucket: str) -> None:
    client.put_object(Bucket=bucket, Key="a", Body=b"object a")
    client.put_object(Bucket=bucket, Key="b", Body=b"object b")
    url = signer.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "a"}, ExpiresIn=300
    )
    assert requests.get(url, timeout=TIMEOUT).content == b"object a"
    # Another key with the same signature.
    other = url.replace(f"/{bucket}/a?", f"/{bucket}/b?")
    r = requests.get(other, timeout=TIMEOUT)
    assert r.status_code == 403 and _code(r) == "SignatureDoesNotMatch"
    # A longer lifetime than signed.
    r = requests.get(_with_param(url, "X-Amz-Expires", "301"), timeout=TIMEOUT)
    assert r.status_code == 403 and _code(r) == "SignatureDoesNotMatch"
    # A flipped signature digit.
    sig = dict(parse_qsl(urlsplit(url).query))["X-Amz-Signature"]
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    r = requests.get(_with_param(url, "X-Amz-Signature", flipped), timeout=TIMEOUT)
    assert r.status_code == 403 and _code(r) == "SignatureDoesNotMatch"
    # A presigned GET used for a PUT.
    r = requests.put(url, data=b"overwrite", timeout=TIMEOUT)
    assert r.status_code == 403 and _code(r) == "SignatureDoesNotMatch"
    assert client.get_object(Bucket=bucket, Key="a")["Body"].read() == b"object a"


# --------------------------------------------------------------------------- transfer manager


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_transfer_manager_download(client: Any, direct: Any, bucket: str, tmp_path: Path) -> None:
    """download_file of a single-part object: concurrent ranged GETs of 8 MiB."""
    data = _data(20 * MiB, 2)
    client.put_object(Bucket=bucket, Key="big", Body=data)
    _stored_is_ciphertext(direct, bucket, "big", data)
    out = tmp_path / "big.out"
    client.download_file(bucket, "big", str(out))
    assert out.read_bytes() == data
    small_parts = TransferConfig(multipart_chunksize=1 * MiB + 17, max_concurrency=8)
    out2 = tmp_path / "big2.out"
    client.download_file(bucket, "big", str(out2), Config=small_parts)
    assert out2.read_bytes() == data


def test_transfer_manager_upload(
    proxy: ProxyThread, client: Any, direct: Any, bucket: str, tmp_path: Path
) -> None:
    """upload_file of 20 MiB: a multipart upload of three parts, then read back."""
    data = _data(20 * MiB, 3)
    src = _write(tmp_path / "big.in", data)
    client.upload_file(str(src), bucket, "mp/big")
    head = client.head_object(Bucket=bucket, Key="mp/big")
    assert head["ContentLength"] == len(data)
    assert head["ServerSideEncryption"] == "aws:kms"
    listed = client.list_objects_v2(Bucket=bucket, Prefix="mp/")["Contents"]
    assert [(o["Key"], o["Size"]) for o in listed] == [("mp/big", len(data))]
    out = tmp_path / "big.out"
    client.download_file(bucket, "mp/big", str(out))
    assert out.read_bytes() == data
    stored = direct.get_object(Bucket=bucket, Key="mp/big")["Body"].read()
    assert len(stored) > len(data) and data[:32] not in stored
