"""SigV4 verification and signing, checked against botocore's own signer."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, urlsplit

import boto3
import botocore.auth
import botocore.crt.auth
import pytest
from aiohttp import web
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials as BotoCredentials
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import S3Error
from proxy.wire.sigv4 import (
    Credentials,
    PayloadMode,
    RequestView,
    SigningKeyCache,
    VerifiedAuth,
    _canonical_query,
    canonical_query_string,
    canonical_request,
    parse_authorization,
    parse_query,
    sign_headers,
    signing_key,
    verify_header_auth,
    verify_presigned,
    verify_request,
)

ACCESS = "AKIDEXAMPLE0000001"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
CREDS = Credentials(ACCESS, SECRET)
REGION = "eu-west-1"
NOW = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
ENDPOINT = "http://127.0.0.1:9000"
BUCKET = "bucket-1"

TRICKY_KEYS = [
    "plain.txt",
    "with space/and  two",
    "ünïcødé/文件.bin",
    "a+b=c&d",
    "100%/percent%20literal",
    "tilde~/x",
    "double//slash",
    "trailing/",
    "star*paren()!'",
    "semi;colon,comma:colon@at$dollar",
]


def lookup(access_key: str) -> Credentials | None:
    return CREDS if access_key == ACCESS else None


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fix the clock of botocore's Python signers and of its CRT (awscrt) signers."""

    def fixed(remove_tzinfo: bool = True) -> datetime:
        return NOW.replace(tzinfo=None) if remove_tzinfo else NOW

    monkeypatch.setattr(botocore.auth, "get_current_datetime", fixed)
    monkeypatch.setattr(botocore.crt.auth, "get_current_datetime", fixed)
    yield


def botocore_sign(
    method: str,
    url: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    *,
    secret: str = SECRET,
    region: str = REGION,
) -> AWSRequest:
    request = AWSRequest(method=method, url=url, headers=dict(headers or {}), data=body)
    botocore.auth.S3SigV4Auth(BotoCredentials(ACCESS, secret), "s3", region).add_auth(request)
    return request


def view_of(request: AWSRequest) -> RequestView:
    split = urlsplit(request.url)
    headers = {k.lower(): v for k, v in request.headers.items()}
    headers.setdefault("host", split.netloc)
    return RequestView(request.method, split.path, split.query, headers)


def object_url(key: str, query: str = "") -> str:
    url = f"{ENDPOINT}/{BUCKET}/{quote(key, safe='/~')}"
    return f"{url}?{query}" if query else url


def expect_error(code: str, status: int, fn: object, *args: object, **kwargs: object) -> S3Error:
    assert callable(fn)
    with pytest.raises(S3Error) as info:
        fn(*args, **kwargs)
    err = info.value
    assert (err.code, err.status) == (code, status), (err.code, err.message)
    text = f"{err} {err.message} {err.extra} {err.headers}"
    assert SECRET not in text
    return err


# ---------------------------------------------------------------- header auth


@pytest.mark.parametrize("key", TRICKY_KEYS)
def test_botocore_signed_object_requests_verify(fixed_clock: None, key: str) -> None:
    body = b"hello world"
    request = botocore_sign(
        "PUT",
        object_url(key),
        {"Content-Type": "text/plain", "X-Amz-Meta-Note": "  spaced   value  "},
        body,
    )
    auth = verify_header_auth(view_of(request), lookup, now=NOW, region=REGION)
    assert auth.access_key == ACCESS
    assert (auth.date, auth.region, auth.service) == ("20260304", REGION, "s3")
    assert auth.payload_hash == hashlib.sha256(body).hexdigest()
    assert auth.payload_mode is PayloadMode.SHA256
    assert auth.amz_date == "20260304T050607Z"
    assert auth.signing_key == signing_key(SECRET, "20260304", REGION, "s3")
    assert auth.seed_signature == parse_authorization(request.headers["Authorization"]).signature
    assert SECRET not in repr(auth) and auth.seed_signature not in repr(auth)


