"""aws-chunked decoding: AWS's documented examples, real boto3 bodies, tampering."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import ipaddress
import random
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import botocore.auth
import pytest
from aiohttp import web
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials as BotoCredentials
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from multidict import CIMultiDict

from proxy.errors import S3Error
from proxy.wire import checksums
from proxy.wire.chunked import MAX_CHUNK_SIZE, AwsChunkedDecoder, Trailers
from proxy.wire.sigv4 import (
    EMPTY_SHA256,
    ChunkSigningContext,
    Credentials,
    PayloadMode,
    RequestView,
    verify_header_auth,
    verify_request,
)

UTC = dt.UTC

# --------------------------------------------------------- reference encoder


def _hmac_hex(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def encode_unsigned(data: bytes, chunk_size: int, trailers: dict[str, str]) -> bytes:
    """STREAMING-UNSIGNED-PAYLOAD-TRAILER as botocore's AwsChunkedWrapper writes it."""
    out = bytearray()
    for i in range(0, len(data), chunk_size):
        chunk = data[i : i + chunk_size]
        out += b"%x\r\n%s\r\n" % (len(chunk), chunk)
    out += b"0\r\n"
    for name, value in trailers.items():
        out += f"{name}:{value}\r\n".encode()
    out += b"\r\n"
    return bytes(out)


def encode_signed(
    data: bytes,
    chunk_size: int,
    ctx: ChunkSigningContext,
    trailers: dict[str, str] | None = None,
) -> bytes:
    """STREAMING-AWS4-HMAC-SHA256-PAYLOAD[-TRAILER], written from the AWS specification."""
    out = bytearray()
    prev = ctx.seed_signature
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)] + [b""]
    for chunk in chunks:
        sig = _hmac_hex(
            ctx.signing_key,
            "\n".join(
                [
                    "AWS4-HMAC-SHA256-PAYLOAD",
                    ctx.amz_date,
                    ctx.scope,
                    prev,
                    EMPTY_SHA256,
                    hashlib.sha256(chunk).hexdigest(),
                ]
            ),
        )
        out += f"{len(chunk):x};chunk-signature={sig}\r\n".encode() + chunk
        if chunk or trailers is None:
            out += b"\r\n"
        prev = sig
    if trailers is not None:
        for name, value in trailers.items():
            out += f"{name}:{value}\r\n".encode()
        canonical = "".join(f"{n}:{trailers[n]}\n" for n in sorted(trailers))
        tsig = _hmac_hex(
            ctx.signing_key,
            "\n".join(
                [
                    "AWS4-HMAC-SHA256-TRAILER",
                    ctx.amz_date,
                    ctx.scope,
                    prev,
                    hashlib.sha256(canonical.encode()).hexdigest(),
                ]
            ),
        )
        out += f"x-amz-trailer-signature:{tsig}\r\n\r\n".encode()
    return bytes(out)


def splits(body: bytes, rng: random.Random, max_pieces: int = 12) -> list[bytes]:
    if len(body) < 2:
        return [body]
    cuts = sorted(rng.sample(range(1, len(body)), min(max_pieces, len(body) - 1)))
    return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]


@dataclass
class Outcome:
    data: bytes
    trailers: Trailers | None = None
    error: S3Error | None = None


def run(decoder: AwsChunkedDecoder, pieces: list[bytes]) -> Outcome:
    released = bytearray()
    try:
        for piece in pieces:
            for out in decoder.feed(piece):
                assert isinstance(out, bytes)
                released += out
        trailers = decoder.finish()
    except S3Error as err:
        with pytest.raises(S3Error):
            decoder.finish()  # poisoned
        return Outcome(bytes(released), error=err)
    return Outcome(bytes(released), trailers)


# ----------------------------------------------------- AWS documented example

DOC_KEY = "AKIAIOSFODNN7EXAMPLE"
DOC_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
DOC_NOW = dt.datetime(2013, 5, 24, 0, 1, tzinfo=UTC)
DOC_DATA = b"a" * 66560


def doc_lookup(access_key: str) -> Credentials | None:
    return Credentials(DOC_KEY, DOC_SECRET) if access_key == DOC_KEY else None


