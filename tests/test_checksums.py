"""S3 checksums: known values, streaming, header parsing, multipart combination."""

from __future__ import annotations

import base64
import hashlib
import itertools
import random
import zlib

import pytest
from botocore import httpchecksum
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import S3Error
from proxy.wire.checksums import (
    FLEXIBLE,
    ChecksumAlgorithm,
    CrcHasher,
    Expected,
    ExpectedChecksum,
    checksum,
    combine_composite,
    combine_full_object,
    from_headers,
    new_hasher,
    verify,
)

CHECK = b"123456789"
CHECK_VALUES = {
    ChecksumAlgorithm.CRC32: 0xCBF43926,
    ChecksumAlgorithm.CRC32C: 0xE3069283,
    ChecksumAlgorithm.CRC64NVME: 0xAE8B14860A799888,
}
ALL = list(ChecksumAlgorithm)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize("alg", list(CHECK_VALUES))
def test_crc_check_values(alg: ChecksumAlgorithm) -> None:
    hasher = new_hasher(alg)
    hasher.update(CHECK)
    assert isinstance(hasher, CrcHasher)
    assert hasher.crc == CHECK_VALUES[alg]
    assert hasher.digest() == CHECK_VALUES[alg].to_bytes(alg.digest_size, "big")


@pytest.mark.parametrize("alg", [ChecksumAlgorithm.SHA1, ChecksumAlgorithm.SHA256])
def test_sha_values(alg: ChecksumAlgorithm) -> None:
    assert checksum(alg, CHECK) == b64(hashlib.new(alg.value.lower(), CHECK).digest())


def test_md5_value() -> None:
    assert checksum(ChecksumAlgorithm.MD5, b"") == "1B2M2Y8AsgTpgAmY7PhCfg=="


_BOTOCORE = {
    ChecksumAlgorithm.CRC32: httpchecksum.CrtCrc32Checksum,
    ChecksumAlgorithm.CRC32C: httpchecksum.CrtCrc32cChecksum,
    ChecksumAlgorithm.CRC64NVME: httpchecksum.CrtCrc64NvmeChecksum,
    ChecksumAlgorithm.SHA1: httpchecksum.Sha1Checksum,
    ChecksumAlgorithm.SHA256: httpchecksum.Sha256Checksum,
}


@pytest.mark.parametrize("alg", FLEXIBLE)
def test_same_as_botocore(alg: ChecksumAlgorithm) -> None:
    data = random.Random(7).randbytes(100_003)
    theirs = _BOTOCORE[alg]()
    theirs.update(data)
    assert checksum(alg, data) == theirs.b64digest()


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=5000), cuts=st.lists(st.integers(0, 5000), max_size=8))
def test_streaming_equals_one_shot(data: bytes, cuts: list[int]) -> None:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    for alg in ALL:
        hasher = new_hasher(alg)
        view = memoryview(data)
        for a, b in itertools.pairwise(points):
            hasher.update(view[a:b])
        assert hasher.b64digest() == checksum(alg, data), alg


# ------------------------------------------------------------ from_headers


def test_from_headers_header_checksum() -> None:
    data = b"hello"
    headers = {
        "content-md5": checksum(ChecksumAlgorithm.MD5, data),
        "x-amz-checksum-crc32c": checksum(ChecksumAlgorithm.CRC32C, data),
        "x-amz-sdk-checksum-algorithm": "crc32c",
        "x-amz-checksum-type": "FULL_OBJECT",
    }
    expected = from_headers(headers)
    assert [c.algorithm for c in expected] == [ChecksumAlgorithm.MD5, ChecksumAlgorithm.CRC32C]
    assert expected.trailer_names() == []
    assert expected.sdk_algorithm is ChecksumAlgorithm.CRC32C
    hashers = expected.hashers()
    for h in hashers:
        h.update(data)
    assert expected.verify(hashers, {}) == {
        "x-amz-checksum-crc32c": headers["x-amz-checksum-crc32c"]
    }
    hashers = expected.hashers()
    for h in hashers:
        h.update(b"other")
    with pytest.raises(S3Error) as info:
        expected.verify(hashers, {})
    assert info.value.code == "BadDigest" and info.value.status == 400
    assert info.value.message == "The Content-MD5 you specified did not match what we received."


def test_from_headers_trailer_checksum_multidict() -> None:
    headers = CIMultiDictProxy(
        CIMultiDict(
            {
                "X-Amz-Trailer": "x-amz-checksum-crc64nvme",
                "X-Amz-Sdk-Checksum-Algorithm": "CRC64NVME",
            }
        )
    )
    expected = from_headers(headers)
    assert expected.trailer_names() == ["x-amz-checksum-crc64nvme"]
    flexible = expected.flexible
    assert flexible is not None and flexible.in_trailer and flexible.value is None
    hashers = expected.hashers()
    hashers[0].update(b"abc")
    good = checksum(ChecksumAlgorithm.CRC64NVME, b"abc")
    assert expected.verify(hashers, {"x-amz-checksum-crc64nvme": good}) == {
        "x-amz-checksum-crc64nvme": good
    }
    bad = checksum(ChecksumAlgorithm.CRC64NVME, b"abd")
    with pytest.raises(S3Error) as info:
        expected.verify(hashers, {"x-amz-checksum-crc64nvme": bad})
    assert info.value.code == "BadDigest"
    assert (
        info.value.message == "The CRC64NVME you specified did not match the calculated checksum."
    )
    for trailers, code in (
        ({}, "MalformedTrailerError"),
        ({"x-amz-checksum-crc64nvme": "AAAA"}, "InvalidRequest"),
    ):
        with pytest.raises(S3Error) as info:
            expected.verify(hashers, trailers)
        assert info.value.code == code


