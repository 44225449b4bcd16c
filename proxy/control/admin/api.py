"""The admin API: encryption specs, long-running operations and jobs (JSON, bearer token).

Shaped after the Google Agent Assist CMEK API, for buckets instead of locations
(``docs/admin-api.yaml`` is the OpenAPI description):

``POST /v1/buckets/{bucket}/encryptionSpec:initialize``  InitializeEncryptionSpec
    body ``{"encryption_spec": {"kms_key": URI, "location"?: str, "prefix"?: str}}`` or
    ``{"encryption_spec": {"passthrough": true, "prefix"?: str}}``; answers
    ``{"name": "operations/<id>"}``. The operation validates the key (a wrap/unwrap round
    trip, and the key's location against ``location``), then stores and activates the spec;
    a failure ends the operation with an error naming the key, the provider and the
    provider's message. Writes after activation use the spec; stored objects keep opening
    with their own envelopes.
``GET /v1/operations/{id}``  GetOperation (``done``, ``error`` or ``response``, ``metadata``)
``GET /v1/buckets/{bucket}/encryptionSpec[?prefix=P]``  GetEncryptionSpec
``GET /v1/encryptionSpecs``  ListEncryptionSpecs (config and API specs, with their source)
``GET /v1/audit/head``  the audit chain's head ``{"entries", "last_hash"}``
``GET /v1/buckets/{bucket}/inventory``  the latest finished inventory of the bucket
    (objects and bytes per key URI, version, provider; plaintext counts).
``POST /v1/buckets/{bucket}/jobs``  start ``verify`` / ``rewrap`` / ``encrypt-existing`` /
    ``inventory`` / ``gc``; body ``{"job": ..., "prefix"?, "dry_run"?, "concurrency"?,
    "sample"?, "target_key"?, "limit"? (gc), "min_age"? (gc)}``;
    answers an operation whose ``metadata.progress`` counts objects and bytes.

Every route needs ``Authorization: Bearer <admin.token>`` (compared in constant time); only
such admins can change specs. Errors are ``{"error": {"code", "status", "message"}}`` with
gRPC-style codes as in the Google API. Each change is written to the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web
from pydantic import ValidationError

from proxy.config import EncryptionRule, key_refusal, rule_refusal
from proxy.control.audit import AuditLog
from proxy.control.jobs import JOBS, JobContext, JobOptions, JobProgress
from proxy.control.jobs.standalone import report_doc
from proxy.control.specs import SpecStore, new_operation_id, spec_name, utc_iso
from proxy.errors import CmekError, KmsError, KmsUnreachableError
from proxy.kms.keys import KeyService
from proxy.wire.reserved import RESERVED_PREFIX

log = logging.getLogger(__name__)

_BUCKET: Final = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]\Z")
_OP_ID: Final = re.compile(r"[0-9a-f]{24}\Z")
_MAX_OPERATIONS: Final = 1000
_MAX_CONCURRENCY: Final = 64

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# gRPC status codes, as the Google API reports them
_CODES: Final = {
    "INVALID_ARGUMENT": 3,
    "NOT_FOUND": 5,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "UNAUTHENTICATED": 16,
}
_HTTP: Final = {
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "UNAUTHENTICATED": 401,
}


def error_body(status: str, message: str, **details: Any) -> dict[str, Any]:
    err: dict[str, Any] = {"code": _CODES[status], "status": status, "message": message}
    if details:
        err["details"] = details
    return {"error": err}


def error_response(status: str, message: str, **details: Any) -> web.Response:
    resp = web.json_response(error_body(status, message, **details), status=_HTTP[status])
    if status == "UNAUTHENTICATED":
        resp.headers["WWW-Authenticate"] = 'Bearer realm="cmek-proxy-admin"'
    return resp


@dataclass
class Operation:
    id: str
    kind: str
    metadata: dict[str, Any]
    done: bool = False
    error: dict[str, Any] | None = None
    response: dict[str, Any] | None = None
    progress: JobProgress | None = None

    @property
    def name(self) -> str:
        return f"operations/{self.id}"

    def to_json(self) -> dict[str, Any]:
        meta = dict(self.metadata)
        if self.progress is not None:
            meta["progress"] = self.progress.to_json()
        out: dict[str, Any] = {"name": self.name, "metadata": meta, "done": self.done}
        if self.error is not None:
            out["error"] = self.error
        if self.response is not None:
            out["response"] = self.response
        return out


@dataclass
class AdminApi:
    token: str
    specs: SpecStore
    keys: KeyService
    audit: AuditLog
    jobs: JobContext
    validation_timeout: float = 60.0
    gc_min_age: float = 3600.0
    _operations: OrderedDict[str, Operation] = field(default_factory=OrderedDict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _inventories: dict[str, dict[str, Any]] = field(default_factory=dict)

    # ---------------------------------------------------------------- wiring

    def register(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/v1/buckets/{bucket}/encryptionSpec:initialize", self._auth(self.initialize))
        r.add_get("/v1/buckets/{bucket}/encryptionSpec", self._auth(self.get_spec))
        r.add_get("/v1/encryptionSpecs", self._auth(self.list_specs))
        r.add_get("/v1/operations/{id}", self._auth(self.get_operation))
        r.add_get("/v1/operations", self._auth(self.list_operations))
        r.add_post("/v1/buckets/{bucket}/jobs", self._auth(self.start_job))
        r.add_get("/v1/audit/head", self._auth(self.audit_head))
        r.add_get("/v1/buckets/{bucket}/inventory", self._auth(self.get_inventory))

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await t

    def running_jobs(self) -> list[JobProgress]:
        """Progress of the jobs this replica is running (for the job metrics)."""
        return [
            op.progress
            for op in self._operations.values()
            if op.progress is not None and not op.done
        ]

    def _auth(self, handler: Handler) -> Handler:
        expected = self.token.encode()

        async def wrapped(request: web.Request) -> web.StreamResponse:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), expected
            ):
                return error_response("UNAUTHENTICATED", "a valid admin bearer token is required")
            return await handler(request)

        return wrapped

    async def _start(self, op: Operation, work: Callable[[Operation], Awaitable[None]]) -> None:
        """Register and store the operation, then run ``work`` in the background."""
        self._operations[op.id] = op
        while len(self._operations) > _MAX_OPERATIONS:
            oldest = next(iter(self._operations.values()))
            if not oldest.done:
                break
            self._operations.popitem(last=False)

        async def run() -> None:
            try:
                await work(op)
            except CmekError as exc:
                op.error = error_body("INTERNAL", str(exc))["error"]
                self.audit.append("operation.failed", operation=op.name, error=str(exc))
            finally:
                op.done = True
                op.metadata["end_time"] = utc_iso()
                await self._save(op)

        await self._save(op)
        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _save(self, op: Operation) -> None:
        try:
            await self.specs.save_operation(op.id, op.to_json())
        except CmekError as exc:
            log.warning("could not store operation %s: %s", op.id, exc)

    # ----------------------------------------------------------------- specs

    async def initialize(self, request: web.Request) -> web.Response:
        bucket = request.match_info["bucket"]
        try:
            body = await request.json()
        except ValueError:
            return error_response("INVALID_ARGUMENT", "the body must be JSON")
        spec = body.get("encryption_spec") if isinstance(body, dict) else None
        if not isinstance(spec, dict):
            return error_response("INVALID_ARGUMENT", "encryption_spec (an object) is required")
        prefix = spec.get("prefix", body.get("prefix"))
        problem = _check_target(bucket, prefix)
        if problem:
            return error_response("INVALID_ARGUMENT", problem)
        try:
            rule = EncryptionRule(
                key=spec.get("kms_key"),
                replicas=spec.get("replicas") or [],
                location=spec.get("location"),
                passthrough=bool(spec.get("passthrough", False)),
            )
        except ValidationError as exc:
            msg = "; ".join(e["msg"] for e in exc.errors())
            return error_response(
                "INVALID_ARGUMENT", f"encryption_spec: {msg} (kms_key or passthrough)"
            )
        if self.specs.control_bucket is None:
            return error_response(
                "FAILED_PRECONDITION",
                "specs.control_bucket is not configured: specs can only come from the config",
            )
        refusal = rule_refusal(self.specs.config, rule)
        if refusal is not None:
            self.audit.append(
                "spec.refused",
                spec=spec_name(bucket, prefix),
                new=_spec_json(rule),
                reason=refusal,
            )
            return error_response("FAILED_PRECONDITION", refusal, encryption_spec=_spec_json(rule))
        op = Operation(
            new_operation_id(),
            "initializeEncryptionSpec",
            {
                "@type": "InitializeEncryptionSpecMetadata",
                "bucket": bucket,
                "prefix": prefix,
                "encryption_spec": _spec_json(rule),
                "create_time": utc_iso(),
            },
        )
        await self._start(op, lambda o: self._initialize(o, bucket, prefix, rule))
        return web.json_response({"name": op.name})

    async def _initialize(
        self, op: Operation, bucket: str, prefix: str | None, rule: EncryptionRule
    ) -> None:
        name = spec_name(bucket, prefix)
        if rule.key is not None:
            try:
                async with asyncio.timeout(self.validation_timeout):
                    await self.keys.validate(rule.key, rule.location)
                    for replica in rule.replicas:  # every replica must work as well
                        await self.keys.validate(replica, None)
            except KmsError as exc:
                status = (
                    "UNAVAILABLE" if isinstance(exc, KmsUnreachableError) else "FAILED_PRECONDITION"
                )
                cause = exc.__cause__ if exc.__cause__ is not None else exc
                self.audit.append(
                    "key.validated",
                    ok=False,
                    spec=name,
                    kms_key=rule.key,
                    provider=exc.provider,
                    error=str(exc),
                    operation=op.name,
                )
                op.error = error_body(
                    status,
                    str(exc),
                    kms_key=rule.key,
                    provider=exc.provider,
                    provider_error=str(cause),
                )["error"]
                return
            except TimeoutError:
                msg = f"key {rule.key} could not be validated within {self.validation_timeout}s"
                self.audit.append("key.validated", ok=False, spec=name, kms_key=rule.key, error=msg)
                op.error = error_body("UNAVAILABLE", msg, kms_key=rule.key)["error"]
                return
            self.audit.append(
                "key.validated",
                ok=True,
                spec=name,
                kms_key=rule.key,
                provider=self.keys.kek(rule.key).provider,
                location=rule.location,
                operation=op.name,
            )
        record, previous = await self.specs.activate(bucket, prefix, rule, op.name)
        new = record.to_json()
        if previous is None:
            self.audit.append("spec.created", spec=name, new=new["encryption_spec"])
        else:
            self.audit.append(
                "spec.changed",
                spec=name,
                old=previous.to_json()["encryption_spec"],
                old_source=previous.source,
                new=new["encryption_spec"],
            )
        self.audit.append(
            "spec.activated",
            spec=name,
            revision=record.revision,
            activate_time=record.activate_time,
            operation=op.name,
        )
        op.response = {"@type": "EncryptionSpec", **new}

    async def get_spec(self, request: web.Request) -> web.Response:
        bucket = request.match_info["bucket"]
        prefix = request.query.get("prefix") or None
        problem = _check_target(bucket, prefix)
        if problem:
            return error_response("INVALID_ARGUMENT", problem)
        record = self.specs.get(spec_name(bucket, prefix))
        if record is None:
            d = self.specs.policy.decide(bucket, prefix or "")
            return web.json_response(
                {
                    "name": f"buckets/{bucket}/encryptionSpec",
                    "bucket": bucket,
                    "prefix": prefix,
                    "source": "default",
                    "rule": d.rule,
                    "encryption_spec": (
                        {"kms_key": d.key_uri} if d.key_uri else {"passthrough": not d.refuse}
                    ),
                    "refuse": d.refuse,
                }
            )
        return web.json_response(record.to_json())

    async def list_specs(self, _: web.Request) -> web.Response:
        return web.json_response({"encryption_specs": [r.to_json() for r in self.specs.records()]})

    # ------------------------------------------------------------ operations

    async def get_operation(self, request: web.Request) -> web.Response:
        op_id = request.match_info["id"]
        if not _OP_ID.match(op_id):
            return error_response("INVALID_ARGUMENT", "malformed operation id")
        op = self._operations.get(op_id)
        if op is not None:
            return web.json_response(op.to_json())
        stored = await self.specs.load_operation(op_id)
        if stored is None:
            return error_response("NOT_FOUND", f"operation {op_id} not found")
        return web.json_response(stored)

    async def list_operations(self, _: web.Request) -> web.Response:
        return web.json_response(
            {"operations": [op.to_json() for op in reversed(self._operations.values())]}
        )

    async def audit_head(self, _: web.Request) -> web.Response:
        """The audit chain's head: record it, and ``audit verify --head`` detects a cut."""
        return web.json_response({"path": str(self.audit.path), **self.audit.head().to_json()})

    # ------------------------------------------------------------------ jobs

    async def get_inventory(self, request: web.Request) -> web.Response:
        """The latest finished ``inventory`` job of the bucket (from any replica or the CLI)."""
        bucket = request.match_info["bucket"]
        problem = _check_target(bucket, None)
        if problem:
            return error_response("INVALID_ARGUMENT", problem)
        doc = await _latest_inventory(self, bucket)
        if doc is None:
            return error_response(
                "NOT_FOUND", f"no inventory of {bucket} yet: start the inventory job"
            )
        return web.json_response(doc)

    async def start_job(self, request: web.Request) -> web.Response:
        bucket = request.match_info["bucket"]
        try:
            body = await request.json()
        except ValueError:
            return error_response("INVALID_ARGUMENT", "the body must be JSON")
        if not isinstance(body, dict):
            return error_response("INVALID_ARGUMENT", "the body must be a JSON object")
        kind = body.get("job")
        if kind not in JOBS:
            return error_response("INVALID_ARGUMENT", f"job must be one of {sorted(JOBS)}")
        prefix = body.get("prefix") or ""
        problem = _check_target(bucket, prefix or None)
        if problem:
            return error_response("INVALID_ARGUMENT", problem)
        try:
            concurrency = int(body.get("concurrency", 8))
            sample = body.get("sample")
            opts = JobOptions(
                bucket=bucket,
                prefix=prefix,
                dry_run=bool(body.get("dry_run", False)),
                concurrency=max(1, min(concurrency, _MAX_CONCURRENCY)),
                sample=float(sample) if sample is not None else None,
                target_key=body.get("target_key"),
                limit=int(body["limit"]) if body.get("limit") is not None else None,
                min_age=float(body.get("min_age", self.gc_min_age)),
            )
        except (TypeError, ValueError) as exc:
            return error_response("INVALID_ARGUMENT", str(exc))
        if opts.target_key is not None:
            refusal = key_refusal(self.specs.config, str(opts.target_key))
            if refusal is not None:
                self.audit.append("job.refused", job=kind, bucket=bucket, reason=refusal)
                return error_response("FAILED_PRECONDITION", refusal)
        progress = JobProgress(kind, opts)
        op = Operation(
            new_operation_id(),
            f"job.{kind}",
            {"@type": "JobMetadata", "job": kind, "bucket": bucket, "create_time": utc_iso()},
            progress=progress,
        )
        run = JOBS[kind]

        async def work(o: Operation) -> None:
            result = await run(self.jobs, opts, progress)
            o.response = {"@type": "JobSummary", **result.to_json()}
            if kind == "inventory":
                doc = {**report_doc(result, "admin-api"), "operation": o.name}
                self._inventories[bucket] = doc
                await self.specs.save_report("inventory", bucket, doc)

        await self._start(op, work)
        return web.json_response({"name": op.name})


async def _latest_inventory(api: AdminApi, bucket: str) -> dict[str, Any] | None:
    """This replica's latest inventory of the bucket, else the stored one (any replica, CLI)."""
    stored = await api.specs.load_report("inventory", bucket)
    mine = api._inventories.get(bucket)
    if mine is None or (stored is not None and stored["finish_time"] > mine["finish_time"]):
        return stored
    return mine


def _check_target(bucket: str, prefix: str | None) -> str | None:
    if not _BUCKET.match(bucket):
        return f"invalid bucket name {bucket[:64]!r}"
    if prefix is not None:
        if not isinstance(prefix, str) or not prefix or len(prefix) > 1024:
            return "prefix must be a non-empty string of at most 1024 characters"
        if prefix.startswith(("/", RESERVED_PREFIX)):
            return f"prefix must not start with '/' or {RESERVED_PREFIX!r}"
    return None


def _spec_json(rule: EncryptionRule) -> dict[str, Any]:
    out: dict[str, Any] = {"passthrough": True} if rule.passthrough else {"kms_key": rule.key}
    if rule.replicas:
        out["replicas"] = list(rule.replicas)
    if rule.location:
        out["location"] = rule.location
    return out
