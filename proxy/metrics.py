"""Prometheus metrics of one cmek-proxy instance.

``Metrics`` owns its own ``CollectorRegistry`` (never the process-global default one),
so every app instance and every test has independent counters.  Label values are
bounded: provider names, operation names, outcomes, configured key URIs, HTTP status
codes, configured rule names.  Object keys and bucket names are never labels.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Mapping, Sequence
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

import proxy

KMS_OPERATIONS: Final = ("generate_data_key", "wrap", "unwrap")
KMS_OUTCOMES: Final = ("ok", "denied", "unreachable", "error")
CACHE_KINDS: Final = ("write", "read")
EVICTION_REASONS: Final = ("expired", "capacity", "denied", "dropped")

# 1 ms .. 10 s: a local key answers in well under a millisecond, a cloud KMS in
# 5-50 ms, a retried / throttled call in seconds.
KMS_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# S3 requests include streaming large bodies, so the range goes further up.
S3_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)


Read = Callable[[], Mapping[tuple[str, ...], float]]


class CallbackGauge(Collector):
    """A gauge whose samples are read from the owner of the state at each scrape
    (breaker states, spec-poll age, running jobs): nothing to keep in step."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str], read: Read) -> None:
        self.name = name
        self._doc = documentation
        self._labels = list(labels)
        self._read = read

    def collect(self) -> list[Metric]:
        family = GaugeMetricFamily(self.name, self._doc, labels=self._labels)
        for values, value in sorted(self._read().items()):
            family.add_metric(list(values), value)
        return [family]

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily(self.name, self._doc, labels=self._labels)]


class Metrics:
    """All collectors of one proxy instance, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._callbacks: list[CallbackGauge] = []
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_...
        PlatformCollector(registry=r)  # python_info
        self.build_info = Gauge(
            "cmek_build_info",
            "Always 1; the labels name the running cmek-proxy and Python versions.",
            ["version", "python"],
            registry=r,
            multiprocess_mode="max",
        )
        self.build_info.labels(proxy.__version__, platform.python_version()).set(1)
        self.s3_in_flight = Gauge(
            "cmek_s3_requests_in_flight",
            "S3 requests being served now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.backend_request_duration = Histogram(
            "cmek_backend_request_duration_seconds",
            "Requests to the backend, until its response headers (status 'unreachable': no "
            "answer).",
            ["operation", "status"],
            buckets=S3_BUCKETS,
            registry=r,
        )
        self.backend_errors = Counter(
            "cmek_backend_errors_total",
            "Backend requests that failed: unreachable (no answer) or server_error (5xx).",
            ["operation", "kind"],
            registry=r,
        )
        self.kms_retries = Counter(
            "cmek_kms_retries_total",
            "KMS calls retried by the providers (throttling, timeouts, 5xx; never denials).",
            ["provider", "operation"],
            registry=r,
        )
        self.kms_request_duration = Histogram(
            "cmek_kms_request_duration_seconds",
            "Duration of calls to the customer's KMS.",
            ["provider", "operation", "outcome"],
            buckets=KMS_BUCKETS,
            registry=r,
        )
        self.kms_requests = Counter(
            "cmek_kms_requests_total",
            "Calls to the customer's KMS.",
            ["provider", "operation", "outcome"],
            registry=r,
        )
        self.key_cache_hits = Counter(
            "cmek_key_cache_hits_total",
            "Data-key cache hits.",
            ["kind"],
            registry=r,
        )
        self.key_cache_misses = Counter(
            "cmek_key_cache_misses_total",
            "Data-key cache misses.",
            ["kind"],
            registry=r,
        )
        self.key_cache_evictions = Counter(
            "cmek_key_cache_evictions_total",
            "Data-key cache entries removed before use: expired, capacity, denied, dropped.",
            ["kind", "reason"],
            registry=r,
        )
        self.key_negative_hits = Counter(
            "cmek_key_negative_cache_hits_total",
            "Requests refused from the denial cache without calling the KMS.",
            ["kind"],
            registry=r,
        )
        self.key_available = Gauge(
            "cmek_key_available",
            "1 if the configured key answered its last call or probe, else 0.",
            ["key"],
            registry=r,
            multiprocess_mode="livemin",  # with --workers: 0 if any live process saw it fail
        )
        self.s3_request_duration = Histogram(
            "cmek_s3_request_duration_seconds",
            "Duration of S3 requests served by the proxy.",
            ["operation", "status"],
            buckets=S3_BUCKETS,
            registry=r,
        )
        self.s3_bytes_in = Counter(
            "cmek_s3_bytes_in_total",
            "Request body bytes received from S3 clients (as sent: aws-chunked framing included).",
            registry=r,
        )
        self.s3_bytes_out = Counter(
            "cmek_s3_bytes_out_total",
            "Body bytes of GET answers sent to S3 clients in full.",
            registry=r,
        )
        self.integrity_failures = Counter(
            "cmek_integrity_failures_total",
            "Stored objects that failed authentication (tampered, truncated, moved).",
            registry=r,
        )
        self.plaintext_reads = Counter(
            "cmek_plaintext_reads_total",
            "Legacy plaintext objects served.",
            ["reason"],
            registry=r,
        )
        self.passthrough_writes = Counter(
            "cmek_passthrough_writes_total",
            "Objects stored unencrypted because a passthrough rule matched (successful writes).",
            ["rule"],
            registry=r,
        )
        self.worker_restarts = Counter(
            "cmek_worker_restarts_total",
            "S3 worker processes started again after they died (serve --workers).",
            registry=r,
        )

    def gauge_callback(
        self, name: str, documentation: str, labels: Sequence[str], read: Read
    ) -> None:
        """Register a gauge read from ``read()`` (label values -> value) at each scrape."""
        gauge = CallbackGauge(name, documentation, labels, read)
        self.registry.register(gauge)
        self._callbacks.append(gauge)

    def observe_backend(self, operation: str, status: str, seconds: float) -> None:
        """Record one request to the backend (``status``: the HTTP status or 'unreachable')."""
        self.backend_request_duration.labels(operation, status).observe(seconds)
        if status == "unreachable":
            self.backend_errors.labels(operation, "unreachable").inc()
        elif status.startswith("5"):
            self.backend_errors.labels(operation, "server_error").inc()

    def observe_kms(self, provider: str, operation: str, outcome: str, seconds: float) -> None:
        """Record one KMS call."""
        self.kms_request_duration.labels(provider, operation, outcome).observe(seconds)
        self.kms_requests.labels(provider, operation, outcome).inc()

    def observe_s3(self, operation: str, status: int, seconds: float) -> None:
        """Record one S3 request served by the front end."""
        self.s3_request_duration.labels(operation, str(status)).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The scrape body in the Prometheus text format, and its content type.

        Under ``serve --workers`` (prometheus_client's multiprocess mode, set up by
        ``proxy.workers``) the values of every process are merged from its directory.
        """
        path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if path:
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged, path=path)  # type: ignore[no-untyped-call]
            for gauge in self._callbacks:  # state this (the parent) process owns: jobs, audit
                merged.register(gauge)
            return generate_latest(merged), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