def doc_request(trailer: bool) -> RequestView:
    headers = {
        "host": "s3.amazonaws.com",
        "x-amz-date": "20130524T000000Z",
        "x-amz-storage-class": "REDUCED_REDUNDANCY",
        "content-encoding": "aws-chunked",
        "x-amz-decoded-content-length": "66560",
    }
    if trailer:
        headers |= {
            "x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER",
            "x-amz-trailer": "x-amz-checksum-crc32c",
            "authorization": (
                f"AWS4-HMAC-SHA256 Credential={DOC_KEY}/20130524/us-east-1/s3/aws4_request,"
                "SignedHeaders=content-encoding;host;x-amz-content-sha256;x-amz-date;"
                "x-amz-decoded-content-length;x-amz-storage-class;x-amz-trailer,"
                "Signature=106e2a8a18243abcf37539882f36619c00e2dfc72633413f02d3b74544bfeb8e"
            ),
        }
    else:
        headers |= {
            "content-length": "66824",
            "x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
            "authorization": (
                f"AWS4-HMAC-SHA256 Credential={DOC_KEY}/20130524/us-east-1/s3/aws4_request,"
                "SignedHeaders=content-encoding;content-length;host;x-amz-content-sha256;"
                "x-amz-date;x-amz-decoded-content-length;x-amz-storage-class,"
                "Signature=4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
            ),
        }
    return RequestView("PUT", "/examplebucket/chunkObject.txt", "", headers)


DOC_BODY = (
    b"10000;chunk-signature=ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648\r\n"
    + b"a" * 65536
    + b"\r\n400;chunk-signature="
    + b"0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497\r\n"
    + b"a" * 1024
    + b"\r\n0;chunk-signature="
    + b"b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9\r\n\r\n"
)
DOC_TRAILER_BODY = (
    b"10000;chunk-signature=b474d8862b1487a5145d686f57f013e54db672cee1c953b3010fb58501ef5aa2\r\n"
    + b"a" * 65536
    + b"\r\n400;chunk-signature="
    + b"1c1344b170168f8e65b41376b44b20fe354e373826ccbbe2c1d40a8cae51e5c7\r\n"
    + b"a" * 1024
    + b"\r\n0;chunk-signature=2ca2aba2005185cf7159c6277faf83795951dd77a3a99e6e65d5c9f85863f992\r\n"
    + b"x-amz-checksum-crc32c:sOO8/Q==\r\n"
    + b"x-amz-trailer-signature:"
    + b"d81f82fc3505edab99d459891051a732e8730629a2e4a59689829ca17fe2e435\r\n"
    + b"\r\n"
)


@pytest.mark.parametrize("trailer", [False, True])
def test_aws_documented_example(trailer: bool) -> None:
    auth = verify_header_auth(doc_request(trailer), doc_lookup, now=DOC_NOW, region="us-east-1")
    body = DOC_TRAILER_BODY if trailer else DOC_BODY
    assert len(body) == (66946 if trailer else 66824)
    ctx = auth.chunk_signing()
    # The reference encoder reproduces AWS's bytes exactly.
    assert (
        encode_signed(
            DOC_DATA, 65536, ctx, {"x-amz-checksum-crc32c": "sOO8/Q=="} if trailer else None
        )
        == body
    )
    rng = random.Random(1)
    for _ in range(20):
        decoder = AwsChunkedDecoder(
            auth.payload_mode,
            signing=ctx,
            decoded_length=66560,
            trailer_names=["x-amz-checksum-crc32c"] if trailer else [],
        )
        outcome = run(decoder, splits(body, rng, rng.randint(1, 40)))
        assert outcome.error is None, outcome.error
        assert outcome.data == DOC_DATA
        assert outcome.trailers is not None
        assert dict(outcome.trailers) == ({"x-amz-checksum-crc32c": "sOO8/Q=="} if trailer else {})


def test_signed_chunks_released_only_when_verified() -> None:
    auth = verify_header_auth(doc_request(False), doc_lookup, now=DOC_NOW)
    decoder = AwsChunkedDecoder(
        PayloadMode.STREAMING_SIGNED, signing=auth.chunk_signing(), decoded_length=66560
    )
    first_header_len = DOC_BODY.index(b"\r\n") + 2
    # All of chunk 1 but its CRLF: nothing may be released yet.
    assert decoder.feed(DOC_BODY[: first_header_len + 65536]) == []
    assert decoder.feed(DOC_BODY[first_header_len + 65536 : first_header_len + 65538]) == [
        b"a" * 65536
    ]


