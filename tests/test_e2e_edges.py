"""Strict routing, odd keys in listings, and S3 errors for malformed input (issue 10, 2/7/8).

Requests go out over raw sockets (``tests.rawhttp``) so they reach the proxy exactly as
written: empty path segments, broken header lines and raw tabs survive no client library.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any
from urllib.parse import quote

import pytest
from botocore.exceptions import ClientError

from tests.rawhttp import Reply, exchange, signed
from tests.servers import ProxyThread, Server


def _host(proxy: ProxyThread) -> str:
    return proxy.endpoint.removeprefix("http://")


def _send(proxy: ProxyThread, method: str, target: str, body: bytes = b"", **kw: Any) -> Reply:
    host = _host(proxy)
    return exchange(host, signed(host, method, target, body, **kw), head=method == "HEAD")


def _s3_error(r: Reply, status: int, code: str) -> None:
    assert (r.status, r.code) == (status, code), r
    assert r.is_s3_xml(), r


def _buckets(direct: Any) -> set[str]:
    return {b["Name"] for b in direct.list_buckets()["Buckets"]}


# --------------------------------------------------------------------------- routing


def test_empty_bucket_segment_is_an_error_not_another_operation(
    proxy: ProxyThread, direct: Any, bucket: str
) -> None:
    before = _buckets(direct)
    for method, target in [
        ("PUT", f"//{bucket}/key"),
        ("GET", f"//{bucket}/key"),
        ("HEAD", f"//{bucket}/key"),
        ("DELETE", f"//{bucket}/key"),
        ("POST", f"//{bucket}/key?uploads"),
        ("PUT", "//"),
        ("GET", "//"),
    ]:
        r = _send(proxy, method, target, b"data" if method == "PUT" else b"")
        assert r.status == 400, (method, target, r)
        if method != "HEAD":
            _s3_error(r, 400, "InvalidBucketName")
    assert _buckets(direct) == before
    assert direct.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


@pytest.mark.parametrize(
    "target",
    ["/%2E%2E/key", "/./key", "/bad%2Fname/key", "/bad%5Cname/key", "/-x/key", "/a%00b/k"],
)
def test_bucket_names_that_address_something_else_refused(
    proxy: ProxyThread, target: str
) -> None:
    _s3_error(_send(proxy, "PUT", target, b"x"), 400, "InvalidBucketName")


def test_undecodable_path_is_invalid_uri(proxy: ProxyThread, bucket: str) -> None:
    _s3_error(_send(proxy, "PUT", f"/{bucket}/k%FF%FE", b"x"), 400, "InvalidURI")
    _s3_error(_send(proxy, "GET", f"/{bucket}?prefix=%FF"), 400, "InvalidURI")


def test_method_that_does_not_fit_the_target(proxy: ProxyThread, bucket: str) -> None:
    _s3_error(_send(proxy, "GET", f"/{bucket}?delete"), 405, "MethodNotAllowed")
    _s3_error(_send(proxy, "GET", f"/{bucket}?uploadId=x"), 405, "MethodNotAllowed")
    _s3_error(_send(proxy, "POST", "/", b""), 405, "MethodNotAllowed")
    _s3_error(_send(proxy, "DELETE", "/"), 405, "MethodNotAllowed")


# --------------------------------------------------------------------------- odd keys

ODD_KEYS = ["k\x01x", "k\x0bx", "k\x1fx", "k\x7fx", "k\ufffex", "k\uffffx", "k\tx", "k\x00x"]


def _odd_keys(backend: Server) -> list[str]:
    # moto's HTTP router cannot take a CR or LF in a path (it answers PUT with 404)
    return ODD_KEYS + (["k\r\nx", "k\rx", "k\nx"] if backend.name == "rclone" else [])


def test_listing_survives_keys_xml_cannot_hold(
    client: Any, proxy: ProxyThread, bucket: str, backend: Server
) -> None:
    keys = []
    for k in _odd_keys(backend):
        try:
            client.put_object(Bucket=bucket, Key=k, Body=k.encode())
        except ClientError as exc:  # Ceph RGW refuses some of them itself (InvalidRequest)
            assert backend.name == "ceph", exc
            continue
        keys.append(k)
    client.put_object(Bucket=bucket, Key="plain", Body=b"p")
    want = sorted([*keys, "plain"])
    # boto3 asks for encoding-type=url, as every SDK does
    listed = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(listed) == want
    listed = [o["Key"] for o in client.list_objects(Bucket=bucket)["Contents"]]
    assert sorted(listed) == want
    for k in keys:
        assert client.get_object(Bucket=bucket, Key=k)["Body"].read() == k.encode()
    # without encoding-type: 200 with the characters as character references, as S3 does
    for target in (f"/{bucket}", f"/{bucket}?list-type=2", f"/{bucket}?versions"):
        r = _send(proxy, "GET", target)
        if target.endswith("versions") and backend.name == "rclone":
            continue
        assert r.status == 200, r
        if backend.name == "moto":
            assert b"<Key>k&#x1;x</Key>" in r.body and b"<Key>k&#xfffe;x</Key>" in r.body
        elif backend.name == "rclone":  # Go's XML encoder sends U+FFFD: nothing to restore
            assert b"<Key>k&#xd;\nx</Key>" in r.body, r.body


# --------------------------------------------------------------------------- limits


def test_key_length_limit(client: Any, direct: Any, bucket: str) -> None:
    ok = "/".join(["d" * 203] * 5) + "/abcd"  # 1,024 bytes in segments a filesystem takes
    assert len(ok) == 1024
    client.put_object(Bucket=bucket, Key=ok, Body=b"x")
    for too_long in [ok + "k", ok[:-3] + "\u00e9\u00e9"]:  # bytes of UTF-8, not characters
        with pytest.raises(ClientError) as ei:
            client.put_object(Bucket=bucket, Key=too_long, Body=b"x")
        assert ei.value.response["Error"]["Code"] == "KeyTooLongError"
        with pytest.raises(ClientError) as ei:
            client.create_multipart_upload(Bucket=bucket, Key=too_long)
        assert ei.value.response["Error"]["Code"] == "KeyTooLongError"
    assert [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]] == [ok]
    stored = [o["Key"] for o in direct.list_objects_v2(Bucket=bucket)["Contents"]]
    assert [k for k in stored if not k.startswith(".cmek-proxy/")] == [ok]


def test_user_metadata_limit(client: Any, direct: Any, bucket: str) -> None:
    client.put_object(Bucket=bucket, Key="fits", Body=b"x", Metadata={"m": "v" * 1000})
    with pytest.raises(ClientError) as ei:
        client.put_object(Bucket=bucket, Key="big", Body=b"x", Metadata={"m": "v" * 2048})
    assert ei.value.response["Error"]["Code"] == "MetadataTooLarge"
    with pytest.raises(ClientError) as ei:
        client.create_multipart_upload(Bucket=bucket, Key="big", Metadata={"m": "v" * 2048})
    assert ei.value.response["Error"]["Code"] == "MetadataTooLarge"
    with pytest.raises(ClientError):
        direct.head_object(Bucket=bucket, Key="big")


def _delete_body(keys: list[str]) -> bytes:
    objs = "".join(f"<Object><Key>{k}</Key></Object>" for k in keys)
    return f"<Delete>{objs}</Delete>".encode()


def _md5(body: bytes) -> dict[str, str]:
    return {"Content-MD5": base64.b64encode(hashlib.md5(body).digest()).decode()}


BAD_DELETE_BODIES = {
    "empty": b"",
    "garbage": b"not xml at all",
    "truncated": b"<Delete><Object><Key>a</Key>",
    "wrong-root": b"<Remove><Object><Key>a</Key></Object></Remove>",
    "no-objects": b"<Delete><Quiet>true</Quiet></Delete>",
    "empty-key": b"<Delete><Object><Key></Key></Object></Delete>",
    "bad-quiet": b"<Delete><Quiet>maybe</Quiet><Object><Key>a</Key></Object></Delete>",
    "entity-expansion": (
        b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaaaaaaaa">'
        b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;">]>'
        b"<Delete><Object><Key>&c;</Key></Object></Delete>"
    ),
    "external-entity": (
        b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b"<Delete><Object><Key>&x;</Key></Object></Delete>"
    ),
    "external-dtd": (
        b'<?xml version="1.0"?><!DOCTYPE Delete SYSTEM "http://127.0.0.1:9/d.dtd">'
        b"<Delete><Object><Key>a</Key></Object></Delete>"
    ),
    "1001-keys": _delete_body([f"k{i}" for i in range(1001)]),
}


@pytest.mark.parametrize("name", list(BAD_DELETE_BODIES))
def test_malformed_delete_objects(
    proxy: ProxyThread, client: Any, direct: Any, bucket: str, name: str
) -> None:
    client.put_object(Bucket=bucket, Key="a", Body=b"x")
    body = BAD_DELETE_BODIES[name]
    r = _send(proxy, "POST", f"/{bucket}?delete", body, headers=_md5(body))
    _s3_error(r, 400, "MalformedXML")
    assert direct.head_object(Bucket=bucket, Key="a")["ContentLength"] > 0


def test_delete_objects_at_the_limit(proxy: ProxyThread, client: Any, bucket: str) -> None:
    client.put_object(Bucket=bucket, Key="k0", Body=b"x")
    body = _delete_body([f"k{i}" for i in range(1000)])
    r = _send(proxy, "POST", f"/{bucket}?delete", body, headers=_md5(body))
    assert r.status == 200 and r.body.count(b"<Deleted>") == 1000, r
    with pytest.raises(ClientError):
        client.head_object(Bucket=bucket, Key="k0")


@pytest.mark.parametrize(
    "body",
    [b"garbage", b"<Tagging><TagSet><Tag><Key>a</Key></Tag></TagSet></Tagging>", b"<Other/>"],
)
def test_malformed_tagging(proxy: ProxyThread, client: Any, bucket: str, body: bytes) -> None:
    client.put_object(Bucket=bucket, Key="t", Body=b"x")
    for target in (f"/{bucket}/t?tagging", f"/{bucket}?tagging"):
        reply = _send(proxy, "PUT", target, body, headers=_md5(body))
        if target.endswith("/t?tagging") and proxy.config.backend.envelope_store == "sidecar":
            _s3_error(reply, 501, "NotImplemented")  # rclone: object tagging refused at all
        else:
            _s3_error(reply, 400, "MalformedXML")


# --------------------------------------------------------------------------- the HTTP parser


def _raw(proxy: ProxyThread, data: bytes) -> Reply:
    return exchange(_host(proxy), data)


def test_parser_rejections_are_s3_xml(proxy: ProxyThread, bucket: str) -> None:
    host = _host(proxy).encode()
    head = b"GET /" + bucket.encode() + b"/k HTTP/1.1\r\nHost: " + host + b"\r\n"
    cases = {
        "oversized header": (head + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n", 400,
                             "RequestHeaderSectionTooLarge"),
        "oversized request line": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: h\r\n\r\n",
                                   400, "RequestHeaderSectionTooLarge"),
        "too many headers": (head + b"".join(b"X-%d: v\r\n" % i for i in range(200)) + b"\r\n",
                             400, "RequestHeaderSectionTooLarge"),
        "header section over 8 KB": (
            head + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 100) for i in range(90)) + b"\r\n",
            400, "RequestHeaderSectionTooLarge"),
        "malformed header line": (head + b"no colon here\r\n\r\n", 400, "InvalidRequest"),
        "raw tab in URL": (b"GET /" + bucket.encode() + b"/a\tb HTTP/1.1\r\nHost: h\r\n\r\n",
                           400, "InvalidURI"),
        "bad method": (b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n", 405, "MethodNotAllowed"),
        "bad chunk": (b"PUT /" + bucket.encode() + b"/k HTTP/1.1\r\nHost: h\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "InvalidRequest"),
    }
    for name, (data, status, code) in cases.items():
        r = _raw(proxy, data)
        assert (r.status, r.code, r.is_s3_xml()) == (status, code, True), (name, r)


def test_unrouted_path_is_s3_xml(proxy: ProxyThread, bucket: str) -> None:
    r = _send(proxy, "GET", f"/{bucket}/" + quote("a\r\nb"))
    _s3_error(r, 404, "NoSuchKey")


def test_no_wait_for_a_body_that_is_not_coming(
    proxy: ProxyThread, client: Any, bucket: str
) -> None:
    client.put_object(Bucket=bucket, Key="d", Body=b"x")
    chunked = {"Transfer-Encoding": "chunked"}
    host = _host(proxy)
    for method, target in [
        ("GET", f"/{bucket}/d?tagging"),
        ("GET", f"/{bucket}/x"),
        ("GET", f"/{bucket}"),
        ("HEAD", f"/{bucket}/d"),
        ("DELETE", f"/{bucket}/d"),
    ]:
        # the request ends after its headers; a 5 s deadline only catches a hang
        r = exchange(
            host, signed(host, method, target, headers=chunked), timeout=5, head=method == "HEAD"
        )
        assert r.status in (200, 204, 404), (method, target, r)
    with pytest.raises(ClientError):
        client.head_object(Bucket=bucket, Key="d")


def test_expect_other_than_100_continue_is_ignored(
    proxy: ProxyThread, client: Any, bucket: str
) -> None:
    client.put_object(Bucket=bucket, Key="e", Body=b"hello")
    r = _send(proxy, "GET", f"/{bucket}/e", headers={"Expect": "something-else"})
    assert (r.status, r.body) == (200, b"hello")
    r = _send(proxy, "PUT", f"/{bucket}/e2", b"body", headers={"Expect": "x"})
    assert r.status == 200
    assert client.get_object(Bucket=bucket, Key="e2")["Body"].read() == b"body"


# --------------------------------------------------------------------------- fuzzer findings


def test_header_bytes_that_are_not_utf8(proxy: ProxyThread, client: Any, bucket: str) -> None:
    """Found by tests/test_fuzz_http.py: a non-UTF-8 header byte made the proxy fail (500)
    forwarding it, or rendering an error message that quoted it."""
    client.put_object(Bucket=bucket, Key="h", Body=b"x")
    host = _host(proxy)
    for name in (b"x-amz-meta-a", b"Content-Type", b"If-Match"):
        req = signed(host, "PUT", f"/{bucket}/h2", b"body")
        req = req.replace(b"\r\n\r\n", b"\r\n" + name + b": \xff\xe0 v\r\n\r\n", 1)
        _s3_error(exchange(host, req), 400, "InvalidArgument")
    req = signed(host, "GET", f"/{bucket}/h").replace(b"aws4_request", b"aw\xc1_request")
    r = exchange(host, req)
    assert r.status == 400 and r.is_s3_xml() and r.code, r
    with pytest.raises(ClientError):
        client.head_object(Bucket=bucket, Key="h2")


def test_date_condition_that_is_no_date_is_ignored(
    proxy: ProxyThread, client: Any, bucket: str
) -> None:
    """Found by the fuzzer: ``If-Modified-Since: never`` reached moto, which answered 500."""
    client.put_object(Bucket=bucket, Key="c", Body=b"cond")
    for h in ("If-Modified-Since", "If-Unmodified-Since"):
        r = _send(proxy, "GET", f"/{bucket}/c", headers={h: "never"})
        assert (r.status, r.body) == (200, b"cond"), r
        r = _send(proxy, "HEAD", f"/{bucket}/c", headers={h: "31 Feb 20xx"})
        assert r.status == 200, r


@pytest.mark.parametrize("value", ["abc", "-5", "1.5", "99999999999", "", "\uff11"])
def test_counts_in_the_query_are_integers(
    proxy: ProxyThread, client: Any, bucket: str, value: str
) -> None:
    """moto answered ``max-keys=abc``, ``max-keys=-5`` and ``max-parts=abc`` with a 500."""
    up = client.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
    v = quote(value)
    for target in (
        f"/{bucket}?list-type=2&max-keys={v}",
        f"/{bucket}?max-keys={v}",
        f"/{bucket}?uploads&max-uploads={v}",
        f"/{bucket}/mp?uploadId={quote(up)}&max-parts={v}",
        f"/{bucket}/mp?uploadId={quote(up)}&part-number-marker={v}",
    ):
        _s3_error(_send(proxy, "GET", target), 400, "InvalidArgument")
    client.abort_multipart_upload(Bucket=bucket, Key="mp", UploadId=up)
