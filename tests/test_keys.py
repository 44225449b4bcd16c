"""KeyService: TTL caches, single-flight, denial / outage handling, probe, breaker."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from collections import Counter as Tally
from collections.abc import Mapping
from pathlib import Path

import pytest

from proxy.errors import (
    DenialKind,
    IntegrityError,
    KeyConfigError,
    KeyUnavailableError,
    KmsError,
    KmsUnreachableError,
)
from proxy.kms.base import DataKey, Kek, WrappedKey
from proxy.kms.breaker import BreakerKek, BreakerState, CircuitBreaker
from proxy.kms.health import MAX_TTL
from proxy.kms.keys import KeyEvent, KeyService
from proxy.kms.local import KeyFile, LocalKmsClient, create_key_file
from proxy.kms.metered import MeteredKek
from proxy.metrics import Metrics

URI = "fake://key-a"
URI_B = "fake://key-b"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeKek:
    """In-memory KEK: counts calls, can deny, be down, or be slow."""

    provider = "fake"

    def __init__(self, uri: str, *, location: str | None = None, delay: float = 0.0) -> None:
        self._uri = uri
        self.location = location
        self.delay = delay
        self.calls: Tally[str] = Tally()
        self.deny: set[str] = set()  # operations that are denied
        self.down = False
        self.fail_generic = False
        self._store: dict[bytes, tuple[bytes, dict[str, str]]] = {}

    @property
    def uri(self) -> str:
        return self._uri

    def deny_all(self) -> None:
        self.deny = {"generate_data_key", "wrap", "unwrap"}

    async def _enter(self, op: str) -> None:
        self.calls[op] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.down:
            raise KmsUnreachableError("connection refused", key_uri=self._uri, provider="fake")
        if op in self.deny:
            raise KeyUnavailableError(
                "key is disabled", kind=DenialKind.DISABLED, key_uri=self._uri, provider="fake"
            )
        if self.fail_generic:
            raise KmsError("bad request", key_uri=self._uri, provider="fake")

    def _seal(self, plaintext: bytes, context: Mapping[str, str]) -> bytes:
        wrapped = b"FW" + os.urandom(30)
        self._store[wrapped] = (plaintext, dict(context))
        return wrapped

    async def generate_data_key(self, context: Mapping[str, str]) -> DataKey:
        await self._enter("generate_data_key")
        plaintext = os.urandom(32)
        return DataKey(plaintext=plaintext, wrapped=self._seal(plaintext, context), key_version="1")

    async def wrap(self, plaintext: bytes, context: Mapping[str, str]) -> WrappedKey:
        await self._enter("wrap")
        return WrappedKey(wrapped=self._seal(plaintext, context), key_version="1")

    async def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        await self._enter("unwrap")
        entry = self._store.get(wrapped)
        if entry is None or entry[1] != dict(context):
            raise KeyUnavailableError(
                "does not open", kind=DenialKind.INVALID_STATE, key_uri=self._uri, provider="fake"
            )
        return entry[0]


class Fakes:
    def __init__(self, **kw: float) -> None:
        self.keks: dict[str, FakeKek] = {}
        self.resolved: Tally[str] = Tally()
        self.delay = kw.get("delay", 0.0)

    def __call__(self, uri: str) -> Kek:
        self.resolved[uri] += 1
        if not uri.startswith("fake://"):
            raise KeyConfigError(f"{uri!r} is not a fake key", key_uri=uri)
        if uri not in self.keks:
            self.keks[uri] = FakeKek(uri, delay=self.delay)
        return self.keks[uri]


def make(
    *, ttl: float = 300.0, max_entries: int = 10_000, delay: float = 0.0, **kw: float
) -> tuple[KeyService, Fakes, FakeClock, list[KeyEvent]]:
    fakes = Fakes(delay=delay)
    clock = FakeClock()
    events: list[KeyEvent] = []
    svc = KeyService(
        fakes,
        Metrics(),
        ttl=ttl,
        max_entries=max_entries,
        clock=clock,
        on_event=events.append,
        **kw,  # type: ignore[arg-type]
    )
    return svc, fakes, clock, events


def wrap_new(svc: KeyService, fakes: Fakes, uri: str, bucket: str) -> tuple[bytes, bytes]:
    """A wrapped key made directly in the fake's store (no call, nothing cached)."""
    fakes(uri)
    pt = os.urandom(32)
    return pt, fakes.keks[uri]._seal(pt, {"bucket": bucket})


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("ttl", [0.0, -1.0, MAX_TTL + 0.001, 86400.0])
def test_ttl_must_be_positive_and_capped(ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl"):
        KeyService(Fakes(), Metrics(), ttl=ttl)


def test_ttl_at_cap_and_capacity_bound() -> None:
    KeyService(Fakes(), Metrics(), ttl=MAX_TTL)
    with pytest.raises(ValueError, match="max_entries"):
        KeyService(Fakes(), Metrics(), max_entries=0)


async def test_kek_wrapped_once_per_uri() -> None:
    svc, fakes, _, _ = make()
    k1 = svc.kek(URI)
    assert svc.kek(URI) is k1
    assert isinstance(k1, BreakerKek)
    assert isinstance(k1._inner, MeteredKek)
    assert fakes.resolved[URI] == 1
    with pytest.raises(KeyConfigError):
        svc.kek("nope://x")


# ------------------------------------------------------------------ writes


async def test_one_generate_per_key_and_bucket_per_ttl() -> None:
    svc, fakes, clock, _ = make(ttl=60.0)
    dk1 = await svc.data_key_for_write(URI, "b1")
    for _ in range(50):
        assert await svc.data_key_for_write(URI, "b1") is dk1
    other = await svc.data_key_for_write(URI, "b2")
    assert other.plaintext != dk1.plaintext
    assert fakes.keks[URI].calls["generate_data_key"] == 2

    clock.advance(59.9)
    assert await svc.data_key_for_write(URI, "b1") is dk1
    clock.advance(0.1)  # exactly ttl: expired
    dk2 = await svc.data_key_for_write(URI, "b1")
    assert dk2.plaintext != dk1.plaintext
    assert fakes.keks[URI].calls["generate_data_key"] == 3


async def test_binding_context_is_exactly_the_bucket() -> None:
    svc, fakes, _, _ = make()
    dk = await svc.data_key_for_write(URI, "my-bucket")
    assert fakes.keks[URI]._store[dk.wrapped][1] == {"bucket": "my-bucket"}


async def test_write_then_read_needs_no_unwrap() -> None:
    svc, fakes, _, _ = make()
    dk = await svc.data_key_for_write(URI, "b")
    assert await svc.unwrap(URI, dk.wrapped, "b") == dk.plaintext
    assert fakes.keks[URI].calls["unwrap"] == 0
    # the read cache is bound to the bucket too
    with pytest.raises(KeyUnavailableError):
        await svc.unwrap(URI, dk.wrapped, "other-bucket")
    assert fakes.keks[URI].calls["unwrap"] == 1


async def test_single_flight_writes() -> None:
    svc, fakes, _, _ = make(delay=0.05)
    results = await asyncio.gather(*(svc.data_key_for_write(URI, "b") for _ in range(1000)))
    assert fakes.keks[URI].calls["generate_data_key"] == 1
    assert all(r is results[0] for r in results)
    assert not svc._write_flights


async def test_write_failure_reaches_all_waiters_and_is_not_cached() -> None:
    svc, fakes, _, _ = make(delay=0.05)
    fakes(URI).down = True  # type: ignore[attr-defined]
    out = await asyncio.gather(
        *(svc.data_key_for_write(URI, "b") for _ in range(200)), return_exceptions=True
    )
    assert all(isinstance(r, KmsUnreachableError) for r in out)
    assert fakes.keks[URI].calls["generate_data_key"] == 1
    fakes.keks[URI].down = False
    await svc.data_key_for_write(URI, "b")
    assert fakes.keks[URI].calls["generate_data_key"] == 2


# ------------------------------------------------------------------- reads


async def test_single_flight_reads_1000_cold_objects_one_call() -> None:
    svc, fakes, _, _ = make(delay=0.05)
    pt, wrapped = wrap_new(svc, fakes, URI, "b")
    results = await asyncio.gather(*(svc.unwrap(URI, wrapped, "b") for _ in range(1000)))
    assert fakes.keks[URI].calls["unwrap"] == 1
    assert all(r == pt for r in results)
    assert not svc._read_flights
    # and now it is cached
    assert await svc.unwrap(URI, wrapped, "b") == pt
    assert fakes.keks[URI].calls["unwrap"] == 1


async def test_cancelled_waiter_does_not_cancel_the_shared_call() -> None:
    svc, fakes, _, _ = make(delay=0.05)
    pt, wrapped = wrap_new(svc, fakes, URI, "b")
    first = asyncio.create_task(svc.unwrap(URI, wrapped, "b"))
    others = [asyncio.create_task(svc.unwrap(URI, wrapped, "b")) for _ in range(10)]
    await asyncio.sleep(0)
    first.cancel()
    assert all(r == pt for r in await asyncio.gather(*others))
    with pytest.raises(asyncio.CancelledError):
        await first
    assert fakes.keks[URI].calls["unwrap"] == 1


async def test_read_ttl_expiry() -> None:
    svc, fakes, clock, _ = make(ttl=10.0)
    pt, wrapped = wrap_new(svc, fakes, URI, "b")
    assert await svc.unwrap(URI, wrapped, "b") == pt
    clock.advance(9.0)
    assert await svc.unwrap(URI, wrapped, "b") == pt
    assert fakes.keks[URI].calls["unwrap"] == 1
    clock.advance(1.0)
    assert await svc.unwrap(URI, wrapped, "b") == pt
    assert fakes.keks[URI].calls["unwrap"] == 2


async def test_capacity_bound() -> None:
    svc, fakes, _, _ = make(max_entries=3)
    wrapped = [(wrap_new(svc, fakes, URI, "b"))[1] for _ in range(5)]
    for w in wrapped:
        await svc.unwrap(URI, w, "b")
    assert len(svc._reads) == 3
    assert fakes.keks[URI].calls["unwrap"] == 5
    # the oldest two were evicted, the newest three are served from cache
    for w in wrapped[2:]:
        await svc.unwrap(URI, w, "b")
    assert fakes.keks[URI].calls["unwrap"] == 5
    await svc.unwrap(URI, wrapped[0], "b")
    assert fakes.keks[URI].calls["unwrap"] == 6
    assert len(svc._reads) == 3
    for i in range(10):
        await svc.data_key_for_write(URI, f"bucket-{i}")
    assert len(svc._writes) == 3


async def test_expired_entries_are_swept_on_insert() -> None:
    svc, fakes, clock, _ = make(ttl=5.0)
    for _ in range(20):
        await svc.unwrap(URI, (wrap_new(svc, fakes, URI, "b"))[1], "b")
    assert len(svc._reads) == 20
    clock.advance(5.0)
    await svc.unwrap(URI, (wrap_new(svc, fakes, URI, "b"))[1], "b")
    assert len(svc._reads) == 1


# ------------------------------------------------------------------ denial


async def test_denial_drops_all_material_of_the_key_and_later_success_restores() -> None:
    svc, fakes, _, events = make(negative_ttl=0)  # without the denial cache
    svc.register(URI)
    svc.register(URI_B)
    wrapped = [wrap_new(svc, fakes, URI, "b") for _ in range(3)]
    for _, w in wrapped:
        await svc.unwrap(URI, w, "b")
    await svc.data_key_for_write(URI, "b")
    await svc.data_key_for_write(URI, "c")
    other = await svc.data_key_for_write(URI_B, "b")
    assert svc._reads.count_for(URI) == 5 and svc._writes.count_for(URI) == 2

    kek = fakes.keks[URI]
    kek.deny_all()
    fresh = wrap_new(svc, fakes, URI, "b")
    with pytest.raises(KeyUnavailableError) as ei:
        await svc.unwrap(URI, fresh[1], "b")
    assert ei.value.kind is DenialKind.DISABLED
    # every cached entry of the key is gone at once; the other key is untouched
    assert svc._reads.count_for(URI) == 0 and svc._writes.count_for(URI) == 0
    assert await svc.data_key_for_write(URI_B, "b") is other
    st = svc.status()[URI]
    assert not st.available and st.state == "revoked"
    assert st.reason.startswith("disabled:") and "key is disabled" in st.reason
    assert [(e.kind, e.kek_uri) for e in events] == [("revoked", URI)]

    # previously cached material is not served: the KMS is asked (and denies)
    calls_before = sum(kek.calls.values())
    for _, w in wrapped:
        with pytest.raises(KeyUnavailableError):
            await svc.unwrap(URI, w, "b")
    with pytest.raises(KeyUnavailableError):
        await svc.data_key_for_write(URI, "b")
    assert sum(kek.calls.values()) == calls_before + 4
    assert len(events) == 1  # no event without a state change

    kek.deny = set()
    pt = await svc.unwrap(URI, wrapped[0][1], "b")
    assert pt == wrapped[0][0]
    assert svc.status()[URI].available
    assert [e.kind for e in events] == ["revoked", "restored"]


async def test_partial_denial_does_not_flap() -> None:
    svc, fakes, _, events = make(negative_ttl=0)
    _, w = wrap_new(svc, fakes, URI, "b")
    fakes.keks[URI].deny = {"unwrap"}
    with pytest.raises(KeyUnavailableError):
        await svc.unwrap(URI, w, "b")
    await svc.data_key_for_write(URI, "b")  # encrypt still allowed: not "restored"
    assert [e.kind for e in events] == ["revoked"]
    fakes.keks[URI].deny = set()
    await svc.unwrap(URI, w, "b")
    assert [e.kind for e in events] == ["revoked", "restored"]


async def test_call_in_flight_during_a_drop_is_not_cached() -> None:
    svc, fakes, _, _ = make(delay=0.05)
    pt, w = wrap_new(svc, fakes, URI, "b")
    task = asyncio.create_task(svc.unwrap(URI, w, "b"))
    await asyncio.sleep(0.01)
    svc.drop_key(URI, "removed from configuration")
    assert await task == pt
    assert svc._reads.count_for(URI) == 0
    await svc.unwrap(URI, w, "b")
    assert fakes.keks[URI].calls["unwrap"] == 2


# ------------------------------------------------------------------ outage


async def test_outage_serves_from_cache_then_raises_after_expiry() -> None:
    svc, fakes, clock, events = make(ttl=60.0)
    svc.register(URI)
    pt, w = wrap_new(svc, fakes, URI, "b")
    await svc.unwrap(URI, w, "b")
    dk = await svc.data_key_for_write(URI, "b")
    kek = fakes.keks[URI]
    kek.down = True

    # a miss fails, but does not drop anything
    with pytest.raises(KmsUnreachableError):
        await svc.unwrap(URI, (wrap_new(svc, fakes, URI, "b"))[1], "b")
    assert [e.kind for e in events] == ["unreachable"]
    assert svc.status()[URI].state == "unreachable"
    clock.advance(59.0)
    assert await svc.unwrap(URI, w, "b") == pt
    assert await svc.data_key_for_write(URI, "b") is dk
    assert await svc.unwrap(URI, dk.wrapped, "b") == dk.plaintext

    clock.advance(1.0)
    with pytest.raises(KmsUnreachableError):
        await svc.unwrap(URI, w, "b")
    with pytest.raises(KmsUnreachableError):
        await svc.data_key_for_write(URI, "b")

    kek.down = False
    clock.advance(10.0)  # past the breaker's reset timeout
    assert await svc.unwrap(URI, w, "b") == pt
    assert [e.kind for e in events] == ["unreachable", "restored"]


async def test_breaker_stops_hammering_a_dead_kms_and_probe_is_the_trial() -> None:
    svc, fakes, clock, events = make(breaker_failure_threshold=3, breaker_reset_timeout=10.0)
    svc.register(URI)
    kek = fakes(URI)
    assert isinstance(kek, FakeKek)
    kek.down = True
    for _ in range(3):
        with pytest.raises(KmsUnreachableError):
            await svc.data_key_for_write(URI, "b")
    assert kek.calls["generate_data_key"] == 3
    for _ in range(20):
        with pytest.raises(KmsUnreachableError, match="circuit open") as ei:
            await svc.data_key_for_write(URI, "b")
        assert ei.value.key_uri == URI and ei.value.provider == "fake"
    assert kek.calls["generate_data_key"] == 3  # fail fast, KMS untouched

    clock.advance(10.0)
    await svc.probe_once()  # trial, still down: re-opens
    assert kek.calls["generate_data_key"] == 4
    with pytest.raises(KmsUnreachableError, match="circuit open"):
        await svc.data_key_for_write(URI, "b")

    kek.down = False
    clock.advance(10.0)
    await svc.probe_once()
    assert svc.kek(URI).breaker.state is BreakerState.CLOSED
    assert svc.status()[URI].available
    await svc.data_key_for_write(URI, "b")
    assert [e.kind for e in events] == ["unreachable", "restored"]


# ------------------------------------------------------------------- probe


async def test_probe_tracks_availability_and_emits_on_changes_only() -> None:
    svc, fakes, _, events = make()
    svc.register(URI)
    svc.register(URI_B)
    assert svc.status()[URI].state == "unknown"
    await svc.probe_once()
    assert all(s.available for s in svc.status().values())
    assert events == []  # unknown -> available is not a change worth an event
    kek = fakes.keks[URI]
    assert kek.calls["generate_data_key"] == 1 and kek.calls["unwrap"] == 1

    await svc.data_key_for_write(URI, "b")
    kek.deny_all()
    await svc.probe_once()
    await svc.probe_once()
    assert svc._writes.count_for(URI) == 0  # the probe's denial dropped material
    st = svc.status()
    assert not st[URI].available and st[URI].state == "revoked"
    assert st[URI_B].available
    assert [(e.kind, e.kek_uri) for e in events] == [("revoked", URI)]
    assert "disabled" in events[0].reason

    kek.deny = set()
    kek.down = True
    await svc.probe_once()
    assert svc.status()[URI].state == "unreachable"
    kek.down = False
    await svc.probe_once()
    assert [e.kind for e in events] == ["revoked", "unreachable", "restored"]


async def test_probe_of_an_unresolvable_or_erroring_key() -> None:
    svc, fakes, _, events = make()
    svc.register("nope://x")
    svc.register(URI)
    fakes(URI)
    fakes.keks[URI].fail_generic = True
    await svc.probe_once()
    st = svc.status()
    assert st["nope://x"].state == "unreachable" and "not a fake key" in st["nope://x"].reason
    assert st[URI].state == "unreachable" and "bad request" in st[URI].reason
    assert len(events) == 2


async def test_probe_timeout() -> None:
    svc, _, _, _ = make(delay=0.2, probe_timeout=0.01)
    svc.register(URI)
    await svc.probe_once()
    st = svc.status()[URI]
    assert st.state == "unreachable" and "timed out" in st.reason
    assert svc.kek(URI).breaker.state is BreakerState.CLOSED  # trial slot not leaked


async def test_run_prober_runs_until_cancelled() -> None:
    svc, fakes, _, _ = make()
    svc.register(URI)
    task = asyncio.create_task(svc.run_prober(0.01))
    for _ in range(200):
        await asyncio.sleep(0.01)
        if URI in fakes.keks and fakes.keks[URI].calls["unwrap"] >= 3:
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fakes.keks[URI].calls["unwrap"] >= 3
    with pytest.raises(ValueError):
        await svc.run_prober(0)


# ---------------------------------------------------------------- validate


async def test_validate_fake() -> None:
    svc, fakes, _, _ = make()
    fakes(URI)
    fakes.keks[URI].location = "EU-West-1"
    await svc.validate(URI, "eu-west-1")
    await svc.validate(URI, None)
    with pytest.raises(KeyConfigError) as ei:
        await svc.validate(URI, "us-east-1")
    assert URI in str(ei.value) and "fake" in str(ei.value) and ei.value.provider == "fake"

    fakes.keks[URI].deny = {"unwrap"}
    with pytest.raises(KeyConfigError) as ei:
        await svc.validate(URI, None)
    assert URI in str(ei.value) and "(fake)" in str(ei.value) and "key is disabled" in str(ei.value)
    fakes.keks[URI].deny = set()
    fakes.keks[URI].down = True
    with pytest.raises(KmsUnreachableError) as eu:
        await svc.validate(URI, None)
    assert URI in str(eu.value) and "connection refused" in str(eu.value)
    with pytest.raises(KeyConfigError):
        await svc.validate("nope://x", None)


# -------------------------------------------------------------- local://


def _local_service(tmp_path: Path) -> tuple[KeyService, str, Path, list[KeyEvent]]:
    path = tmp_path / "keys.json"
    create_key_file(path, key_id="k1")
    events: list[KeyEvent] = []
    client = LocalKmsClient()
    svc = KeyService(client.get_kek, Metrics(), on_event=events.append, negative_ttl=0)
    return svc, f"local://{path}#k1", path, events


async def test_local_provider_round_trip_and_validate(tmp_path: Path) -> None:
    svc, uri, _, _ = _local_service(tmp_path)
    await svc.validate(uri, None)
    await svc.validate(uri, "anywhere")  # local keys have no location
    dk = await svc.data_key_for_write(uri, "bucket-1")
    assert len(dk.plaintext) == 32
    # a fresh service (cold cache) opens it through the key file
    svc2 = KeyService(LocalKmsClient().get_kek, Metrics())
    assert await svc2.unwrap(uri, dk.wrapped, "bucket-1") == dk.plaintext
    # bound to the bucket: a wrapped key moved to another bucket is an integrity failure of
    # that object, not a denial of the key (which would drop every cached key)
    with pytest.raises(IntegrityError):
        await svc2.unwrap(uri, dk.wrapped, "bucket-2")
    assert svc2.status().get(uri) is None or svc2.status()[uri].state != "revoked"


async def test_local_provider_key_removed_then_restored(tmp_path: Path) -> None:
    svc, uri, path, events = _local_service(tmp_path)
    svc.register(uri)
    await svc.probe_once()
    dk = await svc.data_key_for_write(uri, "b")
    original = KeyFile.load(path)

    replacement = KeyFile(primary="k9", keys={"k9": os.urandom(32)})
    replacement.save(path)
    os.utime(path, (1_000_000, 1_000_000))
    await svc.probe_once()
    assert svc.status()[uri].state == "revoked"
    assert svc._reads.count_for(uri) == 0 and svc._writes.count_for(uri) == 0
    with pytest.raises(KeyUnavailableError):
        await svc.unwrap(uri, dk.wrapped, "b")

    original.save(path)
    os.utime(path, (2_000_000, 2_000_000))
    assert await svc.unwrap(uri, dk.wrapped, "b") == dk.plaintext
    assert svc.status()[uri].available
    assert [e.kind for e in events] == ["revoked", "restored"]

    path.unlink()
    with pytest.raises(KeyUnavailableError):
        await svc.data_key_for_write(uri, "b2")
    with pytest.raises(KeyConfigError, match=r"local\)"):
        await svc.validate(uri, None)


async def test_local_provider_bad_key_file_fails_validation(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"primary": "k1", "keys": {"k1": base64.b64encode(b"x").decode()}}))
    svc = KeyService(LocalKmsClient().get_kek, Metrics())
    with pytest.raises(KeyConfigError, match="not 32 bytes"):
        await svc.validate(f"local://{path}", None)