# ------------------------------------------------- signed bodies, tampering

ACCESS = "AKIDCHUNKED"
SECRET = "chunked/secret+key"
NOW = dt.datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)


def lookup(access_key: str) -> Credentials | None:
    return Credentials(ACCESS, SECRET) if access_key == ACCESS else None


class StreamingSigV4(botocore.auth.S3SigV4Auth):
    """botocore's signer, announcing a streaming payload (it computes the seed)."""

    def __init__(self, mode: str) -> None:
        super().__init__(BotoCredentials(ACCESS, SECRET), "s3", "us-east-1")
        self._mode = mode

    def payload(self, request: AWSRequest) -> str:
        return self._mode


def signed_setup(
    mode: PayloadMode, length: int, trailer: str | None, monkeypatch: pytest.MonkeyPatch
) -> ChunkSigningContext:
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: NOW.replace(tzinfo=None))
    headers = {
        "Content-Encoding": "aws-chunked",
        "X-Amz-Decoded-Content-Length": str(length),
    }
    if trailer:
        headers["X-Amz-Trailer"] = trailer
    request = AWSRequest(method="PUT", url="http://127.0.0.1:9/b/k%20k", headers=headers)
    StreamingSigV4(mode.value).add_auth(request)
    view = RequestView(
        "PUT",
        "/b/k%20k",
        "",
        {k.lower(): v for k, v in request.headers.items()} | {"host": "127.0.0.1:9"},
    )
    auth = verify_header_auth(view, lookup, now=NOW)
    assert auth.payload_mode is mode
    return auth.chunk_signing()


SIGNED_CASES = [
    (PayloadMode.STREAMING_SIGNED, None),
    (PayloadMode.STREAMING_SIGNED_TRAILER, "x-amz-checksum-crc32"),
    (PayloadMode.STREAMING_SIGNED_TRAILER, "x-amz-checksum-sha256"),
]


def _trailers(name: str | None, data: bytes) -> dict[str, str] | None:
    if name is None:
        return None
    alg = checksums.ChecksumAlgorithm(name.removeprefix("x-amz-checksum-").upper())
    return {name: checksums.checksum(alg, data)}


@pytest.mark.parametrize("mode,trailer", SIGNED_CASES)
@pytest.mark.parametrize("length,chunk", [(0, 8192), (1, 8192), (8192, 8192), (50_000, 8192)])
def test_signed_round_trip(
    monkeypatch: pytest.MonkeyPatch,
    mode: PayloadMode,
    trailer: str | None,
    length: int,
    chunk: int,
) -> None:
    ctx = signed_setup(mode, length, trailer, monkeypatch)
    data = random.Random(length).randbytes(length)
    body = encode_signed(data, chunk, ctx, _trailers(trailer, data))
    rng = random.Random(2)
    for _ in range(10):
        decoder = AwsChunkedDecoder(
            mode, signing=ctx, decoded_length=length, trailer_names=[trailer] if trailer else []
        )
        outcome = run(decoder, splits(body, rng, rng.randint(1, 30)))
        assert outcome.error is None, outcome.error
        assert outcome.data == data
        assert outcome.trailers is not None
        if trailer:
            expected = checksums.from_headers({"x-amz-trailer": trailer})
            hashers = expected.hashers()
            hashers[0].update(outcome.data)
            expected.verify(hashers, outcome.trailers)


def _chunk_offsets(body: bytes) -> list[tuple[int, int, int]]:
    """(header start, data start, size) of every chunk in a signed body."""
    result = []
    pos = 0
    while True:
        end = body.index(b"\r\n", pos)
        size = int(body[pos:end].split(b";")[0], 16)
        result.append((pos, end + 2, size))
        if size == 0:
            return result
        pos = end + 2 + size + 2


def _flip(body: bytes, index: int, new: bytes | None = None) -> bytes:
    if new is None:
        new = bytes([body[index] ^ 0x01])
    return body[:index] + new + body[index + 1 :]


