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
import errno
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from aiohttp import web

from proxy.backend.client import BackendClient
from proxy.config import Config
from proxy.control.admin.api import AdminApi
from proxy.control.admin.server import make_admin_app
from proxy.control.audit import AuditHeadCollector, AuditLog
from proxy.control.jobs import JOBS, JobContext
from proxy.control.jobs.gc import GcRunner
from proxy.control.policy import Policy
from proxy.control.specs import NotLoadedPolicy, SpecStore
from proxy.errors import CmekError, S3Error
from proxy.kms.base import KmsClient
from proxy.kms.keys import KeyService
from proxy.kms.registry import make_kms_clients, resolver
from proxy.kms.startup import StartKey, validate_at_start
from proxy.layer.envelopes import EnvelopeStore, make_store
from proxy.layer.objects import ObjectLayer
from proxy.metrics import Metrics
from proxy.s3.accesslog import AccessLogSettings
from proxy.s3.auth import Authenticator
from proxy.s3.handlers import S3Handlers
from proxy.s3.server import S3AppRunner, make_s3_app
from proxy.wire.sigv4 import Credentials
from proxy.wire.tls import ReloadingTls

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
    if audit is not None:
        metrics.registry.register(AuditHeadCollector(audit))
    keys = KeyService(
        resolver(clients),
        metrics,
        ttl=config.kms.cache_ttl,
        max_entries=config.kms.cache_entries,
        negative_ttl=config.kms.negative_ttl,
        on_event=audit.key_event if audit is not None else None,
    )
    for uri in config.key_uris():
        keys.register(uri)
    for rule in config.rules():
        if rule.key and rule.replicas:
            keys.set_replicas(rule.key, rule.replicas)
    policy = Policy(config.encryption)
    session = BackendClient.make_session(config.backend)
    backend = BackendClient(config.backend, session, metrics)
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
    s3_app = make_s3_app(
        handlers,
        metrics,
        virtual_host_domain=config.virtual_host_domain,
        access_log=AccessLogSettings(config.logging.access_log, config.logging.include_names),
    )
    admin_app = make_admin_app(metrics, keys, lambda: _not_ready(specs))
    s3_app[KEYS] = keys
    s3_app[METRICS] = metrics

    async def close_resources() -> None:
        await session.close()
        for c in clients:
            await c.close()

    # Encryption specs from the admin API: read before listening, then polled; the data
    # path's policy is replaced whole when they change.
    def swap_policy(new: Policy) -> None:
        objects.policy = new

    specs = SpecStore(
        config,
        backend,
        on_policy=swap_policy,
        on_key=keys.register,
        on_replicas=keys.set_replicas,
    )
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
    _state_metrics(metrics, keys, specs if config.specs.control_bucket else None, api)

    async def resources(_: web.Application) -> AsyncIterator[None]:
        _announce_key_policy(config, audit)
        started = False
        try:
            await _read_specs(specs, objects)
            await _record_activations(specs)
            if validate_keys:
                await validate_at_start(keys, _start_keys(config, specs), config.kms.start_timeout)
            started = True
        finally:
            if not started:  # a failed start closes what build() opened
                await close_resources()
        prober = asyncio.create_task(keys.run_prober(config.kms.probe_interval))
        poller = asyncio.create_task(specs.run_poller())
        collector = GcRunner(jobs, config.gc)
        gc_task = asyncio.create_task(collector.run_forever()) if config.gc.interval else None
        try:
            yield
        finally:
            for task in (gc_task, poller, prober):
                if task is None:
                    continue
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if api is not None:
                await api.close()
            await close_resources()

    s3_app.cleanup_ctx.append(resources)
    return Proxy(s3_app, admin_app, keys, metrics, specs, audit, jobs, envelopes)


_BREAKER_STATES = ("closed", "open", "half_open")


