"""The client's checksum of an encrypted object, stored encrypted in its envelope.

S3 returns the checksum a client uploaded with (``x-amz-checksum-<alg>``) on full-object
reads when asked (``x-amz-checksum-mode: ENABLED``).  The proxy keeps it in the envelope's
``x-amz-meta-cmek-ck`` value, encrypted so that the backend learns nothing about the
plaintext from it:

    checksum key = HKDF(ikm=object_key, info="cmek-proxy/v1/checksum")
    value        = base64(nonce(12) || AES-GCM(checksum key, nonce, text, aad))
    text         = "<ALGORITHM>:<TYPE>:<base64 checksum>"      e.g. "CRC32:FULL_OBJECT:AAAAAA=="
    aad          = lp("cmek-proxy/v1/checksum") || lp(utf8(bucket)) || lp(utf8(key))

The object key already binds the layout; the aad binds the name, so a checksum cannot be
moved to another object.  A copy re-encrypts it for the destination name.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.errors import IntegrityError
from proxy.wire.checksums import ChecksumAlgorithm

_LABEL: Final = b"cmek-proxy/v1/checksum"
_NONCE: Final = 12
FULL_OBJECT: Final = "FULL_OBJECT"
COMPOSITE: Final = "COMPOSITE"


@dataclass(frozen=True)
class StoredChecksum:
    """A plaintext checksum as S3 reports it."""

    algorithm: ChecksumAlgorithm
    value: str
    type: str = FULL_OBJECT

    def headers(self) -> dict[str, str]:
        return {self.algorithm.header: self.value, "x-amz-checksum-type": self.type}

    def text(self) -> str:
        return f"{self.algorithm.value}:{self.type}:{self.value}"

    @classmethod
    def parse(cls, text: str) -> StoredChecksum:
        alg, sep1, rest = text.partition(":")
        ctype, sep2, value = rest.partition(":")
        if not (sep1 and sep2 and value) or ctype not in (FULL_OBJECT, COMPOSITE):
            raise IntegrityError("stored checksum does not parse")
        try:
            algorithm = ChecksumAlgorithm(alg)
        except ValueError:
            raise IntegrityError("stored checksum names an unknown algorithm") from None
        return cls(algorithm, value, ctype)


def _lp(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


def _aead(object_key: bytes) -> AESGCM:
    hkdf = HKDF(algorithm=SHA256(), length=32, salt=None, info=_LABEL)
    return AESGCM(hkdf.derive(object_key))


def _aad(bucket: str, key: str) -> bytes:
    return _lp(_LABEL) + _lp(bucket.encode("utf-8")) + _lp(key.encode("utf-8"))


def seal_checksum(object_key: bytes, bucket: str, key: str, checksum: StoredChecksum) -> str:
    """The envelope value that stores ``checksum`` for object ``bucket/key``."""
    nonce = os.urandom(_NONCE)
    sealed = _aead(object_key).encrypt(nonce, checksum.text().encode(), _aad(bucket, key))
    return base64.b64encode(nonce + sealed).decode("ascii").rstrip("=")


def open_checksum(object_key: bytes, bucket: str, key: str, value: str) -> StoredChecksum:
    """Decrypt an envelope checksum value; ``IntegrityError`` if it was changed or moved."""
    try:
        raw = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise IntegrityError("stored checksum is not base64") from None
    if len(raw) <= _NONCE + 16:
        raise IntegrityError("stored checksum is too short")
    try:
        text = _aead(object_key).decrypt(raw[:_NONCE], raw[_NONCE:], _aad(bucket, key))
    except InvalidTag:
        raise IntegrityError("stored checksum does not authenticate") from None
    return StoredChecksum.parse(text.decode("utf-8", "replace"))


def reseal_checksum(
    object_key: bytes, value: str, source: tuple[str, str], destination: tuple[str, str]
) -> str:
    """Re-encrypt a stored checksum of a copied object for its new name."""
    checksum = open_checksum(object_key, source[0], source[1], value)
    return seal_checksum(object_key, destination[0], destination[1], checksum)
