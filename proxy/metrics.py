"""Prometheus metrics of one cmek-proxy instance.

``Metrics`` owns its own ``CollectorRegistry`` (never the process-global default one),
so every app instance and every test has independent counters.  Label values are
bounded: provider names, operation names, outcomes, configured key URIs, HTTP status
codes, configured rule names.  Object keys and bucket names are never labels.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

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


class Metrics:
    """All collectors of one proxy instance, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
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
            "Body bytes received from S3 clients.",
            registry=r,
        )
        self.s3_bytes_out = Counter(
            "cmek_s3_bytes_out_total",
            "Body bytes sent to S3 clients.",
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
            "Objects written unencrypted because a passthrough rule matched.",
            ["rule"],
            registry=r,
        )

    def observe_kms(self, provider: str, operation: str, outcome: str, seconds: float) -> None:
        """Record one KMS call."""
        self.kms_request_duration.labels(provider, operation, outcome).observe(seconds)
        self.kms_requests.labels(provider, operation, outcome).inc()

    def observe_s3(self, operation: str, status: int, seconds: float) -> None:
        """Record one S3 request served by the front end."""
        self.s3_request_duration.labels(operation, str(status)).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The scrape body in the Prometheus text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
