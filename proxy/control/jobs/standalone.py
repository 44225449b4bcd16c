"""Run a job from the configuration file alone (``cmek-proxy job ...``), no proxy needed.

It builds what a proxy would - KMS clients, ``KeyService``, backend client, envelope store,
the policy including the specs stored through the admin API - runs one job and closes all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from proxy.backend.client import BackendClient
from proxy.config import Config, key_refusal
from proxy.control.audit import AuditLog
from proxy.control.jobs import JOBS
from proxy.control.jobs.common import JobContext, JobOptions, JobProgress
from proxy.control.specs import SpecStore, utc_iso
from proxy.errors import ConfigError
from proxy.kms.base import KmsClient
from proxy.kms.keys import KeyService
from proxy.kms.registry import make_kms_clients, resolver
from proxy.layer.envelopes import make_store
from proxy.metrics import Metrics


async def run_standalone(
    config: Config,
    kind: str,
    opts: JobOptions,
    *,
    kms_clients: Sequence[KmsClient] | None = None,
    progress: JobProgress | None = None,
) -> JobProgress:
    """Run one job; ``progress`` (when given) holds the counts even if the job is cancelled."""
    if kind not in JOBS:
        raise ValueError(f"unknown job {kind!r}")
    if opts.target_key is not None:
        refusal = key_refusal(config, opts.target_key)
        if refusal is not None:
            raise ConfigError(refusal)
    clients = list(kms_clients) if kms_clients is not None else make_kms_clients(config)
    audit_path = config.audit_path()
    audit = AuditLog(audit_path) if audit_path is not None else None
    keys = KeyService(
        resolver(clients),
        Metrics(),
        ttl=config.kms.cache_ttl,
        max_entries=config.kms.cache_entries,
        negative_ttl=config.kms.negative_ttl,
        on_event=audit.key_event if audit is not None else None,
    )
    for rule in config.rules():
        if rule.key and rule.replicas:
            keys.set_replicas(rule.key, rule.replicas)
    session = BackendClient.make_session(config.backend)
    try:
        backend = BackendClient(config.backend, session)
        specs = SpecStore(config, backend, on_policy=lambda _p: None)
        await specs.refresh()
        await specs.record_activations()
        ctx = JobContext(
            backend,
            keys,
            make_store(config.backend.envelope_store, backend),
            lambda: specs.policy,
            audit,
        )
        prog = await JOBS[kind](ctx, opts, progress)
        if kind == "inventory":  # the latest inventory of the bucket, for the admin API
            await specs.save_report(kind, opts.bucket, report_doc(prog, "cli"))
        return prog
    finally:
        await session.close()
        for c in clients:
            await c.close()


def report_doc(prog: JobProgress, source: str) -> dict[str, Any]:
    """A finished job's report as stored: the summary, when and where it was made."""
    return {**prog.to_json(), "finish_time": utc_iso(), "source": source}