@pytest.mark.parametrize("mode,trailer", SIGNED_CASES)
def test_signed_tampering(
    monkeypatch: pytest.MonkeyPatch, mode: PayloadMode, trailer: str | None
) -> None:
    data = random.Random(3).randbytes(40_000)
    ctx = signed_setup(mode, len(data), trailer, monkeypatch)
    trailers = _trailers(trailer, data)
    body = encode_signed(data, 8192, ctx, trailers)
    chunks = _chunk_offsets(body)
    names = [trailer] if trailer else []

    def decode(tampered: bytes, *, length: int | None = len(data), seed: int = 0) -> Outcome:
        decoder = AwsChunkedDecoder(mode, signing=ctx, decoded_length=length, trailer_names=names)
        return run(decoder, splits(tampered, random.Random(seed), 9))

    cases: list[tuple[str, bytes, str, int]] = []
    for i, (header, start, size) in enumerate(chunks[:-1]):
        verified_before = sum(s for _, _, s in chunks[:i])
        cases.append(
            (f"data{i}", _flip(body, start + size // 2), "SignatureDoesNotMatch", verified_before)
        )
        sig_at = body.index(b"chunk-signature=", header) + 16
        cases.append(
            (
                f"sig{i}",
                _flip(body, sig_at, b"0" if body[sig_at] != 0x30 else b"1"),
                "SignatureDoesNotMatch",
                verified_before,
            )
        )
        size_hex = body[header : body.index(b";", header)]
        bigger = f"{size + 1:x}".encode()
        cases.append(
            (
                f"size{i}",
                body[:header] + bigger + body[header + len(size_hex) :],
                "*",
                verified_before,
            )
        )
    verified_all = len(data)
    final_sig_at = body.index(b"chunk-signature=", chunks[-1][0]) + 20
    final_new = b"f" if body[final_sig_at] != ord("f") else b"e"
    cases.append(
        ("final-sig", _flip(body, final_sig_at, final_new), "SignatureDoesNotMatch", verified_all)
    )
    cases.append(("extra", body + b"x", "InvalidRequest", verified_all))
    first_end = chunks[0][1] + chunks[0][2]
    no_crlf = body[:first_end] + b"\n\n" + body[first_end + 2 :]
    cases.append(("no-crlf", no_crlf, "InvalidRequest", 0))
    if trailers is not None:
        name = next(iter(trailers))
        t_at = body.index(name.encode()) + len(name) + 2
        cases.append(("trailer-value", _flip(body, t_at), "SignatureDoesNotMatch", verified_all))
        tsig_at = body.index(b"x-amz-trailer-signature:") + 30
        cases.append(
            (
                "trailer-sig",
                _flip(body, tsig_at, b"0" if body[tsig_at] != 0x30 else b"1"),
                "SignatureDoesNotMatch",
                verified_all,
            )
        )
        no_sig = body[: body.index(b"x-amz-trailer-signature:")] + b"\r\n"
        cases.append(("trailer-sig-missing", no_sig, "SignatureDoesNotMatch", verified_all))
        other = body.replace(name.encode(), b"x-amz-checksum-crc32c", 1)
        cases.append(("trailer-undeclared", other, "MalformedTrailerError", verified_all))
    for name, tampered, code, max_released in cases:
        for seed in range(3):
            outcome = decode(tampered, seed=seed)
            assert outcome.error is not None, name
            if code != "*":
                assert outcome.error.code == code, (name, outcome.error.code)
            assert outcome.error.status in (400, 403)
            assert len(outcome.data) <= max_released, name
            assert data.startswith(outcome.data), name
    # Truncation anywhere: never succeeds, never releases unverified data.
    rng = random.Random(5)
    # (A trailer section that lacks only its closing CRLF is accepted, see below.)
    lenient = len(body) - 2 if trailers is not None else -1
    cuts = [c for c in rng.sample(range(1, len(body)), 60) if c != lenient]
    for cut in [*cuts, len(body) - 1, len(body) - 2]:
        if cut == lenient:
            assert decode(body[:cut]).data == data
            continue
        outcome = decode(body[:cut], seed=cut)
        assert outcome.error is not None and outcome.error.code in (
            "IncompleteBody",
            "SignatureDoesNotMatch",
        ), (cut, outcome.error)
        assert data.startswith(outcome.data)
    # Declared length disagrees with the body.
    assert decode(body, length=len(data) + 1).error.code == "IncompleteBody"  # type: ignore[union-attr]
    assert decode(body, length=len(data) - 1).error.code == "InvalidRequest"  # type: ignore[union-attr]


def test_signed_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = signed_setup(PayloadMode.STREAMING_SIGNED, 10, None, monkeypatch)

    def first_error(body: bytes) -> S3Error:
        decoder = AwsChunkedDecoder(PayloadMode.STREAMING_SIGNED, signing=ctx, decoded_length=None)
        outcome = run(decoder, [body])
        assert outcome.error is not None and outcome.data == b""
        return outcome.error

    assert first_error(b"1" * 5000).code == "InvalidRequest"
    assert first_error(b"5;" + b"x" * 5000 + b"\r\n").code == "InvalidRequest"
    too_big = f"{MAX_CHUNK_SIZE + 1:x};chunk-signature={'0' * 64}\r\n".encode()
    assert first_error(too_big).code == "InvalidRequest"
    assert first_error(b"5\r\nhello\r\n").code == "SignatureDoesNotMatch"
    assert first_error(b"zz;chunk-signature=" + b"0" * 64 + b"\r\n").code == "InvalidRequest"
    assert first_error(b"0x5;chunk-signature=" + b"0" * 64 + b"\r\n").code == "InvalidRequest"


# ---------------------------------------------- unsigned trailer (boto3 style)


@pytest.mark.parametrize("length", [0, 1, 1000, 70_000])
def test_unsigned_trailer_round_trip_and_tampering(length: int) -> None:
    data = random.Random(length).randbytes(length)
    crc = checksums.checksum(checksums.ChecksumAlgorithm.CRC32, data)
    body = encode_unsigned(data, 16384, {"x-amz-checksum-crc32": crc})
    names = ["x-amz-checksum-crc32"]

    def decode(raw: bytes, seed: int = 0, decoded: int | None = length) -> Outcome:
        decoder = AwsChunkedDecoder(
            PayloadMode.STREAMING_UNSIGNED_TRAILER,
            signing=None,
            decoded_length=decoded,
            trailer_names=names,
        )
        return run(decoder, splits(raw, random.Random(seed), 7))

    for seed in range(5):
        outcome = decode(body, seed)
        assert outcome.error is None and outcome.data == data
        assert outcome.trailers == {"x-amz-checksum-crc32": crc}
    # A missing final CRLF after the trailer is tolerated.
    assert decode(body[:-2]).error is None
    assert decode(body + b"\r\n").error.code == "InvalidRequest"  # type: ignore[union-attr]
    assert decode(body[: body.index(b"0\r\nx-amz")]).error.code == "IncompleteBody"  # type: ignore[union-attr]
    assert decode(body, decoded=length + 1).error.code == "IncompleteBody"  # type: ignore[union-attr]
    missing = body[: body.index(b"x-amz-checksum")] + b"\r\n"
    assert decode(missing).error.code == "MalformedTrailerError"  # type: ignore[union-attr]
    signed = body[:-2] + b"x-amz-trailer-signature:" + b"0" * 64 + b"\r\n\r\n"
    assert decode(signed).error.code == "MalformedTrailerError"  # type: ignore[union-attr]
    # A wrong trailer value decodes but fails the checksum.
    wrong = body.replace(
        crc.encode(), checksums.checksum(checksums.ChecksumAlgorithm.CRC32, b"x").encode()
    )
    outcome = decode(wrong)
    assert outcome.trailers is not None
    expected = checksums.from_headers({"x-amz-trailer": "x-amz-checksum-crc32"})
    hashers = expected.hashers()
    hashers[0].update(outcome.data)
    with pytest.raises(S3Error) as info:
        expected.verify(hashers, outcome.trailers)
    assert info.value.code == "BadDigest"


def test_constructor_checks() -> None:
    with pytest.raises(ValueError):
        AwsChunkedDecoder(PayloadMode.UNSIGNED, signing=None, decoded_length=None)
    with pytest.raises(ValueError):
        AwsChunkedDecoder(PayloadMode.STREAMING_SIGNED, signing=None, decoded_length=None)
    with pytest.raises(S3Error):
        AwsChunkedDecoder(
            PayloadMode.STREAMING_SIGNED,
            signing=ChunkSigningContext("20260101T000000Z", "s", b"k", "0" * 64),
            decoded_length=None,
            trailer_names=["x-amz-checksum-crc32"],
        )


# --------------------------------------- what boto3 really sends (over TLS)


@dataclass
class Captured:
    requests: list[tuple[str, str, str, CIMultiDict[str], bytes]] = field(default_factory=list)


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
async def tls_capture(tmp_path: Path) -> AsyncIterator[tuple[str, Path, Captured]]:
    captured = Captured()
    cert, key = _self_signed(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        captured.requests.append(
            (
                request.method,
                request.rel_url.raw_path,
                request.rel_url.raw_query_string,
                CIMultiDict(request.headers),
                body,
            )
        )
        if request.method == "POST" and "uploads" in request.rel_url.query:
            xml = (
                '<?xml version="1.0" encoding="UTF-8"?><InitiateMultipartUploadResult>'
                "<Bucket>b</Bucket><Key>k</Key><UploadId>up1</UploadId>"
                "</InitiateMultipartUploadResult>"
            )
            return web.Response(text=xml, content_type="application/xml")
        return web.Response(status=200, headers={"ETag": '"e"'})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"https://127.0.0.1:{port}", cert, captured
    finally:
        await runner.cleanup()


BOTO_BODIES = [b"", b"x", random.Random(9).randbytes(3 * 1024 * 1024 + 17)]


async def test_boto3_put_object_and_upload_part(tls_capture: tuple[str, Path, Captured]) -> None:
    endpoint, cert, captured = tls_capture
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS,
        aws_secret_access_key=SECRET,
        verify=str(cert),
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
            request_checksum_calculation="when_supported",
        ),
    )
    algorithms = [None, "CRC32C", "CRC64NVME", "SHA1", "SHA256"]

    def send() -> None:
        for body in BOTO_BODIES:
            for alg in algorithms:
                extra = {"ChecksumAlgorithm": alg} if alg else {}
                client.put_object(Bucket="b", Key="dir/a key+=.bin", Body=body, **extra)
        client.create_multipart_upload(Bucket="b", Key="k")
        client.upload_part(Bucket="b", Key="k", UploadId="up1", PartNumber=1, Body=BOTO_BODIES[2])

    await asyncio.wait_for(asyncio.to_thread(send), timeout=120)
    uploads = [r for r in captured.requests if r[0] == "PUT"]
    assert len(uploads) == len(BOTO_BODIES) * len(algorithms) + 1
    expected_bodies = [b for b in BOTO_BODIES for _ in algorithms] + [BOTO_BODIES[2]]
    seen_algorithms = set()
    rng = random.Random(4)
    for (method, path, query, headers, raw), plain in zip(uploads, expected_bodies, strict=True):
        view = RequestView(method, path, query, headers)
        auth = verify_request(view, lookup, now=dt.datetime.now(UTC), region="us-east-1")
        assert auth.payload_mode is PayloadMode.STREAMING_UNSIGNED_TRAILER
        assert headers["content-encoding"] == "aws-chunked"
        expected = checksums.from_headers(headers)
        flexible = expected.flexible
        assert flexible is not None and flexible.in_trailer
        seen_algorithms.add(flexible.algorithm)
        for _ in range(3):
            decoder = AwsChunkedDecoder(
                auth.payload_mode,
                signing=None,
                decoded_length=int(headers["x-amz-decoded-content-length"]),
                trailer_names=expected.trailer_names(),
            )
            hashers = expected.hashers()
            pieces = splits(raw, rng, 25) if len(raw) > 1 else [raw]
            decoded = bytearray()
            for piece in pieces:
                for out in decoder.feed(piece):
                    decoded += out
                    for h in hashers:
                        h.update(out)
            trailers = decoder.finish()
            assert bytes(decoded) == plain
            verified = expected.verify(hashers, trailers)
            assert verified == {flexible.header: trailers[flexible.header]}
        # Any flipped payload byte is caught by the trailer checksum.
        if plain:
            first_nl = raw.index(b"\r\n") + 2
            tampered = _flip(raw, first_nl)
            decoder = AwsChunkedDecoder(
                auth.payload_mode,
                signing=None,
                decoded_length=len(plain),
                trailer_names=expected.trailer_names(),
            )
            hashers = expected.hashers()
            for out in decoder.feed(tampered):
                for h in hashers:
                    h.update(out)
            with pytest.raises(S3Error) as info:
                expected.verify(hashers, decoder.finish())
            assert info.value.code == "BadDigest"
    assert seen_algorithms == {
        checksums.ChecksumAlgorithm.CRC32,
        checksums.ChecksumAlgorithm.CRC32C,
        checksums.ChecksumAlgorithm.CRC64NVME,
        checksums.ChecksumAlgorithm.SHA1,
        checksums.ChecksumAlgorithm.SHA256,
    }