def _state_metrics(
    metrics: Metrics, keys: KeyService, specs: SpecStore | None, api: AdminApi | None
) -> None:
    """Gauges read at each scrape from the components that own the state."""
    metrics.gauge_callback(
        "cmek_kms_breaker_state",
        "1 for each key's current circuit-breaker state (open: calls fail fast).",
        ["key", "state"],
        lambda: {
            (uri, s): 1.0 if s == state else 0.0
            for uri, state in keys.breaker_states().items()
            for s in _BREAKER_STATES
        },
    )
    if specs is not None:
        metrics.gauge_callback(
            "cmek_spec_poll_age_seconds",
            "Seconds since this replica last read the spec store (since start if never).",
            [],
            lambda: {(): specs.poll_age()},
        )
    if api is None:
        return

    def running() -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = dict.fromkeys(((k,) for k in JOBS), 0.0)
        for prog in api.running_jobs():
            out[(prog.kind,)] += 1
        return out

    def objects() -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for prog in api.running_jobs():
            for outcome, n in prog.outcomes.items():
                if ":" not in outcome:  # error:<Exception> details stay in the operation
                    out[(prog.kind, outcome)] = out.get((prog.kind, outcome), 0.0) + n
        return out

    def bytes_read() -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for prog in api.running_jobs():
            out[(prog.kind,)] = out.get((prog.kind,), 0.0) + prog.bytes
        return out

    metrics.gauge_callback("cmek_jobs_running", "Jobs running in this replica.", ["job"], running)
    metrics.gauge_callback(
        "cmek_job_objects",
        "Objects the running jobs have handled so far, by outcome.",
        ["job", "outcome"],
        objects,
    )
    metrics.gauge_callback(
        "cmek_job_bytes", "Bytes the running jobs have read so far.", ["job"], bytes_read
    )


def _announce_key_policy(config: Config, audit: AuditLog | None) -> None:
    """Log (and audit) the key policy in force, and what it still lets through unencrypted."""
    enc = config.encryption
    ttl = enc.unencrypted_ttl
    fields = {
        "allowed_keys": list(config.kms.allowed_keys),
        "require_cmek": enc.require_cmek,
        "unencrypted_paths": list(enc.unencrypted_paths),
        "unencrypted_ttl": ttl.model_dump(mode="json") if ttl is not None else None,
    }
    log.info("key policy: %s", fields)
    if enc.require_cmek and (enc.unencrypted_paths or ttl is not None):
        log.warning(
            "require_cmek is on; still stored as sent: unencrypted_paths %s, unencrypted_ttl %s",
            enc.unencrypted_paths,
            fields["unencrypted_ttl"],
        )
    if audit is not None:
        audit.append("policy.loaded", **fields)


async def _record_activations(specs: SpecStore) -> None:
    """When each config rule first took effect on each bucket (so listings tell legacy
    objects); a backend not reachable yet leaves it to the spec poller."""
    try:
        await specs.record_activations()
    except S3Error as exc:
        log.warning("could not record when encryption took effect (the poller retries): %s", exc)


def _not_ready(specs: SpecStore) -> dict[str, str]:
    if specs.loaded:
        return {}
    return {"specs": f"encryption specs not yet read from the backend: {specs.load_error}"}


async def _read_specs(specs: SpecStore, objects: ObjectLayer) -> None:
    """Read the spec store once; a backend not reachable yet does not stop the start: the
    data path answers 503 (``NotLoadedPolicy``) until the poller's first successful read."""
    try:
        await specs.refresh()
    except S3Error as exc:
        specs.load_error = str(exc)
        objects.policy = NotLoadedPolicy(str(exc))
        log.warning("could not read the encryption specs at start, starting anyway: %s", exc)


def _start_keys(config: Config, specs: SpecStore) -> list[StartKey]:
    """Configuration keys (a definitive failure stops the start), then API-spec keys."""
    out = [StartKey(uri, _location_for(config, uri), True) for uri in config.key_uris()]
    seen = {k.uri for k in out}
    refused = specs.policy.refused()
    for record in specs.records():
        uri = record.rule.key
        if record.name in refused:
            continue  # outside the key policy: never called
        if record.source != "api" or uri is None:
            continue
        for member in (uri, *record.rule.replicas):
            if member not in seen:
                seen.add(member)
                out.append(StartKey(member, record.rule.location if member == uri else None, False))
    return out


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
    runners: tuple[web.AppRunner, ...]
    tls: tuple[ReloadingTls | None, ReloadingTls | None] = (None, None)
    """The S3 and admin listeners' TLS contexts (None: plain HTTP)."""
    tasks: tuple[asyncio.Task[None], ...] = ()

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for r in reversed(self.runners):
            await r.cleanup()


