"""The one place where the parts of cmek-proxy are wired together.

    config -> KMS clients (by key-URI prefix) -> KeyService (cache, breaker, metrics)
           -> Policy -> BackendClient -> ObjectLayer -> S3 handlers -> S3 app
                                                      \\-> admin app (health, metrics)

Resources live in aiohttp ``cleanup_ctx`` generators and are reached through
``AppKey``s, so they start with the server and are closed in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from aiohttp import web

from proxy.backend.client import BackendClient
from proxy.config import Config
from proxy.control.admin.api import AdminApi
from proxy.control.admin.server import make_admin_app
from proxy.control.audit import AuditLog
from proxy.control.jobs import JobContext
from proxy.control.jobs.gc import GcRunner
from proxy.control.policy import Policy
from proxy.control.specs import SpecStore
from proxy.kms.base import KmsClient
from proxy.kms.keys import KeyService
from proxy.kms.registry import make_kms_clients, resolver
from proxy.layer.envelopes import EnvelopeStore, make_store
from proxy.layer.objects import ObjectLayer
from proxy.metrics import Metrics
from proxy.s3.auth import Authenticator
from proxy.s3.handlers import S3Handlers
from proxy.s3.server import make_s3_app
from proxy.wire.sigv4 import Credentials

log = logging.getLogger(__name__)

KEYS = web.AppKey("keys", KeyService)
METRICS = web.AppKey("metrics", Metrics)


@dataclass
class Proxy:
    """Both listeners of one proxy process, sharing one set of resources."""

    s3_app: web.Application
    admin_app: web.Application
    keys: KeyService
    metrics: Metrics
    specs: SpecStore | None = None
    audit: AuditLog | None = None
    jobs: JobContext | None = None
    envelopes: EnvelopeStore | None = None


def build(
    config: Config,
    *,
    kms_clients: Sequence[KmsClient] | None = None,
    validate_keys: bool = True,
) -> Proxy:
    metrics = Metrics()
    clients = list(kms_clients) if kms_clients is not None else make_kms_clients(config)
    audit_path = config.audit_path()
    audit = AuditLog(audit_path) if audit_path is not None else None
    keys = KeyService(
        resolver(clients),
        metrics,
        ttl=config.kms.cache_ttl,
        max_entries=config.kms.cache_entries,
        on_event=audit.key_event if audit is not None else None,
    )
    for uri in config.key_uris():
        keys.register(uri)
    policy = Policy(config.encryption)
    session = BackendClient.make_session(config.backend)
    backend = BackendClient(config.backend, session)
    envelopes = make_store(config.backend.envelope_store, backend, config.kms.cache_ttl)
    objects = ObjectLayer(backend, keys, policy, metrics, envelopes)
    creds = {c.access_key: Credentials(c.access_key, c.secret_key) for c in config.clients}
    auth = Authenticator(
        creds.get,
        region=config.region,
        max_skew=config.max_clock_skew,
        virtual_host_domain=config.virtual_host_domain,
    )
    handlers = S3Handlers(objects, backend, auth)
    s3_app = make_s3_app(handlers, metrics, virtual_host_domain=config.virtual_host_domain)
    admin_app = make_admin_app(metrics, keys)
    s3_app[KEYS] = keys
    s3_app[METRICS] = metrics

    async def close_resources() -> None:
        await session.close()
        for c in clients:
            await c.close()

    async def resources(_: web.Application) -> AsyncIterator[None]:
        validated = False
        try:
            if validate_keys:
                for uri in config.key_uris():
                    loc = _location_for(config, uri)
                    await keys.validate(uri, loc)
                    log.info("key validated: %s", uri)
            validated = True
        finally:
            if not validated:  # a failed start closes what build() opened
                await close_resources()
        prober = asyncio.create_task(keys.run_prober(config.kms.probe_interval))
        try:
            yield
        finally:
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober
            await close_resources()

    s3_app.cleanup_ctx.append(resources)

    # Encryption specs from the admin API: read before listening, then polled; the data
    # path's policy is replaced whole when they change.
    def swap_policy(new: Policy) -> None:
        objects.policy = new

    specs = SpecStore(config, backend, on_policy=swap_policy, on_key=keys.register)
    jobs = JobContext(
        backend,
        keys,
        envelopes,
        lambda: specs.policy,
        audit,
    )
    api: AdminApi | None = None
    if config.admin.token is not None and audit is not None:
        api = AdminApi(config.admin.token, specs, keys, audit, jobs, gc_min_age=config.gc.min_age)
        api.register(admin_app)

    async def spec_store(_: web.Application) -> AsyncIterator[None]:
        await specs.refresh()
        await specs.record_activations()
        poller = asyncio.create_task(specs.run_poller())
        collector = GcRunner(jobs, config.gc)
        gc_task = asyncio.create_task(collector.run_forever()) if config.gc.interval else None
        try:
            yield
        finally:
            if gc_task is not None:
                gc_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await gc_task
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            if api is not None:
                await api.close()

    s3_app.cleanup_ctx.append(spec_store)
    return Proxy(s3_app, admin_app, keys, metrics, specs, audit, jobs, envelopes)


def _location_for(config: Config, uri: str) -> str | None:
    for rule in config.encryption.buckets.values():
        if rule.key == uri and rule.location:
            return rule.location
    d = config.encryption.default
    if not isinstance(d, str) and d.key == uri:
        return d.location
    return None


@dataclass
class Running:
    s3_port: int
    admin_port: int
    runners: tuple[web.AppRunner, web.AppRunner]

    async def close(self) -> None:
        for r in reversed(self.runners):
            await r.cleanup()


async def start(config: Config, proxy: Proxy | None = None) -> Running:
    """Start both listeners; ports 0 pick free ports (reported back)."""
    proxy = proxy or build(config)
    s3_runner = web.AppRunner(proxy.s3_app, access_log=None, handle_signals=False)
    await s3_runner.setup()  # runs cleanup_ctx startup: validates keys first
    admin_runner = web.AppRunner(proxy.admin_app, access_log=None)
    await admin_runner.setup()
    s3_site = web.TCPSite(s3_runner, config.listen.host, config.listen.port, backlog=1024)
    await s3_site.start()
    admin_site = web.TCPSite(admin_runner, config.admin.host, config.admin.port)
    await admin_site.start()
    return Running(_port(s3_runner), _port(admin_runner), (s3_runner, admin_runner))


def _port(runner: web.AppRunner) -> int:
    port: int = runner.addresses[0][1]
    return port
