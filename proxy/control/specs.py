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
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from proxy.backend.client import BackendClient, parse_error
from proxy.config import Config, EncryptionRule, rule_refusal
from proxy.control.activation import read_activations
from proxy.control.policy import Decision, Policy
from proxy.errors import ConfigError, S3Error
from proxy.wire.xmldoc import parse_backend

SPEC_PREFIX: Final = ".cmek-proxy/specs/"
OPERATION_PREFIX: Final = ".cmek-proxy/operations/"
REPORT_PREFIX: Final = ".cmek-proxy/reports/"
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
        if self.rule.replicas:
            spec["replicas"] = list(self.rule.replicas)
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
            replicas=list(spec.get("replicas") or []),
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


class NotLoadedPolicy:
    """The data path's policy until the spec store has been read once (backend unreachable
    at start): every object decision answers 503, so no write goes out under a policy
    that lacks the API specs."""

    strict = True

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def _unavailable(self) -> S3Error:
        return S3Error(
            "ServiceUnavailable",
            "the proxy has not yet read its encryption specs from the backend; retry",
            503,
        )

    def decide(self, bucket: str, key: str, headers: Mapping[str, str] | None = None) -> Decision:
        raise self._unavailable()

    def may_be_encrypted(
        self,
        bucket: str,
        key: str,
        last_modified: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> bool:
        raise self._unavailable()

    def bucket_decision(self, bucket: str) -> Decision | None:
        return None  # every key's own question answers 503


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
    on_replicas: Callable[[str, list[str]], None] = lambda _uri, _replicas: None
    """Called with every API spec's key and its replicas (possibly none)."""
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _activations: dict[tuple[str, str], float] = field(default_factory=dict)
    policy: Policy = field(init=False)
    read_at: float = field(default_factory=time.monotonic)
    """When the store was last read successfully (monotonic; the start until then)."""
    loaded: bool = field(init=False)
    """Whether the store has been read (always, without a control bucket)."""
    load_error: str = ""
    activations_recorded: bool = False
    """Whether ``record_activations`` has succeeded once (the poller retries until then)."""

    def __post_init__(self) -> None:
        self.policy = Policy(self.config.encryption)
        self.loaded = self.control_bucket is None

    def poll_age(self) -> float:
        """Seconds since the store was last read: how stale this replica's specs may be."""
        return time.monotonic() - self.read_at

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
                self.read_at = time.monotonic()  # the store's bucket does not exist yet
                return self._mark_loaded()
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
            self.read_at = time.monotonic()
            return self._mark_loaded() or changed

    def _mark_loaded(self) -> bool:
        """Record the first successful read; True if the data path's policy must be set."""
        if self.loaded:
            return False
        self.loaded = True
        self.load_error = ""
        self.on_policy(self.policy)
        return True

    def _install(self, entries: dict[str, _Entry]) -> None:
        self._entries = entries
        refused = {
            n: reason
            for n, e in entries.items()
            if (reason := rule_refusal(self.config, e.record.rule)) is not None
        }
        for n, e in entries.items():
            rule = e.record.rule
            if rule.key and n not in refused:  # a refused key is never called
                for uri in (rule.key, *rule.replicas):
                    self.on_key(uri)
                self.on_replicas(rule.key, list(rule.replicas))
        for n, reason in refused.items():
            log.error("API encryption spec %s is refused by the key policy: %s", n, reason)
        self.policy = Policy(self.config.encryption, activations=self._activations).with_specs(
            {n: e.record.rule for n, e in entries.items()}, refused
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
        self.activations_recorded = True

    async def run_poller(self) -> None:
        """Refresh every ``poll_interval`` seconds until cancelled."""
        interval = self.config.specs.poll_interval
        while True:
            await asyncio.sleep(interval)
            try:
                if await self.refresh():
                    log.info("encryption specs changed in the store; policy replaced")
                if not self.activations_recorded:
                    await self.record_activations()
            except S3Error as exc:
                if not self.loaded:
                    self.load_error = str(exc)
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
            before: Decision | None
            try:
                before = self.policy.decide(bucket, prefix or "")
            except S3Error:  # the spec in force is refused by the key policy
                before = None
            since: datetime | None = None
            if rule.key is not None:
                if before is not None and before.encrypt:
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

    # --------------------------------------------------------------- reports

    async def save_report(self, kind: str, bucket: str, doc: Mapping[str, Any]) -> bool:
        """Store the latest ``kind`` report of ``bucket`` (e.g. an inventory) for every
        replica and the CLI; False without a control bucket."""
        if self.control_bucket is None:
            return False
        await self._ensure_bucket(self.control_bucket)
        await self.backend.call(
            "PUT",
            self.control_bucket,
            f"{REPORT_PREFIX}{kind}/{bucket.encode().hex()}.json",
            headers={"content-type": "application/json"},
            body=json.dumps(dict(doc), sort_keys=True).encode(),
        )
        return True

    async def load_report(self, kind: str, bucket: str) -> dict[str, Any] | None:
        if self.control_bucket is None:
            return None
        resp, body = await self.backend.call(
            "GET",
            self.control_bucket,
            f"{REPORT_PREFIX}{kind}/{bucket.encode().hex()}.json",
            ok=(200, 404),
        )
        if resp.status == 404:
            return None
        data = json.loads(body)
        return data if isinstance(data, dict) else None


def new_operation_id() -> str:
    return secrets.token_hex(12)