@pytest.mark.parametrize(
    "query",
    [
        "list-type=2&prefix=a%20b%2Fc&delimiter=%2F",
        "uploads",
        "uploadId=abc&partNumber=3",
        "list-type=2&prefix=&max-keys=10&start-after=%C3%BC",
        "versions&key-marker=k%2Bplus&version-id-marker=",
        "tagging=",
        "a=2&a=1&b~=~x",
    ],
)
def test_botocore_signed_queries_verify(fixed_clock: None, query: str) -> None:
    request = botocore_sign("GET", f"{ENDPOINT}/{BUCKET}?{query}")
    verify_header_auth(view_of(request), lookup, now=NOW)


def test_plus_in_query_is_space(fixed_clock: None) -> None:
    # minio-go / Go url.Values put '+' on the wire for a space and sign %20.
    signed = botocore_sign("GET", f"{ENDPOINT}/{BUCKET}?prefix=a%20b")
    view = replace(view_of(signed), raw_query="prefix=a+b")
    verify_header_auth(view, lookup, now=NOW)


def test_multidict_headers_are_accepted(fixed_clock: None) -> None:
    request = botocore_sign("GET", object_url("k"), {"X-Amz-Meta-A": "1"})
    view = view_of(request)
    proxy = CIMultiDictProxy(CIMultiDict({k.title(): v for k, v in view.headers.items()}))
    verify_header_auth(replace(view, headers=proxy), lookup, now=NOW)


def test_signing_key_cache_reuses_keys(fixed_clock: None) -> None:
    cache = SigningKeyCache(max_entries=2)
    request = botocore_sign("GET", object_url("k"))
    for _ in range(3):
        verify_header_auth(view_of(request), lookup, now=NOW, key_cache=cache)
    assert len(cache) == 1
    cache.get(SECRET, "20260305", REGION, "s3")
    cache.get(SECRET, "20260306", REGION, "s3")
    assert len(cache) == 2
    assert cache.get(SECRET, "20260304", REGION, "s3") == signing_key(
        SECRET, "20260304", REGION, "s3"
    )


@dataclass
class Mutation:
    name: str
    code: str
    status: int
    view: RequestView | None = None
    now: datetime = NOW
    secret: str = SECRET
    region: str | None = REGION
    extra: dict[str, str] = field(default_factory=dict)