# ----------------------------------------------------------------- hygiene


async def test_no_key_material_in_logs_events_or_reprs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    svc, fakes, _, events = make()
    svc.register(URI)
    dk = await svc.data_key_for_write(URI, "b")
    fakes.keks[URI].deny_all()
    with pytest.raises(KeyUnavailableError):
        await svc.unwrap(URI, b"FW" + os.urandom(30), "b")
    svc.drop_key(URI, "test")
    text = caplog.text + repr(events) + repr(svc.status()) + repr(dk) + repr(svc.kek(URI))
    for form in (dk.plaintext.hex(), base64.b64encode(dk.plaintext).decode(), repr(dk.plaintext)):
        assert form not in text


# ----------------------------------------------------------------- breaker


class FlakyCall:
    def __init__(self) -> None:
        self.calls = 0
        self.fail: type[KmsError] | None = None
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> str:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is KmsUnreachableError:
            raise KmsUnreachableError("down")
        if self.fail is KeyUnavailableError:
            raise KeyUnavailableError("denied", kind=DenialKind.ACCESS_DENIED)
        return "ok"


async def test_breaker_opens_fails_fast_and_half_opens() -> None:
    clock = FakeClock()
    br = CircuitBreaker(failure_threshold=3, reset_timeout=5.0, clock=clock)
    fn = FlakyCall()
    fn.fail = KmsUnreachableError
    for _ in range(3):
        with pytest.raises(KmsUnreachableError, match="down"):
            await br.call(fn)
    assert br.state is BreakerState.OPEN
    with pytest.raises(KmsUnreachableError, match="circuit open"):
        await br.call(fn)
    assert fn.calls == 3

    clock.advance(5.0)
    with pytest.raises(KmsUnreachableError, match="down"):
        await br.call(fn)  # the trial, fails: open again
    assert br.state is BreakerState.OPEN and fn.calls == 4
    clock.advance(4.9)
    with pytest.raises(KmsUnreachableError, match="circuit open"):
        await br.call(fn)

    clock.advance(0.1)
    fn.fail = None
    fn.gate = asyncio.Event()
    trial = asyncio.create_task(br.call(fn))
    await asyncio.sleep(0)
    assert br.state.value == "half_open"
    with pytest.raises(KmsUnreachableError, match="trial"):
        await br.call(fn)  # only one trial at a time
    fn.gate.set()
    assert await trial == "ok"
    assert br.state.value == "closed" and br.consecutive_failures == 0


