"""The metadata envelope of an encrypted object (docs/FORMAT.md section 7).

This module holds the one set of metadata-name constants; every other module uses these.
Names are lower-case full header names; backends may return them in any case.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.crypto.seal import SEALED_KEY_SIZE
from proxy.crypto.sizes import FORMAT_VERSION
from proxy.errors import FormatError

META_PREFIX = "x-amz-meta-"
INTERNAL_PREFIX = "x-amz-meta-cmek-"
M_VERSION = "x-amz-meta-cmek-v"
M_KEK = "x-amz-meta-cmek-kek"
M_KEK_VERSION = "x-amz-meta-cmek-kekv"
M_DATA_KEY = "x-amz-meta-cmek-dk"
M_OBJECT_KEY = "x-amz-meta-cmek-ok"
M_LAYOUT = "x-amz-meta-cmek-layout"
M_CHECKSUM = "x-amz-meta-cmek-ck"

LAYOUT_SINGLE = "s"
LAYOUT_MULTIPART = "m"

_REQUIRED = (M_VERSION, M_KEK, M_DATA_KEY, M_OBJECT_KEY, M_LAYOUT)
_KNOWN = frozenset((*_REQUIRED, M_KEK_VERSION, M_CHECKSUM))


@dataclass(frozen=True)
class Envelope:
    """What a reader needs, besides the KMS, to open an object's key."""

    kek_uri: str
    kek_version: str
    wrapped_data_key: bytes = field(repr=False)
    sealed_object_key: bytes = field(repr=False)
    multipart: bool
    checksum: str | None = None


def _check_text(name: str, value: str, *, allow_empty: bool) -> None:
    if not value and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    if value != value.strip() or any(not 0x20 <= ord(c) <= 0x7E for c in value):
        raise ValueError(f"{name} must be printable ASCII without surrounding spaces")


def _b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _b64decode(name: str, value: str) -> bytes:
    unpadded = value.rstrip("=")
    try:
        raw = base64.b64decode(unpadded + "=" * (-len(unpadded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"metadata {name} is not valid base64") from None
    canonical = base64.b64encode(raw).decode("ascii")
    if value not in (canonical, canonical.rstrip("=")):
        raise FormatError(f"metadata {name} is not canonical base64")
    return raw


def to_metadata(env: Envelope) -> dict[str, str]:
    """The backend metadata headers that store ``env``."""
    _check_text("kek_uri", env.kek_uri, allow_empty=False)
    _check_text("kek_version", env.kek_version, allow_empty=True)
    if not env.wrapped_data_key:
        raise ValueError("wrapped data key must not be empty")
    if len(env.sealed_object_key) != SEALED_KEY_SIZE:
        raise ValueError(f"sealed object key must be {SEALED_KEY_SIZE} bytes")
    meta = {
        M_VERSION: str(FORMAT_VERSION),
        M_KEK: env.kek_uri,
        M_DATA_KEY: _b64encode(env.wrapped_data_key),
        M_OBJECT_KEY: _b64encode(env.sealed_object_key),
        M_LAYOUT: LAYOUT_MULTIPART if env.multipart else LAYOUT_SINGLE,
    }
    if env.kek_version:  # omitted when empty: some backends drop empty metadata values
        meta[M_KEK_VERSION] = env.kek_version
    if env.checksum is not None:
        _check_text("checksum", env.checksum, allow_empty=False)
        meta[M_CHECKSUM] = env.checksum
    return meta


def from_metadata(headers: Mapping[str, str]) -> Envelope | None:
    """Parse the envelope from backend headers (names compared case-insensitively).

    Returns ``None`` when there is no ``x-amz-meta-cmek-*`` name at all (a plaintext object);
    raises ``FormatError`` when the envelope is partial, garbled or of an unknown version.
    """
    found: dict[str, str] = {}
    for name, value in headers.items():
        lower = name.lower()
        if not lower.startswith(INTERNAL_PREFIX):
            continue
        if lower in found:
            raise FormatError(f"metadata {lower} appears more than once")
        found[lower] = value.strip()
    if not found:
        return None
    version = found.get(M_VERSION)
    if version is None:
        raise FormatError(f"metadata {M_VERSION} is missing")
    if version != str(FORMAT_VERSION):
        raise FormatError(f"unsupported format version {version[:16]!r}")
    unknown = sorted(found.keys() - _KNOWN)
    if unknown:
        raise FormatError(f"unknown cmek metadata {', '.join(unknown)}")
    missing = [name for name in _REQUIRED if name not in found]
    if missing:
        raise FormatError(f"metadata {', '.join(missing)} missing")
    if not found[M_KEK]:
        raise FormatError(f"metadata {M_KEK} is empty")
    wrapped = _b64decode(M_DATA_KEY, found[M_DATA_KEY])
    if not wrapped:
        raise FormatError(f"metadata {M_DATA_KEY} is empty")
    sealed = _b64decode(M_OBJECT_KEY, found[M_OBJECT_KEY])
    if len(sealed) != SEALED_KEY_SIZE:
        raise FormatError(f"metadata {M_OBJECT_KEY} must hold {SEALED_KEY_SIZE} bytes")
    layout = found[M_LAYOUT]
    if layout not in (LAYOUT_SINGLE, LAYOUT_MULTIPART):
        raise FormatError(f"metadata {M_LAYOUT} must be {LAYOUT_SINGLE!r} or {LAYOUT_MULTIPART!r}")
    checksum = found.get(M_CHECKSUM)
    return Envelope(
        kek_uri=found[M_KEK],
        kek_version=found.get(M_KEK_VERSION, ""),
        wrapped_data_key=wrapped,
        sealed_object_key=sealed,
        multipart=layout == LAYOUT_MULTIPART,
        checksum=checksum if checksum else None,
    )


def is_internal(name: str) -> bool:
    """Whether a header name is one of the proxy's own ``x-amz-meta-cmek-*`` names."""
    return name.lower().startswith(INTERNAL_PREFIX)


def strip_internal(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` without the proxy's own ``x-amz-meta-cmek-*`` names."""
    return {name: value for name, value in headers.items() if not is_internal(name)}
