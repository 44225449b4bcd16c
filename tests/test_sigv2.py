"""SigV2 presigned-URL verification, checked against URLs botocore's own SigV2 presigner makes.

Each URL comes from a boto3 client with default settings (which presigns S3 URLs with
SigV2) or from ``botocore.auth.HmacV1QueryAuth`` directly (to sign headers too).  The
verifier's ``now`` is set relative to the URL's own ``Expires``, so nothing depends on
the wall clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import boto3
import botocore.auth
import pytest
from aiohttp.test_utils import make_mocked_request
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials as BotoCredentials
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import S3Error
from proxy.s3.routing import route
from proxy.wire.sigv2 import (
    UNSIGNED_SELECTORS,
    canonical_resource,
    is_presigned_v2,
    sign,
    string_to_sign,
    verify_presigned_v2,
)
from proxy.wire.sigv4 import Credentials, PayloadMode, RequestView, VerifiedAuth

ACCESS = "AKIDEXAMPLE0000002"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
OTHER = Credentials("AKIDOTHER000000003", "another-secret-key")
ENDPOINT = "http://127.0.0.1:9000"
BUCKET = "bucket-2"

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
    "question?mark#hash",
    "semi;colon,comma:colon@at$dollar",
    "acl",
    "versionId=1&uploads",
    "/leading-slash",
    '<xml>&amp;"quotes"',
]


def _lookup(access_key: str) -> Credentials | None:
    return {ACCESS: Credentials(ACCESS, SECRET), OTHER.access_key: OTHER}.get(access_key)


def _client(*, path_style: bool = True) -> Any:
    """A boto3 S3 client with default signing settings (SigV2 presigned URLs)."""
    if path_style:
        return boto3.client(
            "s3",
            endpoint_url=ENDPOINT,
            aws_access_key_id=ACCESS,
            aws_secret_access_key=SECRET,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )
    return boto3.client(
        "s3", aws_access_key_id=ACCESS, aws_secret_access_key=SECRET, region_name="us-east-1"
    )


@pytest.fixture(scope="module")
def client() -> Any:
    return _client()


def _view(url: str, method: str = "GET", headers: Mapping[str, str] | None = None) -> RequestView:
    parts = urlsplit(url)
    return RequestView(method, parts.path, parts.query, {} if headers is None else headers)


def _expires(url: str) -> int:
    return int(dict(parse_qsl(urlsplit(url).query))["Expires"])


def _before(url: str) -> datetime:
    """A time at which the URL is still valid (any time for a URL without a valid ``Expires``)."""
    expires = dict(parse_qsl(urlsplit(url).query)).get("Expires", "")
    if not expires.isdigit():
        return datetime(2026, 1, 1, tzinfo=UTC)
    return datetime.fromtimestamp(int(expires) - 30, UTC)


def _verify(
    url: str,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    *,
    now: datetime | None = None,
    bucket_from_host: str | None = None,
) -> VerifiedAuth:
    view = _view(url, method, headers)
    assert is_presigned_v2(view)
    return verify_presigned_v2(
        view, _lookup, now=now or _before(url), bucket_from_host=bucket_from_host
    )


def _fails(
    code: str,
    url: str,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    *,
    now: datetime | None = None,
    bucket_from_host: str | None = None,
) -> S3Error:
    with pytest.raises(S3Error) as info:
        _verify(url, method, headers, now=now, bucket_from_host=bucket_from_host)
    err = info.value
    assert err.code == code, err
    # Nothing secret in what goes back to the client or into a log line.
    signature = dict(parse_qsl(urlsplit(url).query)).get("Signature", "")
    shown = " ".join([str(err), err.message, *err.extra.values()])
    assert SECRET not in shown
    assert not signature or (signature not in shown and quote(signature, safe="") not in shown)
    return err


def _set_param(url: str, name: str, value: str) -> str:
    parts = urlsplit(url)
    query = [(k, value if k == name else v) for k, v in parse_qsl(parts.query)]
    return parts._replace(query=urlencode(query, quote_via=quote)).geturl()


def _presign(client: Any, op: str, params: dict[str, Any], expires: int = 900) -> str:
    url: str = client.generate_presigned_url(op, Params=params, ExpiresIn=expires)
    assert "AWSAccessKeyId=" in url and "X-Amz-" not in url
    return url


# ------------------------------------------------------------------ botocore URLs verify


@pytest.mark.parametrize("key", TRICKY_KEYS)
def test_tricky_keys_get_put_head_delete(client: Any, key: str) -> None:
    for op, method in (
        ("get_object", "GET"),
        ("put_object", "PUT"),
        ("head_object", "HEAD"),
        ("delete_object", "DELETE"),
    ):
        url = _presign(client, op, {"Bucket": BUCKET, "Key": key})
        auth = _verify(url, method)
        assert auth.access_key == ACCESS
        assert auth.presigned is True
        assert auth.payload_mode is PayloadMode.UNSIGNED
        assert auth.payload_hash == "UNSIGNED-PAYLOAD"
        assert auth.signing_key == b"" and auth.seed_signature == ""


def test_result_fields(client: Any) -> None:
    url = _presign(client, "get_object", {"Bucket": BUCKET, "Key": "k"})
    now = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    url = _set_param(url, "Expires", str(int(now.timestamp()) + 60))
    url = _set_param(url, "Signature", _resign(url, "GET"))
    auth = _verify(url, now=now)
    assert (auth.date, auth.amz_date, auth.service) == ("20260304", "20260304T050607Z", "s3")
    assert "AKID" not in repr(auth.signing_key) and SECRET not in repr(auth)


def _resign(url: str, method: str, headers: Mapping[str, str] | None = None) -> str:
    """Sign a (possibly edited) URL again, as a client holding the secret would."""
    parts = urlsplit(url)
    resource = canonical_resource(parts.path, _pairs(parts.query))
    expires = dict(parse_qsl(parts.query))["Expires"]
    return sign(SECRET, string_to_sign(method, dict(headers or {}), expires, resource))


def test_response_overrides_and_version_id(client: Any) -> None:
    params = {
        "Bucket": BUCKET,
        "Key": "dir/obj name+1.bin",
        "VersionId": "3/L4kqtJl40Nr8X8gdRQBpUMLUo 1+2=3",
        "ResponseContentDisposition": 'attachment; filename="x y+z.bin"',
        "ResponseContentType": "text/plain; charset=utf-8",
        "ResponseCacheControl": "no-cache",
        "ResponseContentEncoding": "identity",
        "ResponseContentLanguage": "en-GB",
        "ResponseExpires": datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
    }
    url = _presign(client, "get_object", params)
    assert "versionId=" in url and "response-content-disposition=" in url
    _verify(url)
    # Each signed sub-resource is bound to its value.
    for name, value in (
        ("versionId", "another-version"),
        ("response-content-type", "text/html"),
        ("response-content-disposition", "inline"),
        ("response-expires", "Thu, 01 Jan 2099 00:00:00 GMT"),
    ):
        _fails("SignatureDoesNotMatch", _set_param(url, name, value))
    # Adding a sub-resource that was not signed breaks the signature too.
    plain = _presign(client, "get_object", {"Bucket": BUCKET, "Key": "k"})
    _fails("SignatureDoesNotMatch", plain + "&versionId=old")
    _fails("SignatureDoesNotMatch", plain + "&response-content-type=text%2Fhtml")
    _fails("SignatureDoesNotMatch", plain + "&versionI%64=old")  # an encoded name is still one
    # Parameters outside the canonical resource are not signed (as on S3).
    _verify(plain + "&x-id=GetObject")


def test_version_id_head_and_delete(client: Any) -> None:
    for op, method in (("head_object", "HEAD"), ("delete_object", "DELETE")):
        url = _presign(client, op, {"Bucket": BUCKET, "Key": "k", "VersionId": "v1"})
        _verify(url, method)
        _fails("SignatureDoesNotMatch", _set_param(url, "versionId", "v2"), method)


def test_multipart_sub_resources(client: Any) -> None:
    create = _presign(client, "create_multipart_upload", {"Bucket": BUCKET, "Key": "big file"})
    assert "?uploads&" in create or "?uploads=" in create
    _verify(create, "POST")
    part = _presign(
        client,
        "upload_part",
        {"Bucket": BUCKET, "Key": "big file", "UploadId": "abc+def/ghi==", "PartNumber": 7},
    )
    _verify(part, "PUT")
    _fails("SignatureDoesNotMatch", _set_param(part, "partNumber", "8"), "PUT")
    _fails("SignatureDoesNotMatch", _set_param(part, "uploadId", "other"), "PUT")
    ranged = _presign(client, "get_object", {"Bucket": BUCKET, "Key": "k", "PartNumber": 2})
    _verify(ranged)


def test_bucket_level_urls(client: Any) -> None:
    _verify(_presign(client, "list_objects", {"Bucket": BUCKET, "Prefix": "a b/"}))
    _verify(_presign(client, "get_bucket_acl", {"Bucket": BUCKET}))
    _verify(_presign(client, "get_object_tagging", {"Bucket": BUCKET, "Key": "t"}))
    _verify(_presign(client, "list_buckets", {}))


def test_virtual_host_style() -> None:
    vclient = _client(path_style=False)
    url = _presign(vclient, "get_object", {"Bucket": "my-bucket", "Key": "dir/a b+c.txt"})
    assert urlsplit(url).netloc == "my-bucket.s3.amazonaws.com"
    _verify(url, bucket_from_host="my-bucket")
    _fails("SignatureDoesNotMatch", url)
    _fails("SignatureDoesNotMatch", url, bucket_from_host="other-bucket")
    listing = _presign(vclient, "list_objects", {"Bucket": "my-bucket"})
    assert urlsplit(listing).path == "/"
    _verify(listing, bucket_from_host="my-bucket")


# ------------------------------------------------------------------- signed headers


class _RecordingSigner(botocore.auth.HmacV1QueryAuth):  # type: ignore[misc]
    """botocore's SigV2 presigner with a fixed ``Expires``, recording its string to sign."""

    expires_at = "1900000000"

    def __init__(self) -> None:
        super().__init__(BotoCredentials(ACCESS, SECRET))
        self.signed: list[str] = []

    def _get_date(self) -> str:
        return self.expires_at

    def sign_string(self, string_to_sign: str) -> str:
        self.signed.append(string_to_sign)
        result: str = super().sign_string(string_to_sign)
        return result