@pytest.mark.parametrize(
    "headers,code",
    [
        ({"content-md5": "not base64!"}, "InvalidDigest"),
        ({"content-md5": b64(b"short")}, "InvalidDigest"),
        ({"x-amz-checksum-crc32": b64(b"12345")}, "InvalidRequest"),
        ({"x-amz-checksum-sha256": "!!!!"}, "InvalidRequest"),
        (
            {"x-amz-checksum-crc32": "AAAAAA==", "x-amz-checksum-crc32c": "AAAAAA=="},
            "InvalidRequest",
        ),
        (
            {"x-amz-checksum-crc32": "AAAAAA==", "x-amz-trailer": "x-amz-checksum-crc32"},
            "InvalidRequest",
        ),
        ({"x-amz-checksum-md4": "AAAAAA=="}, "InvalidRequest"),
        ({"x-amz-trailer": "x-amz-meta-foo"}, "InvalidRequest"),
        ({"x-amz-sdk-checksum-algorithm": "CRC32"}, "InvalidRequest"),
        (
            {"x-amz-sdk-checksum-algorithm": "MD5", "x-amz-checksum-crc32": "AAAAAA=="},
            "InvalidRequest",
        ),
        (
            {"x-amz-sdk-checksum-algorithm": "SHA1", "x-amz-checksum-crc32": "AAAAAA=="},
            "InvalidRequest",
        ),
    ],
)
def test_from_headers_rejects(headers: dict[str, str], code: str) -> None:
    with pytest.raises(S3Error) as info:
        from_headers(headers)
    assert (info.value.code, info.value.status) == (code, 400)


def test_from_headers_nothing() -> None:
    expected = from_headers({"content-type": "x"})
    assert len(expected) == 0 and expected.flexible is None and expected.hashers() == []
    assert isinstance(expected, Expected)


def test_verify_function() -> None:
    exp = ExpectedChecksum(ChecksumAlgorithm.CRC32, checksum(ChecksumAlgorithm.CRC32, b"x"))
    verify(exp, checksum(ChecksumAlgorithm.CRC32, b"x"))
    with pytest.raises(S3Error) as info:
        verify(exp, checksum(ChecksumAlgorithm.CRC32, b"y"))
    assert info.value.code == "BadDigest"
    assert info.value.message == "The CRC32 you specified did not match the calculated checksum."


# --------------------------------------------------------------- multipart


def _parts(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.choice([0, 1, 17, 4096, 70_000])) for _ in range(rng.randint(1, 7))]


@pytest.mark.parametrize("alg", list(CHECK_VALUES))
@pytest.mark.parametrize("seed", range(5))
def test_full_object_combine_equals_whole(alg: ChecksumAlgorithm, seed: int) -> None:
    parts = _parts(seed)
    combined = combine_full_object(alg, [(checksum(alg, p), len(p)) for p in parts])
    assert combined == checksum(alg, b"".join(parts))


@pytest.mark.parametrize(
    "alg",
    [
        ChecksumAlgorithm.CRC32,
        ChecksumAlgorithm.CRC32C,
        ChecksumAlgorithm.SHA1,
        ChecksumAlgorithm.SHA256,
    ],
)
def test_composite(alg: ChecksumAlgorithm) -> None:
    parts = _parts(11)
    digests = [checksum(alg, p) for p in parts]
    raw = b"".join(base64.b64decode(d) for d in digests)
    assert combine_composite(alg, digests) == f"{checksum(alg, raw)}-{len(parts)}"


def test_composite_known_value() -> None:
    # Two parts "a" and "b" with CRC32: crc32(crc32("a") || crc32("b")), digests big-endian.
    a = checksum(ChecksumAlgorithm.CRC32, b"a")
    b = checksum(ChecksumAlgorithm.CRC32, b"b")
    assert (base64.b64decode(a).hex(), base64.b64decode(b).hex()) == ("e8b7be43", "71beeff9")
    expected = zlib.crc32(bytes.fromhex("e8b7be4371beeff9")).to_bytes(4, "big")
    assert combine_composite(ChecksumAlgorithm.CRC32, [a, b]) == f"{b64(expected)}-2"


def test_combine_rejects() -> None:
    with pytest.raises(S3Error):
        combine_composite(ChecksumAlgorithm.CRC64NVME, ["AAAAAAAAAAA="])
    with pytest.raises(S3Error):
        combine_full_object(
            ChecksumAlgorithm.SHA256, [(checksum(ChecksumAlgorithm.SHA256, b""), 0)]
        )
    with pytest.raises(S3Error):
        combine_full_object(ChecksumAlgorithm.CRC32, [("bad", 1)])
