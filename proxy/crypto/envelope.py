"""The metadata envelope of an encrypted object (docs/FORMAT.md section 7).

This module holds the one set of metadata-name constants; every other module uses these.
Names are lower-case full header names; backends may return them in any case.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.crypto.layout import PartLayout
from proxy.crypto.seal import (
    ENVELOPE_VERSION_LAYOUT,
    SEALED_KEY_SIZE,
    Binding,
    check_layout,
    layout_version,
)
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
M_REPLICAS = "x-amz-meta-cmek-kr"
"""Optional: the data key wrapped under the key's replicas (``WrappedReplica``), see
docs/FORMAT.md section 7.2."""
M_PARTS = "x-amz-meta-cmek-parts"
"""v2: the completed multipart object's layout (``PartLayout`` text), FORMAT.md section 5.1."""
MAX_REPLICAS = 3

LAYOUT_SINGLE = "s"
LAYOUT_MULTIPART = "m"
LAYOUT_PENDING = "p"

_REQUIRED = (M_VERSION, M_KEK, M_DATA_KEY, M_OBJECT_KEY, M_LAYOUT)
_KNOWN = frozenset((*_REQUIRED, M_KEK_VERSION, M_CHECKSUM, M_REPLICAS, M_PARTS))


@dataclass(frozen=True)
class WrappedReplica:
    """The same data key wrapped under another key URI that holds the same role."""

    kek_uri: str
    kek_version: str
    wrapped: bytes = field(repr=False)


@dataclass(frozen=True)
class Envelope:
    """What a reader needs, besides the KMS, to open an object's key."""

    kek_uri: str
    kek_version: str
    wrapped_data_key: bytes = field(repr=False)
    sealed_object_key: bytes = field(repr=False)
    multipart: bool
    checksum: str | None = None
    replicas: tuple[WrappedReplica, ...] = ()
    """The data key wrapped under the key's replicas (in the configured order)."""
    layout: PartLayout | None = None
    """v2: the layout of a completed multipart object, bound into its sealed object key."""
    pending: bool = False
    """v2: the envelope of a multipart upload not completed yet: never read an object with."""

    def __post_init__(self) -> None:
        check_layout(self.multipart, self.layout, self.pending)

    def binding(self, bucket: str, key: str) -> Binding:
        """What this envelope's sealed object key is bound to, at ``bucket``/``key``."""
        return Binding(bucket, key, self.multipart, self.layout, self.pending)

    @property
    def version(self) -> int:
        return layout_version(self.layout, self.pending)


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
    layout = LAYOUT_MULTIPART if env.multipart else LAYOUT_SINGLE
    meta = {
        M_VERSION: str(env.version),
        M_KEK: env.kek_uri,
        M_DATA_KEY: _b64encode(env.wrapped_data_key),
        M_OBJECT_KEY: _b64encode(env.sealed_object_key),
        M_LAYOUT: LAYOUT_PENDING if env.pending else layout,
    }
    if env.layout is not None:
        meta[M_PARTS] = env.layout.to_text()
    if env.kek_version:  # omitted when empty: some backends drop empty metadata values
        meta[M_KEK_VERSION] = env.kek_version
    if env.checksum is not None:
        _check_text("checksum", env.checksum, allow_empty=False)
        meta[M_CHECKSUM] = env.checksum
    if env.replicas:
        meta[M_REPLICAS] = _replicas_text(env)
    return meta


def _replicas_text(env: Envelope) -> str:
    """``<b64 uri>.<b64 version>.<b64 wrapped>`` per replica, joined by ``,``."""
    if len(env.replicas) > MAX_REPLICAS:
        raise ValueError(f"at most {MAX_REPLICAS} replicas")
    seen = {env.kek_uri}
    parts = []
    for r in env.replicas:
        _check_text("replica kek_uri", r.kek_uri, allow_empty=False)
        _check_text("replica kek_version", r.kek_version, allow_empty=True)
        if r.kek_uri in seen or not r.wrapped:
            raise ValueError("replica key URIs must be distinct and their wrapped keys non-empty")
        seen.add(r.kek_uri)
        parts.append(
            ".".join(_b64encode(x) for x in (r.kek_uri.encode(), r.kek_version.encode(), r.wrapped))
        )
    return ",".join(parts)


def _parse_replicas(kek_uri: str, text: str) -> tuple[WrappedReplica, ...]:
    entries = text.split(",")
    if len(entries) > MAX_REPLICAS:
        raise FormatError(f"metadata {M_REPLICAS} holds more than {MAX_REPLICAS} replicas")
    out: list[WrappedReplica] = []
    seen = {kek_uri}
    for entry in entries:
        fields = entry.split(".")
        if len(fields) != 3:
            raise FormatError(f"metadata {M_REPLICAS} is malformed")
        uri_b, version_b, wrapped = (_b64decode(M_REPLICAS, f) for f in fields)
        try:
            uri, version = uri_b.decode("ascii"), version_b.decode("ascii")
            _check_text("replica kek_uri", uri, allow_empty=False)
            _check_text("replica kek_version", version, allow_empty=True)
        except (UnicodeDecodeError, ValueError):
            raise FormatError(f"metadata {M_REPLICAS} names a malformed key") from None
        if uri in seen or not wrapped:
            raise FormatError(f"metadata {M_REPLICAS} repeats a key or holds an empty key")
        seen.add(uri)
        out.append(WrappedReplica(uri, version, wrapped))
    return tuple(out)


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
    if version not in (str(FORMAT_VERSION), str(ENVELOPE_VERSION_LAYOUT)):
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
    parts = _parse_layout(version == str(ENVELOPE_VERSION_LAYOUT), layout, found.get(M_PARTS))
    checksum = found.get(M_CHECKSUM)
    replicas = found.get(M_REPLICAS)
    return Envelope(
        kek_uri=found[M_KEK],
        kek_version=found.get(M_KEK_VERSION, ""),
        wrapped_data_key=wrapped,
        sealed_object_key=sealed,
        multipart=layout != LAYOUT_SINGLE,
        checksum=checksum if checksum else None,
        replicas=_parse_replicas(found[M_KEK], replicas) if replicas is not None else (),
        layout=parts,
        pending=layout == LAYOUT_PENDING,
    )


def _parse_layout(v2: bool, layout: str, parts: str | None) -> PartLayout | None:
    """v1: ``s`` or ``m``, no parts; v2: ``m`` with parts, or ``p`` (pending) without."""
    if not v2:
        if layout not in (LAYOUT_SINGLE, LAYOUT_MULTIPART):
            raise FormatError(
                f"metadata {M_LAYOUT} must be {LAYOUT_SINGLE!r} or {LAYOUT_MULTIPART!r}"
            )
        if parts is not None:
            raise FormatError(f"metadata {M_PARTS} in a version 1 envelope")
        return None
    if layout == LAYOUT_PENDING:
        if parts is not None:
            raise FormatError(f"metadata {M_PARTS} in a pending envelope")
        return None
    if layout != LAYOUT_MULTIPART or parts is None:
        raise FormatError(f"a version 2 envelope is multipart with {M_PARTS}, or pending")
    return PartLayout.from_text(parts)


def is_internal(name: str) -> bool:
    """Whether a header name is one of the proxy's own ``x-amz-meta-cmek-*`` names."""
    return name.lower().startswith(INTERNAL_PREFIX)


def strip_internal(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` without the proxy's own ``x-amz-meta-cmek-*`` names."""
    return {name: value for name, value in headers.items() if not is_internal(name)}
