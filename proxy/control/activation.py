"""When an encryption rule from the configuration file first took effect on each bucket.

API specs carry their activation time (``encrypted_since``); a spec in the configuration
file - or the configured default key - has none of its own, and without one every object on
its path looks encrypted: a legacy plaintext object written before encryption was turned on
would be listed with a wrong (ciphertext-to-plaintext) size. So the first time a proxy runs
with such a rule over a bucket, it records the moment in the bucket's reserved state::

    <bucket>/.cmek-proxy/activation/<hex(spec name)>.json     a bucket or bucket/prefix spec
    <bucket>/.cmek-proxy/activation/default.json              the configured default key

The time is the record's ``Last-Modified`` on the backend's clock (the clock of the objects'
own ``LastModified``), read back after a create-only write (``If-None-Match: *``); later
starts, and every other replica, read the same record. Objects older than it are legacy
plaintext; objects from then on are expected encrypted. An object written in the very
second of the activation counts as encrypted (listings have whole seconds).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping
from email.utils import parsedate_to_datetime
from typing import Final

from proxy.backend.client import BackendClient
from proxy.config import Encryption, EncryptionRule
from proxy.errors import S3Error
from proxy.wire.reserved import RESERVED_PREFIX
from proxy.wire.xmldoc import child_text, local, parse_backend

ACTIVATION_PREFIX: Final = RESERVED_PREFIX + "activation/"
DEFAULT: Final = "default"
_CONCURRENCY: Final = 16

log = logging.getLogger(__name__)


def record_key(name: str) -> str:
    """The reserved key recording spec ``name`` (``DEFAULT``: the configured default)."""
    if name == DEFAULT:
        return ACTIVATION_PREFIX + "default.json"
    return ACTIVATION_PREFIX + name.encode("utf-8").hex() + ".json"


def _encrypts(rule: EncryptionRule | str) -> bool:
    return isinstance(rule, EncryptionRule) and rule.key is not None and not rule.passthrough


def wanted(enc: Encryption, buckets: Iterable[str]) -> list[tuple[str, str]]:
    """(bucket, spec name) pairs whose activation must be known: every encrypting config spec
    without its own ``encrypted_since``, and the default key on every listed bucket."""
    out = [
        (name.partition("/")[0], name)
        for name, rule in enc.buckets.items()
        if _encrypts(rule) and rule.encrypted_since is None
    ]
    if _encrypts(enc.default):
        out += [(b, DEFAULT) for b in buckets]
    return out


async def _since(backend: BackendClient, bucket: str, name: str) -> float | None:
    key = record_key(name)
    head, _ = await backend.call("HEAD", bucket, key, ok=(200, 404))
    if head.status == 404:
        body = json.dumps({"spec": name, "source": "config"}).encode()
        await backend.call(
            "PUT",
            bucket,
            key,
            headers={"content-type": "application/json", "if-none-match": "*"},
            body=body,
            ok=(200, 412),  # 412: another replica recorded it first; read its record
        )
        head, _ = await backend.call("HEAD", bucket, key)
    try:
        return parsedate_to_datetime(head.headers["last-modified"]).timestamp()
    except (KeyError, TypeError, ValueError, IndexError):
        return None


async def read_activations(
    backend: BackendClient, enc: Encryption, known: Mapping[tuple[str, str], float]
) -> dict[tuple[str, str], float]:
    """Activation times (epoch seconds) by (bucket, spec name), recording missing ones.

    Buckets that do not exist are skipped: everything in a bucket created later through the
    proxy is written encrypted anyway.
    """
    buckets: list[str] = []
    if _encrypts(enc.default):
        _, body = await backend.call("GET")
        buckets = [
            child_text(el, "Name") for el in parse_backend(body).iter() if local(el.tag) == "Bucket"
        ]
    out = dict(known)
    todo = [pair for pair in wanted(enc, buckets) if pair not in out]

    async def worker() -> None:
        while todo:
            bucket, name = todo.pop()
            try:
                since = await _since(backend, bucket, name)
            except S3Error as exc:
                if exc.code not in ("NoSuchBucket", "AccessDenied"):
                    log.warning("activation of %s on %s not readable: %s", name, bucket, exc.code)
                continue
            if since is not None:
                out[(bucket, name)] = since

    await asyncio.gather(*(worker() for _ in range(min(_CONCURRENCY, len(todo)))))
    return out
