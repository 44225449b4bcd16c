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

A bucket that already holds objects the proxy encrypted (a proxy of an earlier version ran
with the rule and recorded nothing; checked on the first listing page) gets a record saying
the moment is unknown (``"known": false``): every object there counts as encrypted, as before.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping
from email.utils import parsedate_to_datetime
from typing import Final

from proxy import crypto
from proxy.backend.client import BackendClient
from proxy.config import Encryption, EncryptionRule
from proxy.errors import S3Error
from proxy.layer.envelopes import sidecar_prefix
from proxy.wire.reserved import RESERVED_PREFIX
from proxy.wire.xmldoc import child_text, local, parse_backend

ACTIVATION_PREFIX: Final = RESERVED_PREFIX + "activation/"
DEFAULT: Final = "default"
_CONCURRENCY: Final = 16
_SCAN: Final = 1000

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


async def _encrypted_seen(backend: BackendClient, bucket: str, store: str) -> bool:
    """Whether the first listing page of ``bucket`` holds an object the proxy encrypted.

    A bucket seen for the first time may hold legacy plaintext only (encryption turned on
    now) - or objects a proxy of an earlier version encrypted under this same rule, which
    recorded nothing: then the moment encryption took effect is unknown, and recording "now"
    would list every one of them with its stored size.
    """
    _, body = await backend.call(
        "GET", bucket, query=(("list-type", "2"), ("max-keys", str(_SCAN)))
    )
    listed = [
        (child_text(el, "Key"), (child_text(el, "ETag") or "").strip('"'))
        for el in parse_backend(body)
        if local(el.tag) == "Contents" and not child_text(el, "Key").startswith(RESERVED_PREFIX)
    ]
    found: list[bool] = []

    async def encrypted(key: str, etag: str) -> bool:
        if store == "sidecar":
            side, _ = await backend.call("HEAD", bucket, sidecar_prefix(key) + etag, ok=(200, 404))
            return side.status == 200
        head, _ = await backend.call("HEAD", bucket, key, ok=(200, 404))
        return any(h.lower().startswith(crypto.INTERNAL_PREFIX) for h in head.headers)

    async def worker() -> None:
        while listed and not any(found):
            found.append(await encrypted(*listed.pop()))

    await asyncio.gather(*(worker() for _ in range(min(_CONCURRENCY, len(listed)))))
    return any(found)


async def _since(backend: BackendClient, bucket: str, name: str, store: str) -> float | None:
    key = record_key(name)
    resp, data = await backend.call("GET", bucket, key, ok=(200, 404))
    if resp.status == 404:
        known = not await _encrypted_seen(backend, bucket, store)
        body = json.dumps({"spec": name, "source": "config", "known": known}).encode()
        await backend.call(
            "PUT",
            bucket,
            key,
            headers={"content-type": "application/json", "if-none-match": "*"},
            body=body,
            ok=(200, 412),  # 412: another replica recorded it first; read its record
        )
        resp, data = await backend.call("GET", bucket, key)
    try:
        if not json.loads(data).get("known", True):
            return None  # encrypted before it was recorded: every object counts as encrypted
        return parsedate_to_datetime(resp.headers["last-modified"]).timestamp()
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None


async def read_activations(
    backend: BackendClient,
    enc: Encryption,
    known: Mapping[tuple[str, str], float],
    store: str = "metadata",
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
                since = await _since(backend, bucket, name, store)
            except S3Error as exc:
                if exc.code not in ("NoSuchBucket", "AccessDenied"):
                    log.warning("activation of %s on %s not readable: %s", name, bucket, exc.code)
                continue
            if since is not None:
                out[(bucket, name)] = since

    await asyncio.gather(*(worker() for _ in range(min(_CONCURRENCY, len(todo)))))
    return out
