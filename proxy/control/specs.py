"""Encryption specs: from the configuration file and from the admin API, seen by every replica.

Specs made through the admin API are JSON objects in the backend, in the configured control
bucket under the reserved prefix (which the S3 front refuses to address or list)::

    <control_bucket>/.cmek-proxy/specs/<hex(name)>.json        name = bucket or bucket/prefix
    <control_bucket>/.cmek-proxy/operations/<id>.json          long-running operations

Every replica reads the spec prefix at start (before it listens) and then every
``specs.poll_interval`` seconds: a spec activated through one replica governs writes on
every replica within that bound (plus one backend round trip). A poll costs one LIST; only
spec objects whose ETag changed are fetched. The data path holds a ``Policy`` that is
replaced whole (``on_policy``) - a request sees either the old or the new set of specs,
never a mix. API specs override configuration specs of the same name.

A spec write is conditional (``If-None-Match: *`` for a new name, ``If-Match`` of the version
this replica knows otherwise) on backends that honour conditional PUTs (AWS S3, moto); two
admins racing on one name then see one of them fail instead of silently losing a change.
``rclone serve s3`` ignores the conditions: there the last write wins.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from proxy.backend.client import BackendClient, parse_error
from proxy.config import Config, EncryptionRule
from proxy.control.activation import read_activations
from proxy.control.policy import Policy
from proxy.errors import ConfigError, S3Error
from proxy.wire.xmldoc import parse_backend

SPEC_PREFIX: Final = ".cmek-proxy/specs/"
OPERATION_PREFIX: Final = ".cmek-proxy/operations/"
_MAX_PAGES: Final = 1000

log = logging.getLogger(__name__)


def utc_iso(ts: datetime | None = None) -> str:
    return (ts or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def spec_name(bucket: str, prefix: str | None) -> str:
    return f"{bucket}/{prefix}" if prefix else bucket


def spec_object(name: str) -> str:
    return SPEC_PREFIX + name.encode("utf-8").hex() + ".json"


@dataclass(frozen=True)
class SpecRecord:
    """One encryption spec and where it came from."""

    name: str
    rule: EncryptionRule
    source: str  # "config" | "api"
    revision: int = 0
    create_time: str | None = None
    activate_time: str | None = None
    operation: str | None = None

    def to_json(self) -> dict[str, Any]:
        bucket, _, prefix = self.name.partition("/")
        spec: dict[str, Any] = (
            {"passthrough": True} if self.rule.passthrough else {"kms_key": self.rule.key}
        )
        if self.rule.location:
            spec["location"] = self.rule.location
        out: dict[str, Any] = {
            "name": f"buckets/{bucket}/encryptionSpec" + (f"/{prefix}" if prefix else ""),
            "bucket": bucket,
            "prefix": prefix or None,
            "encryption_spec": spec,
            "source": self.source,
            "state": "ACTIVE",
            "revision": self.revision,
        }
        if self.rule.encrypted_since is not None:
            out["encrypted_since"] = utc_iso(self.rule.encrypted_since)
        for k in ("create_time", "activate_time", "operation"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        return out

    @classmethod
    def from_stored(cls, data: Mapping[str, Any]) -> SpecRecord:
        spec = data["encryption_spec"]
        since = data.get("encrypted_since")
        rule = EncryptionRule(
            key=spec.get("kms_key"),
            location=spec.get("location"),
            passthrough=bool(spec.get("passthrough", False)),
            encrypted_since=datetime.fromisoformat(since) if since else None,
        )
        prefix = data.get("prefix")
        return cls(
            name=spec_name(str(data["bucket"]), prefix),
            rule=rule,
            source="api",
            revision=int(data.get("revision", 0)),
            create_time=data.get("create_time"),
            activate_time=data.get("activate_time"),
            operation=data.get("operation"),
        )


class ConcurrentChange(S3Error):
    """The spec changed in the store since this replica read it."""

    def __init__(self, name: str) -> None:
        super().__init__("PreconditionFailed", f"spec {name} changed concurrently; retry", 412)


@dataclass
class _Entry:
    record: SpecRecord
    etag: str


@dataclass
class SpecStore:
    """Config specs + API specs kept in the backend; swaps the data path's ``Policy``."""

    config: Config
    backend: BackendClient
    on_policy: Callable[[Policy], None]
    on_key: Callable[[str], None] = lambda _uri: None
    """Called with every key URI an API spec names (to register it for probing)."""
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _activations: dict[tuple[str, str], float] = field(default_factory=dict)
    policy: Policy = field(init=False)

    def __post_init__(self) -> None:
        self.policy = Policy(self.config.encryption)

    @property
    def control_bucket(self) -> str | None:
        return self.config.specs.control_bucket

    # ------------------------------------------------------------------ read

    def records(self) -> list[SpecRecord]:
        """Every spec in force: API specs override config specs of the same name."""
        out = {
            name: SpecRecord(name, rule, "config")
            for name, rule in self.config.encryption.buckets.items()
        }
        out.update({name: e.record for name, e in self._entries.items()})
        return [out[name] for name in sorted(out)]

    def get(self, name: str) -> SpecRecord | None:
        entry = self._entries.get(name)
        if entry is not None:
            return entry.record
        rule = self.config.encryption.buckets.get(name)
        return SpecRecord(name, rule, "config") if rule is not None else None

    async def refresh(self) -> bool:
        """Read the store; swap the policy if anything changed. Returns whether it did."""
        bucket = self.control_bucket
        if bucket is None:
            return False
        async with self._lock:
            listed = await self._list(bucket, SPEC_PREFIX)
            if listed is None:
                return False
            fresh: dict[str, _Entry] = {}
            known = {e.etag: (n, e) for n, e in self._entries.items()}
            for obj, etag in listed.items():
                if etag in known:
                    name, entry = known[etag]
                    fresh[name] = entry
                    continue
                resp, body = await self.backend.call("GET", bucket, obj, ok=(200, 404))
                if resp.status == 404:
                    continue  # deleted between list and get
                try:
                    record = SpecRecord.from_stored(json.loads(body))
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("spec object %s/%s is not valid: %s", bucket, obj, exc)
                    continue
                fresh[record.name] = _Entry(record, etag)
            changed = {n: e.etag for n, e in fresh.items()} != {
                n: e.etag for n, e in self._entries.items()
            }
            if changed:
                self._install(fresh)
            return changed

    def _install(self, entries: dict[str, _Entry]) -> None:
        self._entries = entries
        for e in entries.values():
            if e.record.rule.key:
                self.on_key(e.record.rule.key)
        self.policy = Policy(self.config.encryption, activations=self._activations).with_specs(
            {n: e.record.rule for n, e in entries.items()}
        )
        self.on_policy(self.policy)

    async def record_activations(self) -> None:
        """Read (recording where missing) when each config rule first took effect on each
        bucket, so listings tell legacy plaintext from encrypted objects
        (``proxy.control.activation``)."""
        fresh = await read_activations(
            self.backend,
            self.config.encryption,
            self._activations,
            self.config.backend.envelope_store,
        )
        if fresh != self._activations:
            async with self._lock:
                self._activations = fresh
                self._install(self._entries)

    async def run_poller(self) -> None:
        """Refresh every ``poll_interval`` seconds until cancelled."""
        interval = self.config.specs.poll_interval
        while True:
            await asyncio.sleep(interval)
            try:
                if await self.refresh():
                    log.info("encryption specs changed in the store; policy replaced")
            except S3Error as exc:
                log.warning("could not read the spec store: %s", exc)

    # ----------------------------------------------------------------- write

    def _require_bucket(self) -> str:
        if self.control_bucket is None:
            raise ConfigError(
                "specs.control_bucket is not configured: specs can only come from the config"
            )
        return self.control_bucket

    async def activate(
        self, bucket: str, prefix: str | None, rule: EncryptionRule, operation: str
    ) -> tuple[SpecRecord, SpecRecord | None]:
        """Store and activate a spec; returns (new record, previous record or None)."""
        control = self._require_bucket()
        name = spec_name(bucket, prefix)
        await self.refresh()
        async with self._lock:
            previous = self.get(name)
            now = datetime.now(UTC)
            before = self.policy.decide(bucket, prefix or "")
            since: datetime | None = None
            if rule.key is not None:
                if before.encrypt:
                    since = (
                        datetime.fromtimestamp(before.encrypted_since, UTC)
                        if before.encrypted_since is not None
                        else None
                    )
                else:
                    since = now
            stored_rule = rule.model_copy(update={"encrypted_since": since})
            old = self._entries.get(name)
            record = SpecRecord(
                name=name,
                rule=stored_rule,
                source="api",
                revision=(previous.revision if previous else 0) + 1,
                create_time=(old.record.create_time if old else None) or utc_iso(now),
                activate_time=utc_iso(now),
                operation=operation,
            )
            doc = record.to_json()
            headers = {"content-type": "application/json"}
            if old is None:
                headers["if-none-match"] = "*"
            else:
                headers["if-match"] = f'"{old.etag}"'
            await self._ensure_bucket(control)
            resp = await self.backend.request(
                "PUT",
                control,
                spec_object(name),
                headers=headers,
                body=json.dumps(doc, sort_keys=True).encode(),
            )
            try:
                data = await resp.read()
            finally:
                resp.release()
            if resp.status == 412:
                raise ConcurrentChange(name)
            if resp.status != 200:
                raise parse_error(resp.status, data)
            etag = (resp.headers.get("etag") or "").strip('"')
            entries = dict(self._entries)
            entries[name] = _Entry(record, etag)
            self._install(entries)
            return record, previous

    async def _ensure_bucket(self, bucket: str) -> None:
        resp, _ = await self.backend.call("HEAD", bucket, ok=(200, 404, 403))
        if resp.status == 404:
            await self.backend.call("PUT", bucket, ok=(200, 409))

    async def _list(self, bucket: str, prefix: str) -> dict[str, str] | None:
        """Object key -> ETag under ``prefix``; None when the bucket does not exist."""
        out: dict[str, str] = {}
        token: str | None = None
        for _ in range(_MAX_PAGES):
            query = [("list-type", "2"), ("prefix", prefix)]
            if token:
                query.append(("continuation-token", token))
            resp, body = await self.backend.call("GET", bucket, query=query, ok=(200, 404))
            if resp.status == 404:
                return None
            root = parse_backend(body)
            for el in root:
                if el.tag.endswith("Contents"):
                    key = etag = None
                    for child in el:
                        if child.tag.endswith("Key"):
                            key = child.text
                        elif child.tag.endswith("ETag"):
                            etag = (child.text or "").strip('"')
                    if key:
                        out[key] = etag or ""
            token = next((el.text for el in root if el.tag.endswith("NextContinuationToken")), None)
            truncated = next((el.text for el in root if el.tag.endswith("IsTruncated")), "false")
            if truncated != "true" or not token:
                return out
        return out

    # ------------------------------------------------------------ operations

    async def save_operation(self, op_id: str, doc: Mapping[str, Any]) -> None:
        if self.control_bucket is None:
            return
        await self._ensure_bucket(self.control_bucket)
        await self.backend.call(
            "PUT",
            self.control_bucket,
            OPERATION_PREFIX + op_id + ".json",
            headers={"content-type": "application/json"},
            body=json.dumps(dict(doc), sort_keys=True).encode(),
        )

    async def load_operation(self, op_id: str) -> dict[str, Any] | None:
        if self.control_bucket is None:
            return None
        resp, body = await self.backend.call(
            "GET", self.control_bucket, OPERATION_PREFIX + op_id + ".json", ok=(200, 404)
        )
        if resp.status == 404:
            return None
        data = json.loads(body)
        return data if isinstance(data, dict) else None


def new_operation_id() -> str:
    return secrets.token_hex(12)