def _mutations(view: RequestView) -> list[Mutation]:
    h = dict(view.headers)

    def with_headers(**changes: str | None) -> RequestView:
        new = dict(h)
        for name, value in changes.items():
            name = name.replace("_", "-")
            if value is None:
                new.pop(name, None)
            else:
                new[name] = value
        return replace(view, headers=new)

    auth = h["authorization"]
    return [
        Mutation("method", "SignatureDoesNotMatch", 403, replace(view, method="POST")),
        Mutation("path", "SignatureDoesNotMatch", 403, replace(view, raw_path=view.raw_path + "x")),
        Mutation(
            "path-encoding",
            "SignatureDoesNotMatch",
            403,
            replace(view, raw_path=view.raw_path.replace("/", "%2F", 2).replace("%2F", "/", 1)),
        ),
        Mutation("query", "SignatureDoesNotMatch", 403, replace(view, raw_query="x=1")),
        Mutation("header", "SignatureDoesNotMatch", 403, with_headers(x_amz_meta_note="other")),
        Mutation("host", "SignatureDoesNotMatch", 403, with_headers(host="evil.example")),
        Mutation(
            "body-hash",
            "SignatureDoesNotMatch",
            403,
            with_headers(x_amz_content_sha256=hashlib.sha256(b"other").hexdigest()),
        ),
        Mutation(
            "unsigned-payload",
            "SignatureDoesNotMatch",
            403,
            with_headers(x_amz_content_sha256="UNSIGNED-PAYLOAD"),
        ),
        Mutation("skew-late", "RequestTimeTooSkewed", 403, now=NOW + timedelta(minutes=16)),
        Mutation("skew-early", "RequestTimeTooSkewed", 403, now=NOW - timedelta(minutes=16)),
        Mutation("wrong-secret", "SignatureDoesNotMatch", 403, secret=SECRET[:-1] + "X"),
        Mutation(
            "unknown-key",
            "InvalidAccessKeyId",
            403,
            with_headers(authorization=auth.replace(ACCESS, "AKIDUNKNOWN")),
        ),
        Mutation("unsigned-x-amz", "AccessDenied", 403, with_headers(x_amz_acl="public-read")),
        Mutation("no-auth", "AccessDenied", 403, with_headers(authorization=None)),
        Mutation("region", "AuthorizationHeaderMalformed", 400, region="us-west-2"),
        Mutation(
            "service",
            "AuthorizationHeaderMalformed",
            400,
            with_headers(authorization=auth.replace("/s3/", "/ec2/")),
        ),
        Mutation(
            "terminator",
            "AuthorizationHeaderMalformed",
            400,
            with_headers(authorization=auth.replace("aws4_request", "aws5_request")),
        ),
        Mutation(
            "no-signed-headers",
            "AuthorizationHeaderMalformed",
            400,
            with_headers(authorization=auth.split(", SignedHeaders")[0]),
        ),
        Mutation(
            "garbage",
            "AuthorizationHeaderMalformed",
            400,
            with_headers(authorization="AWS4-HMAC-SHA256 garbage"),
        ),
        Mutation("sigv2", "InvalidRequest", 400, with_headers(authorization=f"AWS {ACCESS}:abc=")),
        Mutation(
            "sigv4a",
            "NotImplemented",
            501,
            with_headers(authorization=auth.replace("AWS4-HMAC-SHA256", "AWS4-ECDSA-P256-SHA256")),
        ),
        Mutation(
            "ecdsa-payload",
            "NotImplemented",
            501,
            with_headers(x_amz_content_sha256="STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD"),
        ),
        Mutation("bad-payload", "InvalidArgument", 400, with_headers(x_amz_content_sha256="abc")),
        Mutation("no-payload", "InvalidRequest", 400, with_headers(x_amz_content_sha256=None)),
        Mutation("no-date", "AccessDenied", 403, with_headers(x_amz_date=None)),
        Mutation("bad-date", "AccessDenied", 403, with_headers(x_amz_date="2026-03-04")),
        Mutation(
            "scope-date",
            "AuthorizationHeaderMalformed",
            400,
            with_headers(x_amz_date="20260303T235959Z"),
            now=datetime(2026, 3, 4, 0, 0, tzinfo=UTC),
        ),
        Mutation(
            "short-signature",
            "SignatureDoesNotMatch",
            403,
            with_headers(authorization=auth[:-1]),
        ),
    ]


def test_header_auth_mutations(fixed_clock: None) -> None:
    request = botocore_sign(
        "PUT",
        object_url("dir/obj key"),
        {"X-Amz-Meta-Note": "v", "Content-Type": "application/octet-stream"},
        b"data",
    )
    view = view_of(request)
    verify_header_auth(view, lookup, now=NOW, region=REGION)
    signature = parse_authorization(view.headers["authorization"]).signature
    names = set()
    for m in _mutations(view):
        names.add(m.name)

        def look(access_key: str, m: Mutation = m) -> Credentials | None:
            return Credentials(ACCESS, m.secret) if access_key == ACCESS else None

        err = expect_error(
            m.code,
            m.status,
            verify_request,
            m.view or view,
            look,
            now=m.now,
            region=m.region,
        )
        assert signature not in f"{err} {err.extra}", m.name
    assert len(names) == len(_mutations(view))


def test_unsigned_host_and_date_rejected(fixed_clock: None) -> None:
    request = botocore_sign("GET", object_url("k"))
    view = view_of(request)
    auth = parse_authorization(view.headers["authorization"])
    for drop in ("host", "x-amz-date"):
        signed = [n for n in auth.signed_headers if n != drop]
        headers = dict(view.headers)
        headers["authorization"] = view.headers["authorization"].replace(
            ";".join(auth.signed_headers), ";".join(signed)
        )
        err = expect_error(
            "AccessDenied", 403, verify_header_auth, replace(view, headers=headers), lookup, now=NOW
        )
        assert drop in err.extra["HeadersNotSigned"]


