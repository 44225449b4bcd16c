"""The names of the proxy's envelope objects under the reserved prefix, and the types the
envelope stores share (see ``envelopes.py``)."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Final, Literal

from proxy import crypto
from proxy.errors import FormatError

SIDECAR_PREFIX: Final = ".cmek-proxy/env/"
KEY_FIELD: Final = "key"
"""The sidecar names its object's key, so ``gc`` can tell an orphan (the folder is a hash)."""
PENDING_PREFIX: Final = ".cmek-proxy/pending/"
"""``<sha256(key)>/<upload id>``: the envelope of a multipart Complete in flight (both stores)."""

StoreKind = Literal["metadata", "sidecar"]
OpenKey = Callable[[crypto.Envelope], Awaitable[bytes]]
"""Opens an envelope's object key (unwrap through the KMS, then open the sealed key)."""


def etag_core(etag: str | None) -> str | None:
    if not etag:
        return None
    return etag.strip().removeprefix("W/").strip('"')


def sidecar_prefix(key: str) -> str:
    return SIDECAR_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest() + "/"


UPLOAD_RECORD: Final = "u-"
"""Names a completed multipart object's envelope after its upload (metadata store); an ETag
never starts so (hex digits, then maybe ``-N``)."""


def upload_record(pending: crypto.Envelope) -> str:
    """The name, beside the object's key, of the completed envelope of the upload whose
    pending envelope is ``pending``: its sealed object key is random, one per upload."""
    return UPLOAD_RECORD + hashlib.sha256(pending.sealed_object_key).hexdigest()[:40]


def current_names(headers: Mapping[str, str]) -> list[str]:
    """The names the envelope of the object version with these headers can be stored under:
    its ETag, and in the metadata store its upload's record."""
    names = [etag] if (etag := etag_core(headers.get("etag"))) else []
    try:
        env = crypto.from_metadata(headers)
    except FormatError:
        env = None
    if env is not None and env.pending:
        names.append(upload_record(env))
    return names


def pending_prefix(key: str) -> str:
    return PENDING_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest() + "/"
