"""Authentication and body integrity through the proxy with raw, botocore-signed requests.

Each rejected upload is also checked at the backend: nothing may be stored.
Virtual-host-style addressing runs on a second proxy with ``virtual_host_domain`` set.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest.mock import patch
from urllib.parse import quote
from xml.etree import ElementTree

import pytest
import requests
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from proxy import crypto
from tests.servers import CLIENT_AK, CLIENT_SK, REGION, ProxyThread, Server, proxy_config

TIMEOUT = 30
NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def _data(n: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(f"auth-{n}-{seed}".encode()).digest(n)


def sign(
    method: str,
    url: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    ak: str = CLIENT_AK,
    sk: str = CLIENT_SK,
    when: datetime | None = None,
    trailer: str | None = None,
) -> dict[str, str]:
    """Sign like botocore does and return the headers to send (Host included)."""
    req = AWSRequest(method=method, url=url, data=body, headers=dict(headers or {}))
    if trailer is not None:
        req.context["checksum"] = {"request_algorithm": {"in": "trailer", "name": trailer}}
    signer = S3SigV4Auth(Credentials(ak, sk), "s3", REGION)
    moment = (when or datetime.now(UTC)).astimezone(UTC).replace(tzinfo=None)
    with patch("botocore.auth.get_current_datetime", return_value=moment):
        signer.add_auth(req)
    out = {k: str(v) for k, v in req.headers.items()}
    out["Host"] = url.split("/")[2]
    return out


def send(
    method: str, url: str, headers: dict[str, str], body: bytes = b"", to: str | None = None
) -> requests.Response:
    """Send to ``to`` (scheme://host:port) when the signed URL names another host."""
    target = url if to is None else to + "/" + url.split("/", 3)[3]
    return requests.request(method, target, headers=headers, data=body, timeout=TIMEOUT)


def error_code(resp: requests.Response) -> str:
    root = ElementTree.fromstring(resp.content)
    code = root.findtext("Code")
    assert code is not None, resp.content
    return code


def assert_absent(direct: Any, bucket: str, key: str) -> None:
    with pytest.raises(ClientError) as ei:
        direct.head_object(Bucket=bucket, Key=key)
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


def obj_url(proxy: ProxyThread, bucket: str, key: str) -> str:
    return f"{proxy.endpoint}/{bucket}/{quote(key)}"


# --------------------------------------------------------------------------- signatures


def test_good_signature_round_trip(proxy: ProxyThread, direct: Any, bucket: str) -> None:
    data = _data(70_000)
    url = obj_url(proxy, bucket, "good")
    r = send("PUT", url, sign("PUT", url, data), data)
    assert r.status_code == 200, r.text
    assert r.headers["x-amz-server-side-encryption"] == "aws:kms"
    r = send("GET", url, sign("GET", url))
    assert r.status_code == 200 and r.content == data
    stored = direct.get_object(Bucket=bucket, Key="good")["Body"].read()
    assert len(stored) == crypto.ciphertext_size(len(data)) and data[:32] not in stored


def test_bad_signature(proxy: ProxyThread, direct: Any, bucket: str) -> None:
    url = obj_url(proxy, bucket, "badsig")
    headers = sign("PUT", url, b"abc")
    auth = headers["Authorization"]
    last = auth[-1]
    headers["Authorization"] = auth[:-1] + ("0" if last != "0" else "1")
    r = send("PUT", url, headers, b"abc")
    assert r.status_code == 403 and error_code(r) == "SignatureDoesNotMatch"
    # Signed with the wrong secret for a known key.
    r = send("PUT", url, sign("PUT", url, b"abc", sk="not-the-secret"), b"abc")
    assert r.status_code == 403 and error_code(r) == "SignatureDoesNotMatch"
    assert_absent(direct, bucket, "badsig")


def test_unknown_access_key(proxy: ProxyThread, direct: Any, bucket: str) -> None:
    url = obj_url(proxy, bucket, "unknown")
    r = send("PUT", url, sign("PUT", url, b"abc", ak="NOSUCHKEY"), b"abc")
    assert r.status_code == 403 and error_code(r) == "InvalidAccessKeyId"
    assert_absent(direct, bucket, "unknown")


@pytest.mark.parametrize("minutes", [-20, 20])
def test_skewed_clock(proxy: ProxyThread, direct: Any, bucket: str, minutes: int) -> None:
    url = obj_url(proxy, bucket, "skew")
    when = datetime.now(UTC) + timedelta(minutes=minutes)
    r = send("PUT", url, sign("PUT", url, b"abc", when=when), b"abc")
    assert r.status_code == 403 and error_code(r) == "RequestTimeTooSkewed"
    assert_absent(direct, bucket, "skew")


def test_missing_auth(proxy: ProxyThread, direct: Any, bucket: str) -> None:
    url = obj_url(proxy, bucket, "anon")
    r = requests.put(url, data=b"abc", timeout=TIMEOUT)
    assert r.status_code == 403 and error_code(r) == "AccessDenied"
    assert_absent(direct, bucket, "anon")
    r = requests.get(f"{proxy.endpoint}/{bucket}", timeout=TIMEOUT)
    assert r.status_code == 403 and error_code(r) == "AccessDenied"


# --------------------------------------------------------------------------- body integrity


def test_body_not_matching_signed_sha256(proxy: ProxyThread, direct: Any, bucket: str) -> None:
    signed_body = _data(200_000, 1)
    sent_body = bytearray(signed_body)
    sent_body[150_000] ^= 1
    url = obj_url(proxy, bucket, "shamismatch")
    r = send("PUT", url, sign("PUT", url, signed_body), bytes(sent_body))
    assert r.status_code == 400 and error_code(r) == "XAmzContentSHA256Mismatch"
    assert_absent(direct, bucket, "shamismatch")


def test_wrong_content_md5(client: Any, direct: Any, bucket: str) -> None:
    body = _data(100_000, 2)
    wrong = base64.b64encode(hashlib.md5(body + b"x").digest()).decode()
    with pytest.raises(ClientError) as ei:
        client.put_object(Bucket=bucket, Key="md5", Body=body, ContentMD5=wrong)
    assert ei.value.response["Error"]["Code"] == "BadDigest"
    assert_absent(direct, bucket, "md5")
    right = base64.b64encode(hashlib.md5(body).digest()).decode()
    client.put_object(Bucket=bucket, Key="md5", Body=body, ContentMD5=right)
    assert client.get_object(Bucket=bucket, Key="md5")["Body"].read() == body


def test_wrong_crc32_header(client: Any, direct: Any, bucket: str) -> None:
    body = _data(100_000, 3)
    wrong = base64.b64encode(zlib.crc32(body + b"x").to_bytes(4, "big")).decode()
    with pytest.raises(ClientError) as ei:
        client.put_object(Bucket=bucket, Key="crc", Body=body, ChecksumCRC32=wrong)
    assert ei.value.response["Error"]["Code"] == "BadDigest"
    assert_absent(direct, bucket, "crc")


def _trailer_body(data: bytes, crc_b64: str, chunk: int = 64 * 1024) -> bytes:
    out = bytearray()
    for i in range(0, len(data), chunk):
        piece = data[i : i + chunk]
        out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    out += b"0\r\n" + f"x-amz-checksum-crc32:{crc_b64}\r\n\r\n".encode()
    return bytes(out)


def _put_trailer(proxy: ProxyThread, bucket: str, key: str, data: bytes, crc: str) -> Any:
    url = obj_url(proxy, bucket, key)
    body = _trailer_body(data, crc)
    headers = {
        "Content-Encoding": "aws-chunked",
        "x-amz-decoded-content-length": str(len(data)),
        "x-amz-trailer": "x-amz-checksum-crc32",
        "x-amz-sdk-checksum-algorithm": "CRC32",
    }
    signed = sign("PUT", url, body, headers, trailer="x-amz-checksum-crc32")
    assert signed["X-Amz-Content-SHA256"] == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    return send("PUT", url, signed, body)


def test_aws_chunked_trailer_checksum(proxy: ProxyThread, direct: Any, bucket: str) -> None:
    data = _data(300_000, 4)
    good = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    r = _put_trailer(proxy, bucket, "trailer-ok", data, good)
    assert r.status_code == 200, r.text
    assert r.headers.get("x-amz-checksum-crc32") == good
    url = obj_url(proxy, bucket, "trailer-ok")
    assert send("GET", url, sign("GET", url)).content == data
    stored = direct.get_object(Bucket=bucket, Key="trailer-ok")["Body"].read()
    assert len(stored) == crypto.ciphertext_size(len(data))

    bad = base64.b64encode(zlib.crc32(data[:-1]).to_bytes(4, "big")).decode()
    assert len(bad) == len(good)
    r = _put_trailer(proxy, bucket, "trailer-bad", data, bad)
    assert r.status_code == 400 and error_code(r) == "BadDigest", r.text
    assert_absent(direct, bucket, "trailer-bad")


# --------------------------------------------------------------------------- virtual host


@pytest.fixture(scope="module")
def vhost_proxy(backend: Server, keyfile: Path) -> Iterator[ProxyThread]:
    with ProxyThread(proxy_config(backend.url, keyfile, virtual_host_domain="s3.test")) as p:
        yield p


def test_virtual_host_addressing(vhost_proxy: ProxyThread, direct: Any, bucket: str) -> None:
    port = vhost_proxy.endpoint.rsplit(":", 1)[1]
    base = f"http://{bucket}.s3.test:{port}"
    data = _data(100_000, 5)
    url = f"{base}/dir/v%20key.bin"
    to = vhost_proxy.endpoint
    r = send("PUT", url, sign("PUT", url, data), data, to=to)
    assert r.status_code == 200, r.text
    r = send("GET", url, sign("GET", url), to=to)
    assert r.status_code == 200 and r.content == data
    r = send("GET", url, sign("GET", url, headers={"Range": "bytes=10-19"}), to=to)
    assert r.status_code == 206 and r.content == data[10:20]
    list_url = f"{base}/?list-type=2&prefix=dir%2F"
    r = send("GET", list_url, sign("GET", list_url), to=to)
    assert r.status_code == 200, r.text
    root = ElementTree.fromstring(r.content)
    listed = {c.findtext(f"{NS}Key"): c.findtext(f"{NS}Size") for c in root.iter(f"{NS}Contents")}
    assert listed == {"dir/v key.bin": str(len(data))}
    stored = direct.get_object(Bucket=bucket, Key="dir/v key.bin")["Body"].read()
    assert len(stored) == crypto.ciphertext_size(len(data)) and data[:32] not in stored
    # The signature covers the Host: a request signed for another bucket's host fails.
    other = f"http://other.s3.test:{port}/dir/v%20key.bin"
    headers = sign("GET", other)
    headers["Host"] = f"{bucket}.s3.test:{port}"
    r = send("GET", url, headers, to=to)
    assert r.status_code == 403 and error_code(r) == "SignatureDoesNotMatch"
    # Path style still works on the same listener.
    path_url = f"{to}/{bucket}/dir/v%20key.bin"
    r = send("GET", path_url, sign("GET", path_url))
    assert r.status_code == 200 and r.content == data
    r = send("DELETE", url, sign("DELETE", url), to=to)
    assert r.status_code == 204
    assert_absent(direct, bucket, "dir/v key.bin")