def _hmacv1_url(method: str, url: str, headers: dict[str, str]) -> tuple[str, str]:
    """Presign with botocore's HmacV1QueryAuth; return the URL and its string to sign."""
    signer = _RecordingSigner()
    request = AWSRequest(method=method, url=url, headers=dict(headers))
    signer.add_auth(request)
    assert len(signer.signed) == 1
    signed_url: str = request.url
    return signed_url, signer.signed[0]


def _pairs(query: str) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for part in query.split("&"):
        if part:
            ((name, value),) = parse_qsl(part, keep_blank_values=True)
            out.append((name, value if "=" in part else None))
    return out


def test_string_to_sign_matches_botocore() -> None:
    headers = {
        "Content-Type": "text/plain",
        "Content-MD5": "1B2M2Y8AsgTpgAmY7PhCfg==",
        "x-amz-meta-Colour": " blue ",
        "x-amz-acl": "private",
    }
    path = "/" + BUCKET + "/" + quote("a b/ü+x", safe="/~")
    for query in ("", "?versionId=v%201&tagging", "?uploads", "?partNumber=3&uploadId=u%2B1"):
        signed_url, boto_string = _hmacv1_url("PUT", f"{ENDPOINT}{path}{query}", headers)
        parts = urlsplit(signed_url)
        ours = string_to_sign(
            "PUT",
            {k.lower(): v for k, v in headers.items()},
            _RecordingSigner.expires_at,
            canonical_resource(parts.path, _pairs(parts.query)),
        )
        assert ours == boto_string
        _verify(signed_url, "PUT", {k.lower(): v for k, v in headers.items()})