def test_date_header_instead_of_x_amz_date(fixed_clock: None) -> None:
    request = botocore_sign("GET", object_url("k"), {"Date": "Wed, 01 Jan 2020 00:00:00 GMT"})
    assert "X-Amz-Date" not in request.headers
    auth = verify_header_auth(view_of(request), lookup, now=NOW)
    assert auth.amz_date == "20260304T050607Z"


def test_parse_authorization() -> None:
    sig = "a" * 64
    auth = parse_authorization(
        f"AWS4-HMAC-SHA256 Credential={ACCESS}/20260304/us-east-1/s3/aws4_request,"
        f"SignedHeaders=host;x-amz-content-sha256;x-amz-date,Signature={sig}"
    )
    assert auth.access_key == ACCESS
    assert auth.signed_headers == ("host", "x-amz-content-sha256", "x-amz-date")
    assert auth.scope == "20260304/us-east-1/s3/aws4_request"
    assert sig not in repr(auth)
    for bad in (
        f"AWS4-HMAC-SHA256 Credential={ACCESS}/2026034/us-east-1/s3/aws4_request, "
        f"SignedHeaders=host, Signature={sig}",
        f"AWS4-HMAC-SHA256 Credential={ACCESS}/20260304/us-east-1/s3, "
        f"SignedHeaders=host, Signature={sig}",
        f"AWS4-HMAC-SHA256 Credential={ACCESS}/20260304/us-east-1/s3/aws4_request, "
        f"SignedHeaders=Host, Signature={sig}",
        f"AWS4-HMAC-SHA256 Credential={ACCESS}/20260304/us-east-1/s3/aws4_request, "
        f"Credential=x, SignedHeaders=host, Signature={sig}",
    ):
        expect_error("AuthorizationHeaderMalformed", 400, parse_authorization, bad)


@pytest.mark.parametrize(
    "value,mode",
    [
        ("UNSIGNED-PAYLOAD", PayloadMode.UNSIGNED),
        ("STREAMING-UNSIGNED-PAYLOAD-TRAILER", PayloadMode.STREAMING_UNSIGNED_TRAILER),
        ("STREAMING-AWS4-HMAC-SHA256-PAYLOAD", PayloadMode.STREAMING_SIGNED),
        ("STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER", PayloadMode.STREAMING_SIGNED_TRAILER),
    ],
)
def test_payload_modes(fixed_clock: None, value: str, mode: PayloadMode) -> None:
    # botocore's S3SigV4Auth always recomputes x-amz-content-sha256, so these modes are
    # signed with sign_headers (itself cross-checked against botocore below).
    url = object_url("k")
    added = sign_headers("PUT", url, {}, value, CREDS, REGION, now=NOW)
    view = RequestView("PUT", urlsplit(url).path, "", added)
    auth = verify_header_auth(view, lookup, now=NOW)
    assert auth.payload_mode is mode
    assert auth.chunk_signing().seed_signature == auth.seed_signature


# ------------------------------------------------------------ presigned URLs


def presign_client() -> object:
    return boto3.client(
        "s3",
        endpoint_url=ENDPOINT,
        region_name=REGION,
        aws_access_key_id=ACCESS,
        aws_secret_access_key=SECRET,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )


def presigned_view(url: str, method: str, headers: dict[str, str] | None = None) -> RequestView:
    split = urlsplit(url)
    all_headers = {"host": split.netloc, **(headers or {})}
    return RequestView(method, split.path, split.query, all_headers)


@pytest.mark.parametrize("key", TRICKY_KEYS)
def test_boto3_presigned_urls_verify(fixed_clock: None, key: str) -> None:
    client = presign_client()
    for method, op, params in (
        ("GET", "get_object", {"Bucket": BUCKET, "Key": key}),
        ("PUT", "put_object", {"Bucket": BUCKET, "Key": key}),
        (
            "GET",
            "get_object",
            {"Bucket": BUCKET, "Key": key, "ResponseContentDisposition": 'attachment; f="a b"'},
        ),
    ):
        url = client.generate_presigned_url(op, Params=params, ExpiresIn=900)  # type: ignore[attr-defined]
        auth = verify_presigned(presigned_view(url, method), lookup, NOW, region=REGION)
        assert auth.presigned and auth.payload_mode is PayloadMode.UNSIGNED
        assert auth.payload_hash == "UNSIGNED-PAYLOAD"
        verify_request(presigned_view(url, method), lookup, now=NOW + timedelta(seconds=900))


