"""Sealing of object keys under a data key, bound to bucket, key and layout (FORMAT.md s. 3)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.crypto.layout import PartLayout
from proxy.crypto.segments import OBJECT_KEY_SIZE, RandomBytes
from proxy.crypto.sizes import FORMAT_VERSION
from proxy.errors import IntegrityError

DATA_KEY_SIZE = 32
SEAL_NONCE_SIZE = 12
SEALED_KEY_SIZE = SEAL_NONCE_SIZE + OBJECT_KEY_SIZE + 16
_SEAL_LABEL = b"cmek-proxy/v1/seal"
_SEAL_LABEL_V2 = b"cmek-proxy/v2/seal"
ENVELOPE_VERSION_LAYOUT = 2
"""The envelope version of multipart objects whose layout is bound (FORMAT.md section 5.1)."""


@dataclass(frozen=True)
class Binding:
    """Where an object key belongs: its bucket, object key (name) and layout."""

    bucket: str
    key: str
    multipart: bool
    layout: PartLayout | None = None
    """v2: the completed multipart object's part layout."""
    pending: bool = False
    """v2: a multipart upload not completed yet (its key opens for parts, never for reads)."""

    def __post_init__(self) -> None:
        check_layout(self.multipart, self.layout, self.pending)

    @property
    def version(self) -> int:
        return layout_version(self.layout, self.pending)


def check_layout(multipart: bool, layout: PartLayout | None, pending: bool) -> None:
    """A layout or the pending mark only on multipart objects, and never both."""
    if (layout is not None or pending) and not multipart:
        raise ValueError("only multipart objects carry a layout")
    if layout is not None and pending:
        raise ValueError("a pending upload has no layout yet")


def layout_version(layout: PartLayout | None, pending: bool) -> int:
    """The format version of a binding or envelope: 2 with a layout or pending, else 1."""
    return ENVELOPE_VERSION_LAYOUT if layout is not None or pending else 1


def _lp(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


def seal_aad(binding: Binding) -> bytes:
    """The canonical associated data of a sealed object key for ``binding``."""
    if binding.version == ENVELOPE_VERSION_LAYOUT:
        bound = b"\x02" if binding.layout is None else b"\x01" + binding.layout.to_bytes()
        return b"".join(
            (
                _lp(_SEAL_LABEL_V2),
                ENVELOPE_VERSION_LAYOUT.to_bytes(1, "big"),
                _lp(binding.bucket.encode("utf-8")),
                _lp(binding.key.encode("utf-8")),
                bound,
            )
        )
    return b"".join(
        (
            _lp(_SEAL_LABEL),
            FORMAT_VERSION.to_bytes(1, "big"),
            _lp(binding.bucket.encode("utf-8")),
            _lp(binding.key.encode("utf-8")),
            b"\x01" if binding.multipart else b"\x00",
        )
    )


def _sealing_aead(data_key: bytes) -> AESGCM:
    if len(data_key) != DATA_KEY_SIZE:
        raise ValueError(f"data key must be {DATA_KEY_SIZE} bytes")
    hkdf = HKDF(algorithm=SHA256(), length=32, salt=None, info=_SEAL_LABEL)
    return AESGCM(hkdf.derive(data_key))


def seal_object_key(
    data_key: bytes,
    object_key: bytes,
    binding: Binding,
    *,
    random_bytes: RandomBytes = os.urandom,
) -> bytes:
    """Seal ``object_key``: ``nonce(12) || ciphertext(32) || tag(16)``, 60 bytes."""
    if len(object_key) != OBJECT_KEY_SIZE:
        raise ValueError(f"object key must be {OBJECT_KEY_SIZE} bytes")
    aead = _sealing_aead(data_key)
    nonce = random_bytes(SEAL_NONCE_SIZE)
    if len(nonce) != SEAL_NONCE_SIZE:
        raise ValueError(f"random_bytes must return {SEAL_NONCE_SIZE} bytes")
    return nonce + aead.encrypt(nonce, bytes(object_key), seal_aad(binding))


def open_object_key(data_key: bytes, sealed: bytes, binding: Binding) -> bytes:
    """Open a sealed object key; ``IntegrityError`` if anything differs from sealing time."""
    aead = _sealing_aead(data_key)
    if len(sealed) != SEALED_KEY_SIZE:
        raise IntegrityError(f"sealed object key must be {SEALED_KEY_SIZE} bytes")
    try:
        return aead.decrypt(sealed[:SEAL_NONCE_SIZE], sealed[SEAL_NONCE_SIZE:], seal_aad(binding))
    except InvalidTag:
        raise IntegrityError(
            "sealed object key does not open (wrong data key, bucket, key or layout)"
        ) from None


def reseal(
    source_data_key: bytes,
    sealed: bytes,
    source: Binding,
    destination_data_key: bytes,
    destination: Binding,
    *,
    random_bytes: RandomBytes = os.urandom,
) -> bytes:
    """Re-seal an object key for a copy: open with the source's, seal with the destination's."""
    object_key = open_object_key(source_data_key, sealed, source)
    return seal_object_key(destination_data_key, object_key, destination, random_bytes=random_bytes)