def test_signed_headers_must_be_sent() -> None:
    headers = {
        "Content-Type": "image/png",
        "Content-MD5": "XrY7u+Ae7tCTyyK7j1rNww==",
        "x-amz-meta-owner": "alice",
        "x-amz-storage-class": "STANDARD",
    }
    url, _ = _hmacv1_url("PUT", f"{ENDPOINT}/{BUCKET}/upload.png", headers)
    lower = {k.lower(): v for k, v in headers.items()}
    _verify(url, "PUT", lower)
    # Case-insensitive multidict headers, as aiohttp gives them.
    _verify(url, "PUT", CIMultiDictProxy(CIMultiDict(headers)))
    for name in lower:
        missing = {k: v for k, v in lower.items() if k != name}
        _fails("SignatureDoesNotMatch", url, "PUT", missing)
        _fails("SignatureDoesNotMatch", url, "PUT", {**lower, name: "changed"})
    # An x-amz-* header that was not signed is refused; other headers do not matter.
    _fails("SignatureDoesNotMatch", url, "PUT", {**lower, "x-amz-acl": "public-read"})
    _verify(url, "PUT", {**lower, "user-agent": "curl", "content-length": "5"})


def test_repeated_amz_headers_joined() -> None:
    headers = CIMultiDict([("x-amz-meta-tag", "one"), ("X-Amz-Meta-Tag", " two ")])
    to_sign = string_to_sign("GET", CIMultiDictProxy(headers), "100", "/b/k")
    assert to_sign == "GET\n\n\n100\nx-amz-meta-tag:one,two\n/b/k"


# -------------------------------------------------------------------------- tampering


