"""The naming rules of proxy.wire.names, case by case (the end-to-end tests use them too)."""

from __future__ import annotations

import pytest

from proxy.errors import S3Error
from proxy.wire.names import check_bucket, check_key, is_reserved_name

REFUSED = {
    ".cmek-proxy/x": "AccessDenied",
    ".cmek-proxy": "AccessDenied",
    ".CMEK-proxy/env/a": "AccessDenied",
    "a/../.cmek-proxy/x": "AccessDenied",
    "a/b/../../.cmek-proxy/x": "AccessDenied",
    "./.cmek-proxy/x": "AccessDenied",
    "/.cmek-proxy/x": "AccessDenied",
    "//.cmek-proxy//x": "AccessDenied",
    ".cmek-proxy\\x": "AccessDenied",
    "x\\..\\.cmek-proxy": "AccessDenied",
    ".cmek-proxy./x": "AccessDenied",
    ".cmek-proxy /x": "AccessDenied",
    "../x": "AccessDenied",
    "a/../../x": "AccessDenied",
    "..": "AccessDenied",
    ".": "InvalidArgument",
    "/": "InvalidArgument",
    "./": "InvalidArgument",
    "k" * 1025: "KeyTooLongError",
    "\u00e9" * 513: "KeyTooLongError",
}
ALLOWED = [
    "a", "k" * 1024, "\u00e9" * 512, ".cmek-proxx/x", ".cmek-proxy0", "a/.cmek-proxy/x",
    "x.cmek-proxy/", "a//b", "a/./b", "a/../b", "a/", "-", "k\x01x", "k\ufffe", "a\\b",
]


@pytest.mark.parametrize("key", list(REFUSED))
def test_refused_keys(key: str) -> None:
    with pytest.raises(S3Error) as ei:
        check_key(key)
    assert ei.value.code == REFUSED[key]


@pytest.mark.parametrize("key", ALLOWED)
def test_allowed_keys(key: str) -> None:
    check_key(key)
    assert not is_reserved_name(key)


@pytest.mark.parametrize("bucket", ["", ".", "..", "-a", "a/b", "a\\b", "a%2Fb", "a\x00", "é"])
def test_refused_buckets(bucket: str) -> None:
    with pytest.raises(S3Error) as ei:
        check_bucket(bucket)
    assert ei.value.code == "InvalidBucketName"


@pytest.mark.parametrize("bucket", ["abc", "my.bucket-1", "A_legacy", "cmek-control"])
def test_allowed_buckets(bucket: str) -> None:
    check_bucket(bucket)