async def test_breaker_denials_are_answers_not_failures() -> None:
    clock = FakeClock()
    br = CircuitBreaker(failure_threshold=2, reset_timeout=5.0, clock=clock)
    fn = FlakyCall()
    for _ in range(5):
        fn.fail = KmsUnreachableError
        with pytest.raises(KmsUnreachableError):
            await br.call(fn)
        fn.fail = KeyUnavailableError
        with pytest.raises(KeyUnavailableError):
            await br.call(fn)  # resets the consecutive count
    assert br.state is BreakerState.CLOSED

    fn.fail = KmsUnreachableError
    for _ in range(2):
        with pytest.raises(KmsUnreachableError):
            await br.call(fn)
    clock.advance(5.0)
    fn.fail = KeyUnavailableError
    with pytest.raises(KeyUnavailableError):
        await br.call(fn)  # a denying trial closes the circuit
    assert br.state is BreakerState.CLOSED


async def test_breaker_cancelled_trial_frees_the_slot() -> None:
    clock = FakeClock()
    br = CircuitBreaker(failure_threshold=1, reset_timeout=1.0, clock=clock)
    fn = FlakyCall()
    fn.fail = KmsUnreachableError
    with pytest.raises(KmsUnreachableError):
        await br.call(fn)
    clock.advance(1.0)
    fn.fail = None
    fn.gate = asyncio.Event()
    trial = asyncio.create_task(br.call(fn))
    await asyncio.sleep(0)
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    fn.gate.set()
    assert await br.call(fn) == "ok"
    assert br.state is BreakerState.CLOSED


