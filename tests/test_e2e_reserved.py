"""The reserved prefix is sealed on every path and in every spelling (issue 10, point 1).

Reserved state is planted straight into the backend (as the proxy itself would have written
it); then every way a client could name it through the proxy - DeleteObjects, copy sources,
multipart, listings of any position, subresources, and spellings a filesystem backend maps
onto ``.cmek-proxy/`` - is tried, and the state must still be there, unlisted and unread.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest
from botocore.exceptions import ClientError

from tests.rawhttp import exchange, signed
from tests.servers import ProxyThread, Server

SPELLINGS = [
    ".cmek-proxy/x",
    ".CMEK-PROXY/x",
    ".Cmek-Proxy/x",
    "a/../.cmek-proxy/x",
    "./.cmek-proxy/x",
    "/.cmek-proxy/x",
    "//.cmek-proxy/x",
    ".cmek-proxy\\x",
    "a\\..\\.cmek-proxy\\x",
    ".cmek-proxy./x",
    ".cmek-proxy",
    "../other-bucket/x",
    "a/../../x",
]


def _code(exc: ClientError) -> str:
    return str(exc.response["Error"]["Code"])


def _host(proxy: ProxyThread) -> str:
    return proxy.endpoint.removeprefix("http://")


def _plant(direct: Any, bucket: str, keys: list[str]) -> None:
    for k in keys:
        direct.put_object(Bucket=bucket, Key=k, Body=b"proxy state " + k.encode())


def _still_there(direct: Any, bucket: str, keys: list[str]) -> None:
    for k in keys:
        assert direct.get_object(Bucket=bucket, Key=k)["Body"].read() == b"proxy state " + (
            k.encode()
        )


# --------------------------------------------------------------------------- DeleteObjects


def test_delete_objects_refuses_reserved_keys(client: Any, direct: Any, bucket: str) -> None:
    state = [".cmek-proxy/uploads/u1", ".cmek-proxy/env/abc/etag", ".cmek-proxy/specs/s.json"]
    _plant(direct, bucket, state)
    client.put_object(Bucket=bucket, Key="plain", Body=b"data")
    objects = [{"Key": k} for k in [*state, *SPELLINGS, "plain"]]
    res = client.delete_objects(Bucket=bucket, Delete={"Objects": objects})
    assert [d["Key"] for d in res.get("Deleted", [])] == ["plain"]
    errors = {e["Key"]: e["Code"] for e in res["Errors"]}
    assert set(errors) == {*state, *SPELLINGS}
    assert set(errors.values()) == {"AccessDenied"}
    _still_there(direct, bucket, state)
    with pytest.raises(ClientError):
        direct.head_object(Bucket=bucket, Key="plain")


def test_delete_objects_quiet_reports_only_errors(client: Any, direct: Any, bucket: str) -> None:
    _plant(direct, bucket, [".cmek-proxy/x"])
    client.put_object(Bucket=bucket, Key="a", Body=b"1")
    res = client.delete_objects(
        Bucket=bucket,
        Delete={"Objects": [{"Key": "a"}, {"Key": ".cmek-proxy/x"}], "Quiet": True},
    )
    assert "Deleted" not in res
    assert [(e["Key"], e["Code"]) for e in res["Errors"]] == [(".cmek-proxy/x", "AccessDenied")]
    _still_there(direct, bucket, [".cmek-proxy/x"])


def test_delete_objects_only_reserved_never_reaches_backend(
    client: Any, direct: Any, bucket: str
) -> None:
    _plant(direct, bucket, [".cmek-proxy/a"])
    res = client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": ".cmek-proxy/a"}]})
    assert [e["Code"] for e in res["Errors"]] == ["AccessDenied"]
    _still_there(direct, bucket, [".cmek-proxy/a"])


def test_sidecar_envelope_survives_delete_objects(
    client: Any, direct: Any, bucket: str, backend: Server
) -> None:
    """The data-loss case of the issue: deleting a sidecar envelope made an object unreadable."""
    client.put_object(Bucket=bucket, Key="obj", Body=b"precious")
    listing = direct.list_objects_v2(Bucket=bucket, Prefix=".cmek-proxy/")
    internal = [o["Key"] for o in listing.get("Contents", [])]
    if backend.name == "rclone":
        assert internal, "rclone runs with sidecar envelopes"
    internal.append(".cmek-proxy/env/")
    res = client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in internal]})
    assert {e["Code"] for e in res["Errors"]} == {"AccessDenied"}
    assert client.get_object(Bucket=bucket, Key="obj")["Body"].read() == b"precious"


# --------------------------------------------------------------------------- single requests


@pytest.mark.parametrize("key", SPELLINGS)
def test_every_spelling_refused_on_every_method(
    proxy: ProxyThread, direct: Any, bucket: str, key: str
) -> None:
    host = _host(proxy)
    path = f"/{bucket}/{quote(key, safe='')}"
    for method, target, body in [
        ("PUT", path, b"x"),
        ("GET", path, b""),
        ("DELETE", path, b""),
        ("PUT", path + "?tagging", b""),
        ("GET", path + "?acl", b""),
        ("POST", path + "?uploads", b""),
        ("PUT", path + "?partNumber=1&uploadId=u", b"x"),
        ("POST", path + "?uploadId=u", b""),
    ]:
        r = exchange(host, signed(host, method, target, body))
        assert r.status == 403 and r.code == "AccessDenied", (method, target, r)
    r = exchange(host, signed(host, "HEAD", path), head=True)
    assert r.status == 403
    assert direct.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


@pytest.mark.parametrize(
    "source", [".cmek-proxy/x", ".CMEK-PROXY/x", "a/../.cmek-proxy/x", "../cmek-control/x"]
)
def test_copy_source_in_any_spelling_refused(
    client: Any, direct: Any, bucket: str, source: str
) -> None:
    _plant(direct, bucket, [".cmek-proxy/x"])
    expected = "AccessDenied"
    with pytest.raises(ClientError) as ei:
        client.copy_object(
            Bucket=bucket, Key="stolen", CopySource={"Bucket": bucket, "Key": source}
        )
    assert _code(ei.value) == expected
    up = client.create_multipart_upload(Bucket=bucket, Key="stolen-mp")
    with pytest.raises(ClientError) as ei:
        client.upload_part_copy(
            Bucket=bucket,
            Key="stolen-mp",
            UploadId=up["UploadId"],
            PartNumber=1,
            CopySource={"Bucket": bucket, "Key": source},
        )
    assert _code(ei.value) == expected
    client.abort_multipart_upload(Bucket=bucket, Key="stolen-mp", UploadId=up["UploadId"])
    with pytest.raises(ClientError):
        direct.head_object(Bucket=bucket, Key="stolen")


# --------------------------------------------------------------------------- listings

CLIENT_KEYS = ["-a", ".cmek-proxx", ".cmek-proxy0", "a", "b/c", "z"]
STATE = [f".cmek-proxy/env/{i:02d}/e" for i in range(6)] + [".cmek-proxy/uploads/u"]


@pytest.fixture
def mixed(client: Any, direct: Any, bucket: str) -> str:
    for k in CLIENT_KEYS:
        client.put_object(Bucket=bucket, Key=k, Body=b"v")
    _plant(direct, bucket, STATE)
    return bucket


def _keys_v2(client: Any, bucket: str, **kw: Any) -> tuple[list[str], list[str]]:
    keys: list[str] = []
    prefixes: list[str] = []
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, **kw)
    for page in pages:
        keys += [o["Key"] for o in page.get("Contents", [])]
        prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        assert page.get("KeyCount", 0) == len(page.get("Contents", [])) + len(
            page.get("CommonPrefixes", [])
        )
        if page["IsTruncated"]:
            assert page.get("KeyCount", 0) > 0, "a truncated page must carry entries"
    return keys, prefixes


def _keys_v1(client: Any, bucket: str, **kw: Any) -> tuple[list[str], list[str]]:
    keys: list[str] = []
    prefixes: list[str] = []
    for page in client.get_paginator("list_objects").paginate(Bucket=bucket, **kw):
        keys += [o["Key"] for o in page.get("Contents", [])]
        prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        if page["IsTruncated"]:
            assert page.get("Contents") or page.get("CommonPrefixes")
            assert not page.get("NextMarker", "").startswith(".cmek-proxy/")
    return keys, prefixes


@pytest.mark.parametrize("page_size", [1, 2, 3, 1000])
def test_listing_pages_skip_reserved_range(client: Any, mixed: str, page_size: int) -> None:
    cfg = {"PaginationConfig": {"PageSize": page_size}}
    assert _keys_v2(client, mixed, **cfg) == (CLIENT_KEYS, [])
    assert _keys_v1(client, mixed, **cfg) == (CLIENT_KEYS, [])
    top = ["-a", ".cmek-proxx", ".cmek-proxy0", "a", "z"]
    assert _keys_v2(client, mixed, Delimiter="/", **cfg) == (top, ["b/"])
    keys, prefixes = _keys_v1(client, mixed, Delimiter="/", **cfg)
    assert keys == top and set(prefixes) == {"b/"}  # moto repeats prefixes on V1 pages


@pytest.mark.parametrize(
    "kw",
    [
        {"Prefix": ".cmek-proxy/"},
        {"Prefix": ".cmek-proxy/env/"},
        {"Prefix": ".CMEK-PROXY/"},
        {"Prefix": ".cmek-proxy"},
        {"StartAfter": ".cmek-proxy/"},
        {"StartAfter": ".cmek-proxy/env/02"},
        {"Prefix": ".cmek-proxy/", "Delimiter": "/"},
    ],
)
def test_listing_any_position_hides_reserved(client: Any, mixed: str, kw: dict[str, str]) -> None:
    keys, prefixes = _keys_v2(client, mixed, PaginationConfig={"PageSize": 2}, **kw)
    assert not [k for k in keys + prefixes if k.lower().startswith(".cmek-proxy/")]
    if "StartAfter" in kw:
        assert keys == [k for k in CLIENT_KEYS if k > kw["StartAfter"]]
    v1 = {k: v for k, v in kw.items() if k != "StartAfter"}
    if "StartAfter" in kw:
        v1["Marker"] = kw["StartAfter"]
    keys, prefixes = _keys_v1(client, mixed, PaginationConfig={"PageSize": 2}, **v1)
    assert not [k for k in keys + prefixes if k.lower().startswith(".cmek-proxy/")]


def test_forged_continuation_token_refused(proxy: ProxyThread, mixed: str) -> None:
    import base64

    host = _host(proxy)
    for token in [
        base64.b64encode(b".cmek-proxy/").decode(),
        base64.b64encode(b".cmek-proxy/env/00/e").decode(),
        "garbage!!",
        "",
    ]:
        target = f"/{mixed}?list-type=2&continuation-token={quote(token, safe='')}"
        r = exchange(host, signed(host, "GET", target))
        assert r.status == 400 and r.code == "InvalidArgument", (token, r)


def test_tokens_the_proxy_issued_work(client: Any, mixed: str) -> None:
    first = client.list_objects_v2(Bucket=mixed, MaxKeys=2)
    token = first["NextContinuationToken"]
    second = client.list_objects_v2(Bucket=mixed, MaxKeys=2, ContinuationToken=token)
    assert second["ContinuationToken"] == token
    assert [o["Key"] for o in first["Contents"] + second["Contents"]] == CLIENT_KEYS[:4]


def test_multipart_uploads_listing_hides_reserved(
    client: Any, direct: Any, bucket: str, backend: Server
) -> None:
    up = direct.create_multipart_upload(Bucket=bucket, Key=".cmek-proxy/jobs/tmp/x")
    mine = client.create_multipart_upload(Bucket=bucket, Key="mine")
    try:
        listing = client.list_multipart_uploads(Bucket=bucket)
        assert [u["Key"] for u in listing.get("Uploads", [])] == ["mine"]
        listing = client.list_multipart_uploads(Bucket=bucket, Prefix=".cmek-proxy/")
        assert listing.get("Uploads", []) == []
    finally:
        direct.abort_multipart_upload(
            Bucket=bucket, Key=".cmek-proxy/jobs/tmp/x", UploadId=up["UploadId"]
        )
        client.abort_multipart_upload(Bucket=bucket, Key="mine", UploadId=mine["UploadId"])


def test_versions_listing_hides_reserved(
    client: Any, direct: Any, bucket: str, backend: Server
) -> None:
    if backend.name != "moto":
        pytest.skip("rclone serve s3 has no object versions")
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    _plant(direct, bucket, [".cmek-proxy/a", ".cmek-proxy/b"])
    direct.delete_object(Bucket=bucket, Key=".cmek-proxy/b")  # a reserved delete marker
    client.put_object(Bucket=bucket, Key="v", Body=b"1")
    for page_size in (1, 1000):
        versions: list[str] = []
        markers: list[str] = []
        pages = client.get_paginator("list_object_versions").paginate(
            Bucket=bucket, PaginationConfig={"PageSize": page_size}
        )
        for page in pages:
            versions += [v["Key"] for v in page.get("Versions", [])]
            markers += [m["Key"] for m in page.get("DeleteMarkers", [])]
        assert versions == ["v"] and markers == []