def test_boto3_presigned_list_verifies(fixed_clock: None) -> None:
    client = presign_client()
    url = client.generate_presigned_url(  # type: ignore[attr-defined]
        "list_objects_v2", Params={"Bucket": BUCKET, "Prefix": "a b/ü+", "Delimiter": "/"}
    )
    assert "list-type=2" in url
    verify_presigned(presigned_view(url, "GET"), lookup, NOW)


def test_query_auth_signer_with_headers(fixed_clock: None) -> None:
    request = AWSRequest(
        method="PUT",
        url=object_url("k k") + "?x-id=PutObject",
        headers={"X-Amz-Meta-A": "b", "Content-Type": "text/plain"},
    )
    botocore.auth.S3SigV4QueryAuth(BotoCredentials(ACCESS, SECRET), "s3", REGION, 60).add_auth(
        request
    )
    split = urlsplit(request.url)
    headers = {k.lower(): v for k, v in request.headers.items()} | {"host": split.netloc}
    view = RequestView("PUT", split.path, split.query, headers)
    verify_presigned(view, lookup, NOW)
    expect_error(
        "SignatureDoesNotMatch",
        403,
        verify_presigned,
        replace(view, headers=headers | {"x-amz-meta-a": "c"}),
        lookup,
        NOW,
    )


def test_presigned_mutations(fixed_clock: None) -> None:
    client = presign_client()
    url = client.generate_presigned_url(  # type: ignore[attr-defined]
        "get_object", Params={"Bucket": BUCKET, "Key": "x y"}, ExpiresIn=600
    )
    view = presigned_view(url, "GET")
    sig = dict(p.split("=", 1) for p in view.raw_query.split("&"))["X-Amz-Signature"]

    def q(old: str, new: str) -> RequestView:
        assert old in view.raw_query
        return replace(view, raw_query=view.raw_query.replace(old, new))

    cases: list[tuple[RequestView, datetime, str, int, str | None]] = [
        (view, NOW + timedelta(seconds=601), "AccessDenied", 403, "Request has expired"),
        (view, NOW - timedelta(minutes=16), "AccessDenied", 403, "Request is not valid yet"),
        (replace(view, method="PUT"), NOW, "SignatureDoesNotMatch", 403, None),
        (replace(view, raw_path=view.raw_path + "z"), NOW, "SignatureDoesNotMatch", 403, None),
        (q("X-Amz-Expires=600", "X-Amz-Expires=6000"), NOW, "SignatureDoesNotMatch", 403, None),
        (
            q("X-Amz-Expires=600", "X-Amz-Expires=604801"),
            NOW,
            "AuthorizationQueryParametersError",
            400,
            None,
        ),
        (
            q("X-Amz-Expires=600", "X-Amz-Expires=0"),
            NOW,
            "AuthorizationQueryParametersError",
            400,
            None,
        ),
        (
            q("X-Amz-Expires=600", "X-Amz-Expires=abc"),
            NOW,
            "AuthorizationQueryParametersError",
            400,
            None,
        ),
        (q("X-Amz-Expires=600&", ""), NOW, "AuthorizationQueryParametersError", 400, None),
        (q(ACCESS, "AKIDUNKNOWN"), NOW, "InvalidAccessKeyId", 403, None),
        (q(REGION, "us-west-2"), NOW, "AuthorizationQueryParametersError", 400, None),
        (q("AWS4-HMAC-SHA256", "AWS4-ECDSA-P256-SHA256"), NOW, "NotImplemented", 501, None),
        (q(sig, "0" * 64), NOW, "SignatureDoesNotMatch", 403, None),
        (
            replace(view, raw_query=view.raw_query + "&extra=1"),
            NOW,
            "SignatureDoesNotMatch",
            403,
            None,
        ),
        (
            replace(view, headers={**view.headers, "x-amz-acl": "private"}),
            NOW,
            "AccessDenied",
            403,
            None,
        ),
        (
            replace(view, headers={**view.headers, "authorization": "AWS4-HMAC-SHA256 x"}),
            NOW,
            "InvalidArgument",
            400,
            None,
        ),
    ]
    for mutated, now, code, status, message in cases:
        err = expect_error(code, status, verify_request, mutated, lookup, now=now, region=REGION)
        assert sig not in f"{err} {err.extra}"
        if message is not None:
            assert err.message == message


