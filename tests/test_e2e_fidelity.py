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
