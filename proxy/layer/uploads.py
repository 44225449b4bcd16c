"""Multipart upload state and the documents of CompleteMultipartUpload (see multipart.py)."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final
from xml.etree import ElementTree

from proxy import crypto
from proxy.errors import FormatError, S3Error
from proxy.layer.checksum_store import COMPOSITE, FULL_OBJECT, StoredChecksum
from proxy.wire import checksums
from proxy.wire.checksums import ChecksumAlgorithm
from proxy.wire.reserved import RESERVED_PREFIX
from proxy.wire.xmldoc import local

STATE_PREFIX: Final = RESERVED_PREFIX + "uploads/"
MIN_PART_SIZE: Final = 5 * 1024 * 1024
MAX_COPY_SIZE: Final = 5 * 1024**3
"""Largest object a backend CopyObject handles (S3's limit)."""
_STATE_VERSION: Final = 1


def malformed() -> S3Error:
    return S3Error(
        "MalformedXML",
        "The XML you provided was not well-formed or did not validate against our published schema",
        400,
    )


def no_such_upload() -> S3Error:
    return S3Error(
        "NoSuchUpload",
        "The specified upload does not exist. The upload ID may be invalid, or the upload "
        "may have been aborted or completed.",
        404,
    )


def invalid_part(number: int) -> S3Error:
    return S3Error(
        "InvalidPart",
        "One or more of the specified parts could not be found. The part may not have been "
        "uploaded, or the specified entity tag may not match the part's entity tag.",
        400,
        extra={"PartNumber": str(number)},
    )


@dataclass(frozen=True)
class Completion:
    """What a completed upload answered, so that a repeated Complete answers the same."""

    parts: tuple[tuple[int, str], ...]
    """(part number, backend ETag without quotes) as completed."""
    etag: str
    headers: dict[str, str] = field(default_factory=dict)
    fields: tuple[tuple[str, str], ...] = ()
    """Checksum fields of the CompleteMultipartUploadResult."""

    def to_json(self) -> dict[str, object]:
        return {
            "parts": [list(p) for p in self.parts],
            "etag": self.etag,
            "headers": self.headers,
            "fields": [list(f) for f in self.fields],
        }

    @classmethod
    def from_json(cls, doc: dict[str, object]) -> Completion:
        parts = doc["parts"]
        fields = doc.get("fields", [])
        headers = doc.get("headers", {})
        if not isinstance(parts, list) or not isinstance(fields, list):
            raise TypeError("completion lists")
        if not isinstance(headers, dict):
            raise TypeError("completion headers")
        return cls(
            tuple((int(n), str(e)) for n, e in parts),
            str(doc["etag"]),
            {str(k): str(v) for k, v in headers.items()},
            tuple((str(k), str(v)) for k, v in fields),
        )


@dataclass(frozen=True)
class UploadState:
    """What any replica needs to serve a part: the envelope (None: stored as sent).

    ``done`` is set once the upload completed: the state object then stays (as S3 keeps
    answering a repeated CompleteMultipartUpload of a completed upload) and parts, ListParts
    and Abort answer NoSuchUpload. Optional fields keep older state objects readable.
    """

    bucket: str
    key: str
    envelope: crypto.Envelope | None
    checksum_algorithm: ChecksumAlgorithm | None = None
    checksum_type: str | None = None
    done: Completion | None = None
    realign: tuple[tuple[int, str, int], ...] = ()
    """(part number, backend ETag, stored size) of a non-aligned Complete, written before the
    backend's Complete: a retried Complete after a kill finishes the rewrite from it."""

    def to_json(self) -> bytes:
        doc: dict[str, object] = {
            "v": _STATE_VERSION,
            "bucket": self.bucket,
            "key": self.key,
            "meta": crypto.to_metadata(self.envelope) if self.envelope else None,
            "ck_alg": self.checksum_algorithm.value if self.checksum_algorithm else None,
            "ck_type": self.checksum_type,
        }
        if self.realign:
            doc["realign"] = [list(r) for r in self.realign]
        if self.done is not None:
            doc["done"] = self.done.to_json()
            doc["done_at"] = int(time.time())  # for a collector of completed states
        return json.dumps(doc).encode()

    @classmethod
    def from_json(cls, data: bytes) -> UploadState:
        try:
            doc = json.loads(data)
            if doc["v"] != _STATE_VERSION:
                raise FormatError("unknown upload state version")
            meta = doc["meta"]
            env = crypto.from_metadata(meta) if meta is not None else None
            alg = ChecksumAlgorithm(doc["ck_alg"]) if doc["ck_alg"] else None
            done = Completion.from_json(doc["done"]) if doc.get("done") else None
            redo = tuple((int(n), str(e), int(z)) for n, e, z in doc.get("realign", []))
            return cls(str(doc["bucket"]), str(doc["key"]), env, alg, doc["ck_type"], done, redo)
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError("upload state does not parse") from exc


@dataclass(frozen=True)
class ClientPart:
    number: int
    etag: str
    checksums: dict[str, str] = field(default_factory=dict)
    """Checksum element name (``ChecksumCRC32``) -> base64 value, as the client listed it."""


def parse_complete(body: bytes) -> list[ClientPart]:
    """The parts of a CompleteMultipartUpload document, checked for order."""
    try:
        root = ElementTree.fromstring(body)  # noqa: S314 - see xmldoc
    except ElementTree.ParseError:
        raise malformed() from None
    if local(root.tag) != "CompleteMultipartUpload":
        raise malformed()
    parts: list[ClientPart] = []
    for el in root:
        if local(el.tag) != "Part":
            continue
        fields = {local(c.tag): (c.text or "").strip() for c in el}
        number_s, etag = fields.get("PartNumber", ""), fields.get("ETag", "")
        if not number_s.isdigit() or not etag:
            raise malformed()
        number = int(number_s)
        if not 1 <= number <= crypto.MAX_PART:
            raise S3Error(
                "InvalidArgument", "Part number must be an integer between 1 and 10000", 400
            )
        cks = {k: v for k, v in fields.items() if k.startswith("Checksum") and k != "ChecksumType"}
        parts.append(ClientPart(number, etag, cks))
    if not parts:
        raise malformed()
    for a, b in itertools.pairwise(parts):
        if b.number <= a.number:
            raise S3Error(
                "InvalidPartOrder",
                "The list of parts was not in ascending order. Parts must be ordered by part "
                "number.",
                400,
            )
    return parts


def checksum_request(headers: Mapping[str, str]) -> tuple[ChecksumAlgorithm | None, str | None]:
    alg_s = headers.get("x-amz-checksum-algorithm")
    ctype = headers.get("x-amz-checksum-type")
    if alg_s is None:
        if ctype is not None:
            raise S3Error(
                "InvalidRequest", "x-amz-checksum-type requires x-amz-checksum-algorithm", 400
            )
        return None, None
    alg = ChecksumAlgorithm.from_name(alg_s)
    if ctype is None:
        ctype = FULL_OBJECT if alg is ChecksumAlgorithm.CRC64NVME else COMPOSITE
    ctype = ctype.upper()
    if ctype not in (FULL_OBJECT, COMPOSITE):
        raise S3Error("InvalidRequest", "Value for x-amz-checksum-type header is invalid.", 400)
    if ctype == FULL_OBJECT and not alg.is_crc:
        raise S3Error(
            "InvalidRequest",
            f"The {alg.value} checksum algorithm does not support the FULL_OBJECT checksum type.",
            400,
        )
    if ctype == COMPOSITE and alg is ChecksumAlgorithm.CRC64NVME:
        raise S3Error(
            "InvalidRequest",
            "The CRC64NVME checksum algorithm does not support the COMPOSITE checksum type.",
            400,
        )
    return alg, ctype


def combined_checksum(
    state: UploadState,
    parts: Sequence[ClientPart],
    sizes: Sequence[int],
    headers: Mapping[str, str],
) -> StoredChecksum | None:
    """The object's checksum as S3 computes it from the parts' checksums, if all have one."""
    alg = state.checksum_algorithm
    if alg is None:
        return None
    name = f"Checksum{alg.value}"
    values = [p.checksums.get(name) for p in parts]
    if any(v is None for v in values):
        raise S3Error(
            "InvalidRequest",
            f"The upload was created using a {alg.value} checksum. The complete request must "
            f"include the checksum for each part. It was missing for part "
            f"{next(p.number for p in parts if name not in p.checksums)} in the request.",
            400,
        )
    got = [v for v in values if v is not None]
    if state.checksum_type == FULL_OBJECT:
        value = checksums.combine_full_object(alg, list(zip(got, sizes, strict=True)))
        declared = headers.get(alg.header)
        if declared is not None and declared.strip() != value:
            raise S3Error(
                "BadDigest",
                f"The {alg.value} you specified did not match the calculated checksum.",
                400,
            )
        return StoredChecksum(alg, value, FULL_OBJECT)
    return StoredChecksum(alg, checksums.combine_composite(alg, got), COMPOSITE)


def part_number(value: str | None) -> int:
    if value is None or not value.isdigit() or not 1 <= int(value) <= crypto.MAX_PART:
        raise S3Error("InvalidArgument", "Part number must be an integer between 1 and 10000", 400)
    return int(value)
