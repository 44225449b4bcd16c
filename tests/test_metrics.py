"""Metrics: own registry, MeteredKek outcomes, KeyService cache counters, scraped and parsed."""

from __future__ import annotations

import asyncio
import os
from collections import Counter as Tally
from collections.abc import Mapping

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from proxy.errors import DenialKind, KeyUnavailableError, KmsError, KmsUnreachableError
from proxy.kms.base import DataKey, Kek, WrappedKey
from proxy.kms.keys import KeyService
from proxy.kms.metered import MeteredKek
from proxy.metrics import Metrics

URI = "fake://metrics-key"


class ScriptedKek:
    """Answers each call with the next scripted outcome; counts (operation, outcome)."""

    provider = "fake"
    location = None

    def __init__(self, uri: str = URI) -> None:
        self._uri = uri
        self.script: list[str] = []
        self.seen: Tally[tuple[str, str]] = Tally()
        self._store: dict[bytes, bytes] = {}

    @property
    def uri(self) -> str:
        return self._uri

    async def _enter(self, op: str) -> None:
        outcome = self.script.pop(0) if self.script else "ok"
        self.seen[(op, outcome)] += 1
        await asyncio.sleep(0)
        if outcome == "denied":
            raise KeyUnavailableError("denied", kind=DenialKind.ACCESS_DENIED, key_uri=self._uri)
        if outcome == "unreachable":
            raise KmsUnreachableError("timeout", key_uri=self._uri)
        if outcome == "error":
            raise KmsError("bad request", key_uri=self._uri)

    async def generate_data_key(self, context: Mapping[str, str]) -> DataKey:
        await self._enter("generate_data_key")
        pt, wrapped = os.urandom(32), os.urandom(40)
        self._store[wrapped] = pt
        return DataKey(plaintext=pt, wrapped=wrapped, key_version="v1")

    async def wrap(self, plaintext: bytes, context: Mapping[str, str]) -> WrappedKey:
        await self._enter("wrap")
        wrapped = os.urandom(40)
        self._store[wrapped] = plaintext
        return WrappedKey(wrapped=wrapped, key_version="v1")

    async def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        await self._enter("unwrap")
        return self._store.get(wrapped, b"\0" * 32)