def test_presigned_with_content_sha256(fixed_clock: None) -> None:
    body_hash = hashlib.sha256(b"body").hexdigest()
    url = object_url("k")
    request = AWSRequest(method="PUT", url=url, headers={"X-Amz-Content-SHA256": body_hash})
    botocore.auth.S3SigV4QueryAuth(BotoCredentials(ACCESS, SECRET), "s3", REGION, 60).add_auth(
        request
    )
    view = presigned_view(request.url, "PUT", {"x-amz-content-sha256": body_hash})
    auth = verify_presigned(view, lookup, NOW)
    assert auth.payload_mode is PayloadMode.SHA256 and auth.payload_hash == body_hash
    other = hashlib.sha256(b"other").hexdigest()
    expect_error(
        "SignatureDoesNotMatch",
        403,
        verify_presigned,
        replace(view, headers={**view.headers, "x-amz-content-sha256": other}),
        lookup,
        NOW,
    )


# ---------------------------------------------------------------- signing


@pytest.mark.parametrize("key", TRICKY_KEYS)
@pytest.mark.parametrize(
    "query", ["", "uploadId=u1&partNumber=2", "list-type=2&prefix=a%20b&delimiter=%2F", "acl"]
)
def test_sign_headers_matches_botocore(fixed_clock: None, key: str, query: str) -> None:
    body = key.encode() * 3
    url = object_url(key, query)
    headers = {
        "Content-Type": "application/octet-stream",
        "X-Amz-Meta-Tricky": "  a   b\tc  ",
        "Content-MD5": "1B2M2Y8AsgTpgAmY7PhCfg==",
        "User-Agent": "not signed",
    }
    boto_request = botocore_sign("PUT", url, headers, body)
    cache = SigningKeyCache()
    ours = sign_headers(
        "PUT",
        url,
        headers,
        hashlib.sha256(body).hexdigest(),
        CREDS,
        REGION,
        now=NOW,
        key_cache=cache,
    )
    assert ours["authorization"] == boto_request.headers["Authorization"]
    assert ours["x-amz-date"] == boto_request.headers["X-Amz-Date"]
    assert ours["x-amz-content-sha256"] == boto_request.headers["X-Amz-Content-SHA256"]
    assert ours["host"] == "127.0.0.1:9000"
    # And the verifier accepts what the signer produced.
    split = urlsplit(url)
    view_headers = {k.lower(): v for k, v in headers.items()} | ours
    verify_header_auth(
        RequestView("PUT", split.path, split.query, view_headers), lookup, now=NOW, key_cache=cache
    )


@pytest.mark.parametrize(
    "url,host",
    [
        ("https://s3.example.com:443/b/k", "s3.example.com"),
        ("http://S3.Example.com:80/b/k", "s3.example.com"),
        ("https://s3.example.com:8443/b/k", "s3.example.com:8443"),
        ("http://[::1]:9000/b/k", "[::1]:9000"),
    ],
)
def test_sign_headers_host(fixed_clock: None, url: str, host: str) -> None:
    ours = sign_headers("GET", url, {}, "UNSIGNED-PAYLOAD", CREDS, REGION, now=NOW)
    assert ours["host"] == host
    boto_request = botocore_sign("GET", url)
    boto_request.headers["X-Amz-Content-SHA256"] = "UNSIGNED-PAYLOAD"
    # botocore derives the same host; compare whole signatures with an explicit host.
    ours2 = sign_headers("GET", url, {"Host": host}, "UNSIGNED-PAYLOAD", CREDS, REGION, now=NOW)
    assert "host" not in ours2
    assert ours2["authorization"] == ours["authorization"]


