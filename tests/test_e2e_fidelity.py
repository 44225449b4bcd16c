"""Answers in client form on both backends: 304s carry the client's ETag and SSE headers;
backend errors for operations the backend lacks keep their code; user metadata round-trips."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from botocore.exceptions import ClientError


def _not_modified(call: Any) -> dict[str, str]:
    with pytest.raises(ClientError) as ei:
        call()
    meta = ei.value.response["ResponseMetadata"]
    assert meta["HTTPStatusCode"] == 304
    return {k.lower(): v for k, v in meta["HTTPHeaders"].items()}


@pytest.mark.parametrize("method", ["head_object", "get_object"])
def test_304_carries_the_client_etag_and_sse_headers(client: Any, bucket: str, method: str) -> None:
    etag = client.put_object(Bucket=bucket, Key="c", Body=b"c" * 1000)["ETag"]
    assert etag.endswith('-c"')
    call = getattr(client, method)
    by_etag = _not_modified(lambda: call(Bucket=bucket, Key="c", IfNoneMatch=etag))
    later = datetime.now(UTC) + timedelta(days=1)
    by_date = _not_modified(lambda: call(Bucket=bucket, Key="c", IfModifiedSince=later))
    for headers in (by_etag, by_date):
        assert headers["etag"] == etag
        assert headers["x-amz-server-side-encryption"] == "aws:kms"
        assert "x-amz-server-side-encryption-aws-kms-key-id" in headers


def test_backend_etag_without_suffix_does_not_match(client: Any, direct: Any, bucket: str) -> None:
    etag = client.put_object(Bucket=bucket, Key="s", Body=b"s" * 1000)["ETag"]
    stored = direct.head_object(Bucket=bucket, Key="s")["ETag"]
    assert stored != etag
    got = client.get_object(Bucket=bucket, Key="s", IfNoneMatch=stored)
    assert got["Body"].read() == b"s" * 1000 and got["ETag"] == etag


def test_an_operation_the_backend_lacks_keeps_its_error(
    client: Any, direct: Any, bucket: str
) -> None:
    client.put_object(Bucket=bucket, Key="v", Body=b"v")
    try:
        bare = direct.list_object_versions(Bucket=bucket)
    except ClientError as exc:
        want = (exc.response["Error"]["Code"], exc.response["ResponseMetadata"]["HTTPStatusCode"])
        with pytest.raises(ClientError) as ei:
            client.list_object_versions(Bucket=bucket)
        got = ei.value.response
        assert (got["Error"]["Code"], got["ResponseMetadata"]["HTTPStatusCode"]) == want
        return
    assert bare["Versions"]  # moto has versions: the proxy answers them
    assert [v["Key"] for v in client.list_object_versions(Bucket=bucket)["Versions"]] == ["v"]


def _with_raw_meta(client: Any, value: str) -> Any:
    """Send ``x-amz-meta-meta1`` as given (botocore puts it on the wire as UTF-8), as
    ceph/s3-tests test_object_set_get_unicode_metadata does."""

    def set_meta(**kwargs: Any) -> None:
        kwargs["params"]["headers"]["x-amz-meta-meta1"] = value

    client.meta.events.register("before-call.s3.PutObject", set_meta)
    return client


@pytest.mark.parametrize(
    "value", ["Hello World\xe9", "日本語", "=?UTF-8?B?SGVsbG8gV29ybGTDqQ==?=", "plain"]
)
def test_user_metadata_round_trips_as_s3_encodes_it(proxy: Any, bucket: str, value: str) -> None:
    from email.header import decode_header, make_header

    c = _with_raw_meta(proxy.client(), value)
    c.put_object(Bucket=bucket, Key="m", Body=b"m")
    got = c.get_object(Bucket=bucket, Key="m")["Metadata"]["meta1"]
    assert got == c.head_object(Bucket=bucket, Key="m")["Metadata"]["meta1"]
    # AWS S3: US-ASCII as is, anything else as an RFC 2047 encoded word of its UTF-8
    assert got.isascii()
    assert str(make_header(decode_header(got))) == str(make_header(decode_header(value)))
    if value.isascii():
        assert got == value
    listed = c.list_objects_v2(Bucket=bucket)["Contents"]
    assert [o["Key"] for o in listed] == ["m"]


def _uploads(client: Any, bucket: str) -> list[Any]:
    try:
        return list(client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))
    except ClientError as exc:  # rclone: NoSuchUpload when there is none
        assert exc.response["Error"]["Code"] == "NoSuchUpload"
        return []


def _chunks(data: bytes, size: int = 300_000) -> Any:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.mark.parametrize("size", [0, 1000, 5 * 1024 * 1024, 12 * 1024 * 1024 + 7])
def test_chunked_put_without_length_is_streamed(client: Any, bucket: str, size: int) -> None:
    """``Transfer-Encoding: chunked`` and no Content-Length (a streaming uploader): one PUT
    up to a part's worth, a backend multipart upload beyond."""
    import hashlib

    import requests

    data = hashlib.shake_256(b"%d" % size).digest(size)
    url = client.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": "u"})
    resp = requests.put(url, data=_chunks(data), timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.request.headers.get("transfer-encoding") == "chunked"
    assert resp.headers["x-amz-server-side-encryption"] == "aws:kms"
    got = client.get_object(Bucket=bucket, Key="u")
    assert got["ETag"] == resp.headers["etag"]
    assert hashlib.sha256(got["Body"].read()).digest() == hashlib.sha256(data).digest()
    assert client.head_object(Bucket=bucket, Key="u")["ContentLength"] == size
    assert _uploads(client, bucket) == []


def test_chunked_put_cut_short_stores_nothing(proxy: Any, client: Any, bucket: str) -> None:
    """A chunked body whose connection drops after more than a part: no object, no upload."""
    import socket
    from urllib.parse import urlsplit

    url = client.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": "cut"})
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port)) as s:
        s.sendall(
            f"PUT {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        chunk = b"z" * 1024 * 1024
        for _ in range(7):
            s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")

    def gone() -> bool:
        try:
            client.head_object(Bucket=bucket, Key="cut")
        except ClientError:
            return _uploads(client, bucket) == []
        return False

    from tests.servers import wait_until

    wait_until(gone, 30, "the cut upload aborted")


def test_curl_upload_from_stdin(proxy: Any, client: Any, bucket: str) -> None:
    """``curl -T -``: SigV4 by curl itself, chunked, no length; 6 MB spans two parts."""
    import hashlib
    import shutil
    import subprocess

    from tests.servers import CLIENT_AK, CLIENT_SK, REGION

    curl = shutil.which("curl")
    assert curl is not None
    data = hashlib.shake_256(b"curl").digest(6_000_000)
    done = subprocess.run(
        [
            curl,
            "-sS",
            "--fail-with-body",
            "-T",
            "-",
            "-H",
            "x-amz-content-sha256: UNSIGNED-PAYLOAD",
            "--aws-sigv4",
            f"aws:amz:{REGION}:s3",
            "--user",
            f"{CLIENT_AK}:{CLIENT_SK}",
            f"{proxy.endpoint}/{bucket}/from-stdin",
        ],
        input=data,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert client.get_object(Bucket=bucket, Key="from-stdin")["Body"].read() == data