def scrape(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_each_instance_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    assert a.registry is not b.registry and a.registry is not REGISTRY
    a.integrity_failures.inc(3)
    a.s3_bytes_in.inc(100)
    assert value(scrape(a), "cmek_integrity_failures_total") == 3
    assert value(scrape(b), "cmek_integrity_failures_total") == 0
    assert value(scrape(a), "cmek_s3_bytes_in_total") == 100
    assert REGISTRY.get_sample_value("cmek_integrity_failures_total") is None


def test_all_collectors_are_exposed() -> None:
    m = Metrics()
    m.observe_s3("GetObject", 200, 0.02)
    m.observe_s3("PutObject", 503, 1.5)
    m.s3_bytes_out.inc(7)
    m.plaintext_reads.labels("legacy").inc()
    m.passthrough_writes.labels("logs").inc(2)
    m.key_available.labels(URI).set(1)
    s = scrape(m)
    assert (
        value(s, "cmek_s3_request_duration_seconds_count", operation="GetObject", status="200") == 1
    )
    assert (
        value(s, "cmek_s3_request_duration_seconds_count", operation="PutObject", status="503") == 1
    )
    assert value(s, "cmek_s3_bytes_out_total") == 7
    assert value(s, "cmek_plaintext_reads_total", reason="legacy") == 1
    assert value(s, "cmek_passthrough_writes_total", rule="logs") == 2
    assert value(s, "cmek_key_available", key=URI) == 1
    body = m.render()[0].decode()
    for name in (
        "cmek_kms_request_duration_seconds",
        "cmek_kms_requests_total",
        "cmek_key_cache_hits_total",
        "cmek_key_cache_misses_total",
        "cmek_key_cache_evictions_total",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in body


async def test_metered_kek_counts_every_call_by_outcome() -> None:
    metrics = Metrics()
    inner = ScriptedKek()
    kek: Kek = MeteredKek(inner, metrics)
    assert kek.uri == URI and kek.provider == "fake" and kek.location is None
    inner.script = ["ok", "denied", "unreachable", "error", "ok", "unreachable"]
    ops = ["generate_data_key", "wrap", "unwrap"]
    for i in range(len(inner.script) * len(ops)):
        op = ops[i % 3]
        try:
            if op == "generate_data_key":
                await kek.generate_data_key({"bucket": "b"})
            elif op == "wrap":
                await kek.wrap(b"k" * 32, {"bucket": "b"})
            else:
                await kek.unwrap(b"w" * 40, {"bucket": "b"})
        except KmsError:
            pass

    s = scrape(metrics)
    total = 0
    for op in ops:
        for outcome in ("ok", "denied", "unreachable", "error"):
            seen = inner.seen[(op, outcome)]
            total += seen
            labels = {"provider": "fake", "operation": op, "outcome": outcome}
            assert value(s, "cmek_kms_request_duration_seconds_count", **labels) == seen
            assert value(s, "cmek_kms_requests_total", **labels) == seen
            assert value(s, "cmek_kms_request_duration_seconds_bucket", le="+Inf", **labels) == seen
    assert total == 18


async def test_metered_kek_does_not_count_cancelled_calls() -> None:
    metrics = Metrics()

    class Hanging(ScriptedKek):
        async def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

    kek = MeteredKek(Hanging(), metrics)
    task = asyncio.create_task(kek.unwrap(b"x", {"bucket": "b"}))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "cmek_kms_requests_total{" not in metrics.render()[0].decode()


async def test_key_service_metrics_match_the_kms_calls() -> None:
    metrics = Metrics()
    inner = ScriptedKek()
    svc = KeyService(lambda uri: inner, metrics, ttl=60.0, max_entries=2)
    svc.register(URI)

    dk = await svc.data_key_for_write(URI, "secret-bucket-name")
    for _ in range(9):
        await svc.data_key_for_write(URI, "secret-bucket-name")
    await svc.unwrap(URI, dk.wrapped, "secret-bucket-name")  # from the write
    await asyncio.gather(*(svc.unwrap(URI, b"W" * 40, "secret-bucket-name") for _ in range(100)))
    await svc.unwrap(URI, b"V" * 40, "secret-bucket-name")  # capacity: evicts the oldest
    await svc.probe_once()
    inner.script = ["denied"]
    with pytest.raises(KeyUnavailableError):
        await svc.unwrap(URI, b"U" * 40, "secret-bucket-name")

    s = scrape(metrics)
    assert value(s, "cmek_key_cache_hits_total", kind="write") == 9
    assert value(s, "cmek_key_cache_misses_total", kind="write") == 1
    assert value(s, "cmek_key_cache_hits_total", kind="read") == 1
    assert value(s, "cmek_key_cache_misses_total", kind="read") == 102
    assert value(s, "cmek_key_cache_evictions_total", kind="read", reason="capacity") == 1
    assert value(s, "cmek_key_cache_evictions_total", kind="read", reason="denied") == 2
    assert value(s, "cmek_key_cache_evictions_total", kind="write", reason="denied") == 1
    assert value(s, "cmek_key_available", key=URI) == 0
    for (op, outcome), seen in inner.seen.items():
        labels = {"provider": "fake", "operation": op, "outcome": outcome}
        assert value(s, "cmek_kms_request_duration_seconds_count", **labels) == seen
    assert inner.seen[("unwrap", "ok")] == 3  # one cold object, one evicting, one probe
    # label values stay bounded: no bucket names, no wrapped keys
    body = metrics.render()[0].decode()
    assert "secret-bucket-name" not in body and "cmek-proxy-probe" not in body