def test_canonical_request_aws_example() -> None:
    """The GET Object example from the S3 SigV4 documentation."""
    headers = {
        "host": "examplebucket.s3.amazonaws.com",
        "range": "bytes=0-9",
        "x-amz-content-sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "x-amz-date": "20130524T000000Z",
    }
    creq = canonical_request(
        "GET",
        "/test.txt",
        "",
        headers,
        ["host", "range", "x-amz-content-sha256", "x-amz-date"],
        headers["x-amz-content-sha256"],
    )
    assert hashlib.sha256(creq.encode()).hexdigest() == (
        "7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972"
    )
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    auth = (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,"
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,"
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )
    view = RequestView("GET", "/test.txt", "", headers | {"authorization": auth})
    result = verify_header_auth(
        view,
        lambda a: Credentials(a, secret) if a == "AKIAIOSFODNN7EXAMPLE" else None,
        now=datetime(2013, 5, 24, 0, 5, tzinfo=UTC),
        region="us-east-1",
    )
    assert result.access_key == "AKIAIOSFODNN7EXAMPLE"


# ------------------------------------------------- a real boto3 client on the wire


@dataclass
class Seen:
    results: list[VerifiedAuth | S3Error] = field(default_factory=list)


@pytest.fixture
async def verifying_server(fixed_clock: None) -> AsyncIterator[tuple[str, Seen]]:
    seen = Seen()

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        view = RequestView(
            request.method,
            request.rel_url.raw_path,
            request.rel_url.raw_query_string,
            request.headers,
        )
        try:
            seen.results.append(verify_request(view, lookup, now=NOW, region=REGION))
        except S3Error as err:
            seen.results.append(err)
            return web.Response(status=err.status, text="")
        if request.method == "GET" and request.rel_url.query.get("list-type") == "2":
            xml = (
                '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult>'
                f"<Name>{BUCKET}</Name><KeyCount>0</KeyCount><IsTruncated>false</IsTruncated>"
                "</ListBucketResult>"
            )
            return web.Response(text=xml, content_type="application/xml")
        return web.Response(status=200, headers={"ETag": '"0"'}, body=b"")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def test_real_boto3_client_requests_verify(verifying_server: tuple[str, Seen]) -> None:
    endpoint, seen = verifying_server
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS,
        aws_secret_access_key=SECRET,
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
        ),
    )

    def run() -> None:
        for key in TRICKY_KEYS:
            client.put_object(Bucket=BUCKET, Key=key, Body=b"x" * 10, Metadata={"m": " a  b "})
            client.head_object(Bucket=BUCKET, Key=key)
            client.delete_object(Bucket=BUCKET, Key=key)
        client.list_objects_v2(Bucket=BUCKET, Prefix="a b/ü+=&", Delimiter="/", MaxKeys=5)

    await asyncio.wait_for(asyncio.to_thread(run), timeout=60)
    assert len(seen.results) == 3 * len(TRICKY_KEYS) + 1
    errors = [r for r in seen.results if isinstance(r, S3Error)]
    assert not errors, [(e.code, e.message) for e in errors]
    modes = {r.payload_mode for r in seen.results if isinstance(r, VerifiedAuth)}
    assert PayloadMode.STREAMING_UNSIGNED_TRAILER in modes or PayloadMode.SHA256 in modes


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(alphabet="abcXYZ09-_.~%+ =&/ü", max_size=6),
            st.text(alphabet="abcXYZ09-_.~%+ =&/ü", max_size=6),
        ),
        max_size=5,
    )
)
def test_query_fast_path_matches_general_path(pairs: list[tuple[str, str]]) -> None:
    for raw in (
        "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in pairs),
        "&".join(f"{k}={v}" for k, v in pairs if "&" not in k + v),
    ):
        assert _canonical_query(raw) == canonical_query_string(parse_query(raw))