def test_breaker_arguments() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(reset_timeout=0)


# ---- negative caching ------------------------------------------------------------------


async def test_denied_unwrap_is_remembered_per_wrapped_key_for_the_period() -> None:
    svc, fakes, clock, _ = make(negative_ttl=5.0)
    _, w = wrap_new(svc, fakes, URI, "b")
    _, w2 = wrap_new(svc, fakes, URI, "b")
    kek = fakes.keks[URI]
    kek.deny = {"unwrap"}
    for _ in range(10):  # a client retrying against the revoked key
        with pytest.raises(KeyUnavailableError) as ei:
            await svc.unwrap(URI, w, "b")
        assert ei.value.kind is DenialKind.DISABLED and ei.value.key_uri == URI
    assert kek.calls["unwrap"] == 1
    assert svc._metrics.key_negative_hits.labels("read")._value.get() == 9
    with pytest.raises(KeyUnavailableError):
        await svc.unwrap(URI, w2, "b")  # another wrapped key: its own answer
    assert kek.calls["unwrap"] == 2
    clock.advance(5.0)  # the period is over: asked again (once)
    for _ in range(3):
        with pytest.raises(KeyUnavailableError):
            await svc.unwrap(URI, w, "b")
    assert kek.calls["unwrap"] == 3


async def test_denied_generate_is_remembered_per_key_and_bucket() -> None:
    svc, fakes, clock, _ = make(negative_ttl=2.0)
    fakes(URI)
    kek = fakes.keks[URI]
    kek.deny = {"generate_data_key"}
    for _ in range(5):
        with pytest.raises(KeyUnavailableError):
            await svc.data_key_for_write(URI, "b")
    assert kek.calls["generate_data_key"] == 1
    assert svc._metrics.key_negative_hits.labels("write")._value.get() == 4
    kek.deny = set()
    with pytest.raises(KeyUnavailableError):  # still remembered: reinstatement waits
        await svc.data_key_for_write(URI, "b")
    await svc.data_key_for_write(URI, "c")  # another bucket asks the KMS
    clock.advance(2.0)
    await svc.data_key_for_write(URI, "b")
    assert kek.calls["generate_data_key"] == 3


async def test_successful_probe_clears_remembered_denials() -> None:
    svc, fakes, _, _ = make(negative_ttl=60.0)
    svc.register(URI)
    plain, w = wrap_new(svc, fakes, URI, "b")
    kek = fakes.keks[URI]
    kek.deny_all()
    with pytest.raises(KeyUnavailableError):
        await svc.unwrap(URI, w, "b")
    with pytest.raises(KeyUnavailableError):
        await svc.data_key_for_write(URI, "b")
    await svc.probe_once()  # still denied: nothing cleared
    with pytest.raises(KeyUnavailableError):
        await svc.unwrap(URI, w, "b")
    kek.deny = set()  # reinstated
    await svc.probe_once()
    assert svc.status()[URI].available
    assert await svc.unwrap(URI, w, "b") == plain
    await svc.data_key_for_write(URI, "b")


def test_negative_ttl_is_bounded() -> None:
    with pytest.raises(ValueError, match="negative_ttl"):
        KeyService(Fakes(), Metrics(), negative_ttl=61.0)
    with pytest.raises(ValueError, match="negative_ttl"):
        KeyService(Fakes(), Metrics(), negative_ttl=-1.0)