def test_tampering_fails(client: Any) -> None:
    url = _presign(client, "get_object", {"Bucket": BUCKET, "Key": "dir/a"})
    _verify(url)
    # Another key, another bucket, with the same signature.
    _fails("SignatureDoesNotMatch", url.replace(f"/{BUCKET}/dir/a?", f"/{BUCKET}/dir/b?"))
    _fails("SignatureDoesNotMatch", url.replace(f"/{BUCKET}/dir/a?", "/other/dir/a?"))
    _fails("SignatureDoesNotMatch", url.replace("/dir/a?", "/dir/a/?"))
    # A longer (or shorter) lifetime than signed.
    expires = _expires(url)
    _fails("SignatureDoesNotMatch", _set_param(url, "Expires", str(expires + 1)))
    _fails("SignatureDoesNotMatch", _set_param(url, "Expires", str(expires - 1)))
    # A flipped signature character; a truncated one; not base64 at all.
    sig = dict(parse_qsl(urlsplit(url).query))["Signature"]
    flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
    _fails("SignatureDoesNotMatch", _set_param(url, "Signature", flipped))
    _fails("SignatureDoesNotMatch", _set_param(url, "Signature", sig[:-4]))
    _fails("SignatureDoesNotMatch", _set_param(url, "Signature", "not base64!"))
    _fails("SignatureDoesNotMatch", _set_param(url, "Signature", "AAAA" + sig))
    # The same signature under another (known) access key.
    _fails("SignatureDoesNotMatch", _set_param(url, "AWSAccessKeyId", OTHER.access_key))
    # The GET URL used with another method.
    for method in ("PUT", "HEAD", "DELETE", "POST"):
        _fails("SignatureDoesNotMatch", url, method)


def test_unknown_access_key(client: Any) -> None:
    url = _presign(client, "get_object", {"Bucket": BUCKET, "Key": "k"})
    err = _fails("InvalidAccessKeyId", _set_param(url, "AWSAccessKeyId", "AKIDUNKNOWN"))
    assert err.status == 403 and err.extra == {"AWSAccessKeyId": "AKIDUNKNOWN"}


def test_expired(client: Any) -> None:
    url = _presign(client, "get_object", {"Bucket": BUCKET, "Key": "k"}, expires=60)
    expires = _expires(url)
    _verify(url, now=datetime.fromtimestamp(expires, UTC))  # the last valid second
    err = _fails("AccessDenied", url, now=datetime.fromtimestamp(expires + 1, UTC))
    assert err.message == "Request has expired" and err.status == 403
    assert err.extra["Expires"] == datetime.fromtimestamp(expires, UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    _fails("AccessDenied", url, now=datetime.fromtimestamp(expires, UTC) + timedelta(days=1))
    # Expiry is checked before the signature: an expired, tampered URL says expired.
    tampered = url.replace("/k?", "/j?")
    late = datetime.fromtimestamp(expires + 1, UTC)
    assert _fails("AccessDenied", tampered, now=late).message == "Request has expired"


def test_malformed_parameters(client: Any) -> None:
    url = _presign(client, "get_object", {"Bucket": BUCKET, "Key": "k"})
    no_expires = "&".join(p for p in url.split("&") if not p.startswith("Expires="))
    assert _fails("AccessDenied", no_expires).message.startswith("Query-string authentication")
    _fails("AccessDenied", _set_param(url, "Expires", "tomorrow"))
    _fails("AccessDenied", _set_param(url, "Expires", "-5"))
    _fails("AccessDenied", _set_param(url, "Expires", ""))
    _fails("AccessDenied", _set_param(url, "Signature", ""))
    _fails("InvalidArgument", url + "&Signature=AAAA")
    _fails("InvalidArgument", url + "&Expires=99999999999")
    for name in sorted(UNSIGNED_SELECTORS):
        assert _fails("InvalidRequest", f"{url}&{name}").status == 400
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_presigned_v2(_view(url), _lookup, now=datetime(2026, 1, 1))


def test_dispatch_predicate(client: Any) -> None:
    url = _presign(client, "get_object", {"Bucket": BUCKET, "Key": "k"})
    assert is_presigned_v2(_view(url))
    assert not is_presigned_v2(_view(url, headers={"authorization": "AWS4-HMAC-SHA256 x"}))
    assert not is_presigned_v2(_view(url + "&X-Amz-Algorithm=AWS4-HMAC-SHA256"))
    assert not is_presigned_v2(_view(url + "&X-Amz-Credential=x"))
    only_key = "&".join(p for p in url.split("&") if not p.startswith("Signature="))
    assert not is_presigned_v2(_view(only_key))
    assert not is_presigned_v2(_view(f"{ENDPOINT}/{BUCKET}/k?Signature=x"))
    v4 = boto3.client(
        "s3",
        endpoint_url=ENDPOINT,
        aws_access_key_id=ACCESS,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
        config=Config(signature_version="s3v4"),
    ).generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "k"})
    assert not is_presigned_v2(_view(v4))


def test_auth_params_not_routed() -> None:
    """``AWSAccessKeyId``, ``Signature`` and ``Expires`` are never forwarded to the backend."""
    request = make_mocked_request(
        "PUT", "/b/k?AWSAccessKeyId=AK&Signature=c2ln%3D&Expires=1900000000&versionId=v"
    )
    target = route(request, None)
    assert (target.bucket, target.key, target.query) == ("b", "k", (("versionId", "v"),))
