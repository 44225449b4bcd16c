"""S3 checksums: Content-MD5 and the flexible ``x-amz-checksum-*`` algorithms.

Checksums are always over the plaintext the client sent. CRC32 uses ``zlib``,
CRC32C and CRC64NVME use ``awscrt.checksums`` (AWS's own implementation), the SHA
family and MD5 use ``hashlib``. All digests travel base64-encoded; CRCs as their
big-endian bytes.

Error codes follow S3: an invalid ``Content-MD5`` is ``InvalidDigest``; an invalid
``x-amz-checksum-*`` value, several checksum algorithms at once, or an unknown
algorithm is ``InvalidRequest``; a mismatch is ``BadDigest``.

Multipart helpers: :func:`combine_composite` gives the ``<base64>-N`` value S3
returns for COMPOSITE checksums, :func:`combine_full_object` the FULL_OBJECT CRC of
the whole object from the parts' CRCs and lengths.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from awscrt import checksums as crt

from proxy.errors import S3Error


class ChecksumAlgorithm(Enum):
    """S3 checksum algorithms (value: the name S3 uses)."""

    CRC32 = "CRC32"
    CRC32C = "CRC32C"
    CRC64NVME = "CRC64NVME"
    SHA1 = "SHA1"
    SHA256 = "SHA256"
    MD5 = "MD5"  # Content-MD5 only

    @property
    def header(self) -> str:
        """The request/response header carrying this checksum."""
        if self is ChecksumAlgorithm.MD5:
            return "content-md5"
        return f"x-amz-checksum-{self.value.lower()}"

    @property
    def digest_size(self) -> int:
        """Length in bytes of the raw digest."""
        return _DIGEST_SIZE[self]

    @property
    def is_crc(self) -> bool:
        """True for the CRC family (these support FULL_OBJECT multipart checksums)."""
        return self in _CRC_FUNCS

    @classmethod
    def from_name(cls, name: str) -> ChecksumAlgorithm:
        """Parse a flexible-checksum algorithm name (case-insensitive); MD5 is not one."""
        try:
            alg = cls(name.strip().upper())
        except ValueError:
            alg = ChecksumAlgorithm.MD5
        if alg is ChecksumAlgorithm.MD5:
            raise _unsupported_algorithm()
        return alg


_DIGEST_SIZE = {
    ChecksumAlgorithm.CRC32: 4,
    ChecksumAlgorithm.CRC32C: 4,
    ChecksumAlgorithm.CRC64NVME: 8,
    ChecksumAlgorithm.SHA1: 20,
    ChecksumAlgorithm.SHA256: 32,
    ChecksumAlgorithm.MD5: 16,
}

CrcFunc = Callable[[bytes | memoryview, int], int]

_CRC_FUNCS: dict[ChecksumAlgorithm, CrcFunc] = {
    ChecksumAlgorithm.CRC32: zlib.crc32,
    ChecksumAlgorithm.CRC32C: crt.crc32c,
    ChecksumAlgorithm.CRC64NVME: crt.crc64nvme,
}

_CRC_COMBINE: dict[ChecksumAlgorithm, Callable[[int, int, int], int]] = {
    ChecksumAlgorithm.CRC32: crt.combine_crc32,
    ChecksumAlgorithm.CRC32C: crt.combine_crc32c,
    ChecksumAlgorithm.CRC64NVME: crt.combine_crc64nvme,
}

_HASHLIB_NAMES = {
    ChecksumAlgorithm.SHA1: "sha1",
    ChecksumAlgorithm.SHA256: "sha256",
    ChecksumAlgorithm.MD5: "md5",
}

FLEXIBLE = (
    ChecksumAlgorithm.CRC32,
    ChecksumAlgorithm.CRC32C,
    ChecksumAlgorithm.CRC64NVME,
    ChecksumAlgorithm.SHA1,
    ChecksumAlgorithm.SHA256,
)
_BY_HEADER = {alg.header: alg for alg in FLEXIBLE}
# x-amz-checksum-* headers that are not checksum values.
_NOT_VALUES = frozenset({"x-amz-checksum-type", "x-amz-checksum-mode", "x-amz-checksum-algorithm"})


def _unsupported_algorithm() -> S3Error:
    return S3Error(
        "InvalidRequest",
        "Checksum algorithm provided is unsupported. Please try again with any of the valid "
        "types: [CRC32, CRC32C, CRC64NVME, SHA1, SHA256]",
        400,
    )


# ------------------------------------------------------------------- hashers


class Hasher(Protocol):
    """An incremental checksum."""

    @property
    def algorithm(self) -> ChecksumAlgorithm: ...

    def update(self, data: bytes | memoryview) -> None: ...

    def digest(self) -> bytes: ...

    def b64digest(self) -> str: ...


class CrcHasher:
    """Incremental CRC32 / CRC32C / CRC64NVME; also tracks the length (for combining)."""

    __slots__ = ("_algorithm", "_func", "_size", "crc", "length")

    def __init__(self, algorithm: ChecksumAlgorithm) -> None:
        self._algorithm = algorithm
        self._func = _CRC_FUNCS[algorithm]
        self._size = algorithm.digest_size
        self.crc = 0
        self.length = 0

    @property
    def algorithm(self) -> ChecksumAlgorithm:
        return self._algorithm

    def update(self, data: bytes | memoryview) -> None:
        self.crc = self._func(data, self.crc)
        self.length += len(data)

    def digest(self) -> bytes:
        return self.crc.to_bytes(self._size, "big")

    def b64digest(self) -> str:
        return base64.b64encode(self.digest()).decode("ascii")


class HashlibHasher:
    """Incremental SHA1 / SHA256 / MD5."""

    __slots__ = ("_algorithm", "_hash")

    def __init__(self, algorithm: ChecksumAlgorithm) -> None:
        self._algorithm = algorithm
        name = _HASHLIB_NAMES[algorithm]
        self._hash = hashlib.new(name, usedforsecurity=algorithm is not ChecksumAlgorithm.MD5)

    @property
    def algorithm(self) -> ChecksumAlgorithm:
        return self._algorithm

    def update(self, data: bytes | memoryview) -> None:
        self._hash.update(data)

    def digest(self) -> bytes:
        return self._hash.digest()

    def b64digest(self) -> str:
        return base64.b64encode(self._hash.digest()).decode("ascii")


def new_hasher(algorithm: ChecksumAlgorithm) -> Hasher:
    """A fresh incremental hasher for ``algorithm``."""
    if algorithm.is_crc:
        return CrcHasher(algorithm)
    return HashlibHasher(algorithm)


def checksum(algorithm: ChecksumAlgorithm, data: bytes | memoryview) -> str:
    """One-shot base64 checksum."""
    hasher = new_hasher(algorithm)
    hasher.update(data)
    return hasher.b64digest()


# ------------------------------------------------------------ what was sent


def decode_digest(algorithm: ChecksumAlgorithm, value: str) -> bytes | None:
    """The raw digest of a base64 value, or ``None`` if it is not valid for ``algorithm``."""
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == algorithm.digest_size else None


def _invalid_value(algorithm: ChecksumAlgorithm, where: str = "header") -> S3Error:
    if algorithm is ChecksumAlgorithm.MD5:
        return S3Error("InvalidDigest", "The Content-MD5 you specified was invalid.", 400)
    return S3Error("InvalidRequest", f"Value for {algorithm.header} {where} is invalid.", 400)


@dataclass(frozen=True, slots=True)
class ExpectedChecksum:
    """A checksum the client declared: its value, or ``None`` when it comes in the trailer."""

    algorithm: ChecksumAlgorithm
    value: str | None
    in_trailer: bool = False

    @property
    def header(self) -> str:
        """``content-md5`` or ``x-amz-checksum-<alg>``."""
        return self.algorithm.header


def verify(expected: ExpectedChecksum, computed: str) -> None:
    """Compare a declared checksum with the computed base64 value; ``BadDigest`` if not equal."""
    if expected.value is None:
        raise ValueError("the expected checksum has no value yet (it comes in the trailer)")
    want = decode_digest(expected.algorithm, expected.value)
    got = base64.b64decode(computed)
    if want is None:
        raise _invalid_value(expected.algorithm)
    if want != got:
        if expected.algorithm is ChecksumAlgorithm.MD5:
            raise S3Error(
                "BadDigest", "The Content-MD5 you specified did not match what we received.", 400
            )
        raise S3Error(
            "BadDigest",
            f"The {expected.algorithm.value} you specified did not match the calculated checksum.",
            400,
        )


class Expected(Sequence[ExpectedChecksum]):
    """Every checksum a request declared (at most one flexible one, plus Content-MD5)."""

    __slots__ = ("_checksums", "sdk_algorithm")

    def __init__(
        self,
        checksums: Sequence[ExpectedChecksum],
        sdk_algorithm: ChecksumAlgorithm | None = None,
    ) -> None:
        self._checksums = tuple(checksums)
        self.sdk_algorithm = sdk_algorithm

    def __getitem__(self, index: int) -> ExpectedChecksum:  # type: ignore[override]
        return self._checksums[index]

    def __len__(self) -> int:
        return len(self._checksums)

    def __iter__(self) -> Iterator[ExpectedChecksum]:
        return iter(self._checksums)

    def __repr__(self) -> str:
        return f"Expected({[c.header for c in self._checksums]})"

    @property
    def flexible(self) -> ExpectedChecksum | None:
        """The declared ``x-amz-checksum-*`` checksum, if any."""
        for c in self._checksums:
            if c.algorithm is not ChecksumAlgorithm.MD5:
                return c
        return None

    def hashers(self) -> list[Hasher]:
        """One fresh hasher per declared checksum, in order."""
        return [new_hasher(c.algorithm) for c in self._checksums]

    def trailer_names(self) -> list[str]:
        """Names the aws-chunked trailer must carry (from ``x-amz-trailer``)."""
        return [c.header for c in self._checksums if c.in_trailer]

    def verify(self, hashers: Sequence[Hasher], trailers: Mapping[str, str]) -> dict[str, str]:
        """Check every declared checksum against ``hashers`` (from :meth:`hashers`).

        Trailer values are taken from ``trailers``. Returns the verified flexible
        checksums as ``{header name: base64 value}`` (Content-MD5 is not included).
        """
        if len(hashers) != len(self._checksums):
            raise ValueError("one hasher per expected checksum")
        verified: dict[str, str] = {}
        for exp, hasher in zip(self._checksums, hashers, strict=True):
            if exp.in_trailer:
                value = trailers.get(exp.header)
                if value is None:
                    raise S3Error(
                        "MalformedTrailerError",
                        f"The request contained trailing data that was not well-formed: "
                        f"{exp.header} is missing",
                        400,
                    )
                if decode_digest(exp.algorithm, value) is None:
                    raise _invalid_value(exp.algorithm, "trailing header")
                exp = ExpectedChecksum(exp.algorithm, value.strip(), in_trailer=True)
            computed = hasher.b64digest()
            verify(exp, computed)
            if exp.algorithm is not ChecksumAlgorithm.MD5:
                verified[exp.header] = computed
        return verified


def _multiple() -> S3Error:
    return S3Error(
        "InvalidRequest",
        "Expecting a single x-amz-checksum- header. Multiple checksum Types are not allowed.",
        400,
    )


def from_headers(headers: Mapping[str, str]) -> Expected:
    """Read Content-MD5, ``x-amz-checksum-*``, ``x-amz-sdk-checksum-algorithm``, ``x-amz-trailer``.

    ``headers`` is case-insensitive (aiohttp's) or has lower-case names.
    """
    found: list[ExpectedChecksum] = []
    md5 = headers.get("content-md5")
    if md5 is not None:
        if decode_digest(ChecksumAlgorithm.MD5, md5) is None:
            raise _invalid_value(ChecksumAlgorithm.MD5)
        found.append(ExpectedChecksum(ChecksumAlgorithm.MD5, md5.strip()))
    flexible: ExpectedChecksum | None = None
    for name in headers:
        lname = name.lower()
        if not lname.startswith("x-amz-checksum-") or lname in _NOT_VALUES:
            continue
        alg = _BY_HEADER.get(lname)
        if alg is None:
            raise _unsupported_algorithm()
        value = headers[name]
        if decode_digest(alg, value) is None:
            raise _invalid_value(alg)
        if flexible is not None:
            if flexible.algorithm is alg:
                continue
            raise _multiple()
        flexible = ExpectedChecksum(alg, value.strip())
    trailer = headers.get("x-amz-trailer")
    if trailer is not None:
        for item in trailer.split(","):
            tname = item.strip().lower()
            if not tname:
                continue
            alg = _BY_HEADER.get(tname)
            if alg is None:
                raise S3Error(
                    "InvalidRequest",
                    "The value specified in the x-amz-trailer header is not supported",
                    400,
                )
            if flexible is not None:
                raise _multiple()
            flexible = ExpectedChecksum(alg, None, in_trailer=True)
    sdk_value = headers.get("x-amz-sdk-checksum-algorithm")
    sdk: ChecksumAlgorithm | None = None
    if sdk_value is not None:
        sdk = ChecksumAlgorithm.from_name(sdk_value)
        if flexible is None:
            raise S3Error(
                "InvalidRequest",
                "x-amz-sdk-checksum-algorithm specified, but no corresponding x-amz-checksum-* "
                "or x-amz-trailer headers were found.",
                400,
            )
        if flexible.algorithm is not sdk:
            raise S3Error(
                "InvalidRequest", "Value for x-amz-sdk-checksum-algorithm header is invalid.", 400
            )
    if flexible is not None:
        found.append(flexible)
    return Expected(found, sdk)


# ------------------------------------------------------------- multipart


def combine_composite(algorithm: ChecksumAlgorithm, part_digests: Sequence[str]) -> str:
    """The COMPOSITE multipart checksum: ``base64(H(d1 || d2 || ...))-N``.

    ``part_digests`` are the parts' base64 checksums in part order. S3 allows
    COMPOSITE for CRC32, CRC32C, SHA1 and SHA256.
    """
    if algorithm in (ChecksumAlgorithm.CRC64NVME, ChecksumAlgorithm.MD5):
        raise S3Error(
            "InvalidRequest",
            f"The {algorithm.value} checksum algorithm does not support the COMPOSITE "
            "checksum type.",
            400,
        )
    if not part_digests:
        raise ValueError("a multipart upload has at least one part")
    hasher = new_hasher(algorithm)
    for value in part_digests:
        raw = decode_digest(algorithm, value)
        if raw is None:
            raise _invalid_value(algorithm)
        hasher.update(raw)
    return f"{hasher.b64digest()}-{len(part_digests)}"


def combine_full_object(algorithm: ChecksumAlgorithm, parts: Sequence[tuple[str, int]]) -> str:
    """The FULL_OBJECT CRC of the concatenated parts, from ``(base64 crc, length)`` pairs."""
    combine = _CRC_COMBINE.get(algorithm)
    if combine is None:
        raise S3Error(
            "InvalidRequest",
            f"The {algorithm.value} checksum algorithm does not support the FULL_OBJECT "
            "checksum type.",
            400,
        )
    size = algorithm.digest_size
    crc = 0
    for value, length in parts:
        raw = decode_digest(algorithm, value)
        if raw is None:
            raise _invalid_value(algorithm)
        if length < 0:
            raise ValueError("part length must be >= 0")
        crc = combine(crc, int.from_bytes(raw, "big"), length)
    return base64.b64encode(crc.to_bytes(size, "big")).decode("ascii")