async def start(
    config: Config,
    proxy: Proxy | None = None,
    *,
    s3: bool = True,
    admin: bool = True,
    reuse_port: bool = False,
) -> Running:
    """Start the listeners; ports 0 pick free ports (reported back, 0 for one not started).

    ``s3=False`` (the parent of ``--workers``) still runs the S3 app's resources - key
    validation, prober, spec store - for the admin API, without an S3 listener; ``admin=False``
    (a worker) has no admin listener. Closing stops accepting at once and gives requests in
    flight ``shutdown_grace`` seconds.
    """
    # certificate problems are configuration errors: found before anything starts
    s3_tls = ReloadingTls(config.listen.tls, name="listen") if s3 and config.listen.tls else None
    admin_tls = ReloadingTls(config.admin.tls, name="admin") if admin and config.admin.tls else None
    proxy = proxy or build(config)
    if s3 and s3_tls is None and config.listen.host not in _LOOPBACK:
        log.warning(
            "the S3 listener on %s speaks plain HTTP: decrypted objects cross the network "
            "in the clear (configure listen.tls)",
            config.listen.host,
        )
    s3_runner = S3AppRunner(
        proxy.s3_app, access_log=None, handle_signals=False, shutdown_timeout=config.shutdown_grace
    )
    await s3_runner.setup()  # runs cleanup_ctx startup: validates keys first
    runners: list[web.AppRunner] = [s3_runner]
    s3_port = admin_port = 0
    admin_tasks: tuple[asyncio.Task[None], ...] = ()
    try:
        if s3:
            await _listen(
                web.TCPSite(
                    s3_runner,
                    config.listen.host,
                    config.listen.port,
                    backlog=1024,
                    ssl_context=s3_tls.context if s3_tls else None,
                    reuse_port=reuse_port or None,
                ),
                "S3",
            )
            s3_port = _port(s3_runner)
        if admin:
            listener = await start_admin(config, proxy, admin_tls)
            runners.extend(listener.runners)
            admin_port = listener.admin_port
            admin_tasks = listener.tasks
    except BaseException:
        for r in reversed(runners):
            await r.cleanup()
        raise
    tasks = (asyncio.create_task(s3_tls.run()),) if s3_tls is not None else ()
    return Running(s3_port, admin_port, tuple(runners), (s3_tls, admin_tls), tasks + admin_tasks)


async def start_admin(config: Config, proxy: Proxy, tls: ReloadingTls | None = None) -> Running:
    """The admin listener alone (the parent of ``--workers`` opens it once workers listen)."""
    if tls is None and config.admin.tls:
        tls = ReloadingTls(config.admin.tls, name="admin")
    runner = web.AppRunner(proxy.admin_app, access_log=None)
    await runner.setup()
    try:
        await _listen(
            web.TCPSite(
                runner,
                config.admin.host,
                config.admin.port,
                ssl_context=tls.context if tls else None,
            ),
            "admin",
        )
    except BaseException:
        await runner.cleanup()
        raise
    tasks = (asyncio.create_task(tls.run()),) if tls is not None else ()
    return Running(0, _port(runner), (runner,), (None, tls), tasks)


_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


class ListenError(CmekError):
    """A listener could not bind its address (in use, not permitted, no such address)."""


async def _listen(site: web.TCPSite, what: str) -> None:
    try:
        await site.start()
    except OSError as exc:
        hint = (
            " (another process listens there; choose another port)"
            if exc.errno in (errno.EADDRINUSE,)
            else ""
        )
        raise ListenError(
            f"cannot listen for {what} on {site.name}: {exc.strerror or exc}{hint}"
        ) from None


def _port(runner: web.AppRunner) -> int:
    port: int = runner.addresses[0][1]
    return port
