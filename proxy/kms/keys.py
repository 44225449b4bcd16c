"""The data-key service: bounded TTL caches, single-flight KMS calls, key health.

A fresh per-object key is sealed under a 32-byte *data key* that the customer's KMS
generates and wraps; the binding context is exactly ``{"bucket": <bucket name>}``.

* **writes** - at most one ``generate_data_key`` per ``(kek_uri, bucket)`` per TTL; the
  data key is also put into the read cache under its wrapped form(s);
* **reads** - unwrapped material is cached by ``(kek_uri, wrapped, bucket)``;
* **single-flight** - concurrent misses share one KMS call; failures are not cached;
* **bounded** - at most ``max_entries`` per cache; gone on expiry, capacity, denial;
* **denial** drops *all* material of the key (and its replica group), marks it revoked,
  is remembered for ``negative_ttl``; the next success on the denied side (or a probe
  round trip) restores it, so a key allowing encrypt but denying decrypt does not flap;
* **outage** drops nothing: caches serve until expiry; a per-key breaker fails fast and
  the prober's call is its trial; replicas fail over (``proxy.kms.replicas``).

Key material is never logged and never part of a repr (docs/KMS.md has the bounds).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import TypeVar

from proxy.crypto.envelope import WrappedReplica
from proxy.errors import (
    DenialKind,
    KeyConfigError,
    KeyUnavailableError,
    KmsError,
    KmsUnreachableError,
)
from proxy.kms import health as kh
from proxy.kms import replicas
from proxy.kms.base import DATA_KEY_BYTES, DataKey, Kek
from proxy.kms.breaker import BreakerKek, CircuitBreaker
from proxy.kms.cache import Denial, TtlCache, single_flight
from proxy.kms.health import EventKind, Health, KeyEvent, KeyState, KeyStatus, Op
from proxy.kms.metered import MeteredKek
from proxy.metrics import Metrics

__all__ = ["KeyEvent", "KeyService", "KeyState", "KeyStatus"]

log = logging.getLogger(__name__)


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")


class KeyService:
    """Data keys for writes and unwrapped data keys for reads, cached and single-flight."""

    def __init__(
        self,
        resolve: Callable[[str], Kek],
        metrics: Metrics,
        *,
        ttl: float = 300.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[KeyEvent], None] | None = None,
        wall_clock: Callable[[], float] = time.time,
        breaker_failure_threshold: int = 5,
        breaker_reset_timeout: float = 10.0,
        probe_timeout: float = 30.0,
        negative_ttl: float = 5.0,
    ) -> None:
        if not ttl > 0:
            raise ValueError(f"key cache ttl must be > 0 seconds, got {ttl}")
        if ttl > kh.MAX_TTL:
            raise ValueError(f"key cache ttl must be at most {kh.MAX_TTL:.0f} seconds, got {ttl}")
        if max_entries < 1:
            raise ValueError(f"key cache max_entries must be at least 1, got {max_entries}")
        if not probe_timeout > 0:
            raise ValueError(f"probe_timeout must be > 0 seconds, got {probe_timeout}")
        if not 0 <= negative_ttl <= kh.MAX_NEGATIVE_TTL:
            raise ValueError(f"negative_ttl must be within 0..{kh.MAX_NEGATIVE_TTL:.0f} s")
        self._resolve = resolve
        self._metrics = metrics
        self._clock = clock
        self._wall_clock = wall_clock
        self._on_event = on_event
        self._breaker_threshold = breaker_failure_threshold
        self._breaker_reset = breaker_reset_timeout
        self._probe_timeout = probe_timeout
        self.ttl = ttl
        self._keks: dict[str, BreakerKek] = {}
        self._writes: TtlCache[str, DataKey] = TtlCache(
            "write",
            ttl=ttl,
            max_entries=max_entries,
            clock=clock,
            evictions=metrics.key_cache_evictions,
        )
        self._reads: TtlCache[tuple[bytes, str], bytes] = TtlCache(
            "read",
            ttl=ttl,
            max_entries=max_entries,
            clock=clock,
            evictions=metrics.key_cache_evictions,
        )
        # denials remembered for ``negative_ttl`` (0: off): a client retrying against a
        # revoked key costs the KMS at most one call per period per (key, bucket) / wrapped key
        self._negative_ttl = negative_ttl
        self._denied_writes: TtlCache[str, Denial] = TtlCache(
            "denied_write",
            ttl=max(negative_ttl, 1e-9),
            max_entries=max_entries,
            clock=clock,
            evictions=metrics.key_cache_evictions,
        )
        self._denied_reads: TtlCache[tuple[bytes, str], Denial] = TtlCache(
            "denied_read",
            ttl=max(negative_ttl, 1e-9),
            max_entries=max_entries,
            clock=clock,
            evictions=metrics.key_cache_evictions,
        )
        self._negative_hits = {k: metrics.key_negative_hits.labels(k) for k in ("write", "read")}
        self.groups = replicas.Groups()  # keys with replicas (read-only outside)
        self._denial_kind: dict[str, DenialKind] = {}
        self._write_flights: dict[tuple[str, str], asyncio.Task[DataKey]] = {}
        self._read_flights: dict[tuple[str, tuple[bytes, str]], asyncio.Task[bytes]] = {}
        # bumped whenever a key's material is dropped; an in-flight call that started
        # before the drop neither caches its result nor marks the key available
        self._epochs: dict[str, int] = {}
        self._health: dict[str, Health] = {}
        self._registered: dict[str, None] = {}  # insertion-ordered set
        self._hits = {k: metrics.key_cache_hits.labels(k) for k in ("write", "read")}
        self._misses = {k: metrics.key_cache_misses.labels(k) for k in ("write", "read")}

    # ------------------------------------------------------------------ keks

    def kek(self, kek_uri: str) -> BreakerKek:
        """The resolved ``Kek`` for a URI, wrapped once as ``BreakerKek(MeteredKek(kek))``.

        Raises ``KeyConfigError`` if the URI does not resolve.
        """
        kek = self._keks.get(kek_uri)
        if kek is None:
            breaker = CircuitBreaker(self._breaker_threshold, self._breaker_reset, self._clock)
            kek = BreakerKek(MeteredKek(self._resolve(kek_uri), self._metrics), breaker)
            self._keks[kek_uri] = kek
        return kek

    def _epoch(self, kek_uri: str) -> int:
        return self._epochs.get(kek_uri, 0)

    # ----------------------------------------------------------- data keys

    async def data_key_for_write(self, kek_uri: str, bucket: str) -> DataKey:
        """The data key to seal new objects of ``bucket`` under, at most one KMS call per TTL."""
        key = (kek_uri, bucket)
        dk = self._writes.get(key)
        if dk is not None:
            self._hits["write"].inc()
            return dk
        self._misses["write"].inc()
        denial = self._denied_writes.get(key)
        if denial is not None:
            self._negative_hits["write"].inc()
            raise denial.error(kek_uri)
        return await single_flight(
            self._write_flights, key, lambda: self._fetch_write(kek_uri, bucket)
        )

    async def _fetch_write(self, kek_uri: str, bucket: str) -> DataKey:
        epoch = self._epoch(kek_uri)
        group = self.groups.of_key(kek_uri)
        try:
            if group is None:
                dk = await self._generate(kek_uri, bucket)
            else:
                self._fail_closed(group)
                dk = await replicas.write_group(
                    group,
                    self._state,
                    lambda m: self._generate(m, bucket),
                    lambda m, pt: self._call(
                        m, self._epoch(m), "encrypt", self.kek(m).wrap(pt, {"bucket": bucket})
                    ),
                )
        except KeyUnavailableError as exc:
            if self._negative_ttl > 0:
                self._denied_writes.put((kek_uri, bucket), Denial.of(exc))
            raise
        if self._epoch(kek_uri) == epoch:
            self._writes.put((kek_uri, bucket), dk)
            self._reads.put((dk.kek_uri or kek_uri, (dk.wrapped, bucket)), dk.plaintext)
            for r in dk.replicas:
                self._reads.put((r.kek_uri, (r.wrapped, bucket)), dk.plaintext)
        return dk

    async def _generate(self, kek_uri: str, bucket: str) -> DataKey:
        kek = self.kek(kek_uri)
        epoch = self._epoch(kek_uri)
        dk = await self._call(kek_uri, epoch, "encrypt", kek.generate_data_key({"bucket": bucket}))
        if len(dk.plaintext) != DATA_KEY_BYTES:
            raise KmsError(
                f"{kek.provider} returned a {len(dk.plaintext)}-byte data key for {kek_uri}, "
                f"expected {DATA_KEY_BYTES}",
                key_uri=kek_uri,
                provider=kek.provider,
            )
        return dk

    async def unwrap(
        self,
        kek_uri: str,
        wrapped: bytes,
        bucket: str,
        replica_forms: Sequence[WrappedReplica] = (),
    ) -> bytes:
        """The plaintext of a wrapped data key stored in ``bucket``'s object metadata;
        with the envelope's replica forms, by the first replica that answers."""
        group = self.groups.containing(kek_uri)
        if group is None and not replica_forms:
            return await self._unwrap_one(kek_uri, wrapped, bucket)
        forms = {kek_uri: wrapped} | {r.kek_uri: r.wrapped for r in replica_forms}
        self._fail_closed((*(group or ()), *forms))
        order = replicas.read_order(forms, group or tuple(forms), self._state)
        return await replicas.read_group(order, lambda u: self._unwrap_one(u, forms[u], bucket))

    async def _unwrap_one(self, kek_uri: str, wrapped: bytes, bucket: str) -> bytes:
        key = (kek_uri, (wrapped, bucket))
        plaintext = self._reads.get(key)
        if plaintext is not None:
            self._hits["read"].inc()
            return plaintext
        self._misses["read"].inc()
        denial = self._denied_reads.get(key)
        if denial is not None:
            self._negative_hits["read"].inc()
            raise denial.error(kek_uri)
        return await single_flight(
            self._read_flights, key, lambda: self._fetch_read(kek_uri, wrapped, bucket)
        )

    # ------------------------------------------------------------ replicas

    def set_replicas(self, kek_uri: str, members: Sequence[str]) -> None:
        """Declare the replicas of a key (empty: none); each is registered (probed)."""
        for m in self.groups.assign(kek_uri, members):
            self.register(m)

    def _state(self, uri: str) -> KeyState:
        h = self._health.get(uri)
        return h.state if h is not None else "unknown"

    def _fail_closed(self, group: Sequence[str]) -> None:
        replicas.fail_closed(
            group,
            self._state,
            lambda m: self._health[m].reason,
            lambda m: self._denial_kind.get(m, DenialKind.ACCESS_DENIED),
        )

    async def _fetch_read(self, kek_uri: str, wrapped: bytes, bucket: str) -> bytes:
        kek = self.kek(kek_uri)
        epoch = self._epoch(kek_uri)
        try:
            plaintext = await self._call(
                kek_uri, epoch, "decrypt", kek.unwrap(wrapped, {"bucket": bucket})
            )
        except KeyUnavailableError as exc:
            if self._negative_ttl > 0:
                self._denied_reads.put((kek_uri, (wrapped, bucket)), Denial.of(exc))
            raise
        if self._epoch(kek_uri) == epoch:
            self._reads.put((kek_uri, (wrapped, bucket)), plaintext)
        return plaintext

    async def _call(self, kek_uri: str, epoch: int, op: Op | None, call: Awaitable[T]) -> T:
        """Await one KMS call and update the key's health from its outcome.

        ``op`` None: a success does not by itself mark the key available (a
        multi-step check marks it at the end).
        """
        try:
            result = await call
        except KeyUnavailableError as exc:
            self._denied(kek_uri, op, exc)
            raise
        except KmsUnreachableError as exc:
            self._set_health(kek_uri, "unreachable", f"unreachable: {exc}")
            raise
        if op is not None and self._epoch(kek_uri) == epoch:
            self._succeeded(kek_uri, op)
        return result

    # ---------------------------------------------------------- validation

    async def validate(self, kek_uri: str, expected_location: str | None) -> None:
        """Check a configured key: location match, then a wrap/unwrap round trip.

        Raises ``KeyConfigError`` naming the key URI, provider and the provider's
        message when the key is unusable (malformed, wrong location, denied, wrong
        round trip), and ``KmsUnreachableError`` (same naming) when the KMS could
        not be reached - a transient condition the caller may retry.
        """
        kek = self.kek(kek_uri)
        provider = kek.provider
        location = kek.location
        if (
            expected_location is not None
            and location is not None
            and location.casefold() != expected_location.casefold()
        ):
            raise KeyConfigError(
                f"key {kek_uri} ({provider}) is in location {location!r}, "
                f"but {expected_location!r} is expected",
                key_uri=kek_uri,
                provider=provider,
            )
        probe = os.urandom(DATA_KEY_BYTES)
        epoch = self._epoch(kek_uri)
        try:
            w = await self._call(kek_uri, epoch, None, kek.wrap(probe, kh.VALIDATION_CONTEXT))
            back = await self._call(
                kek_uri, epoch, None, kek.unwrap(w.wrapped, kh.VALIDATION_CONTEXT)
            )
        except KmsUnreachableError as exc:
            raise KmsUnreachableError(
                f"key {kek_uri} ({provider}) could not be validated: {exc}",
                key_uri=kek_uri,
                provider=provider,
            ) from exc
        except KmsError as exc:
            raise KeyConfigError(
                f"key {kek_uri} ({provider}) failed validation: {exc}",
                key_uri=kek_uri,
                provider=provider,
            ) from exc
        if not hmac.compare_digest(back, probe):
            raise KeyConfigError(
                f"key {kek_uri} ({provider}) failed validation: "
                "unwrap did not return what was wrapped",
                key_uri=kek_uri,
                provider=provider,
            )
        if self._epoch(kek_uri) == epoch:
            self._succeeded(kek_uri, "round_trip")

    # -------------------------------------------------------------- health

    def register(self, kek_uri: str) -> None:
        """Declare a configured key: it is probed and has a ``cmek_key_available`` gauge."""
        self._registered[kek_uri] = None
        health = self._health.get(kek_uri)
        if health is not None and health.state != "unknown":
            self._metrics.key_available.labels(kek_uri).set(
                1.0 if health.state == "available" else 0.0
            )

    def breaker_states(self) -> dict[str, str]:
        """Each resolved key's circuit breaker: closed, open or half_open."""
        return {uri: kek.breaker.state.value for uri, kek in self._keks.items()}

    def status(self) -> dict[str, KeyStatus]:
        """Availability of every configured key."""
        out: dict[str, KeyStatus] = {}
        for uri in self._registered:
            h = self._health.get(uri)
            if h is None:
                out[uri] = KeyStatus(False, "unknown", "not yet used or probed", 0.0)
            else:
                out[uri] = KeyStatus(h.state == "available", h.state, h.reason, h.since)
        return out

    async def probe_once(self) -> None:
        """Round-trip every configured key once (generate_data_key + unwrap)."""
        await asyncio.gather(*(self._probe(uri) for uri in list(self._registered)))

    async def run_prober(self, interval: float) -> None:
        """Probe every ``interval`` seconds until cancelled."""
        if not interval > 0:
            raise ValueError(f"probe interval must be > 0 seconds, got {interval}")
        while True:
            await self.probe_once()
            await asyncio.sleep(interval)

    async def _probe(self, kek_uri: str) -> None:
        try:
            kek = self.kek(kek_uri)
        except KeyConfigError as exc:
            self._set_health(kek_uri, "unreachable", f"error: {exc}")
            return
        epoch = self._epoch(kek_uri)
        try:
            async with asyncio.timeout(self._probe_timeout):
                dk = await self._call(kek_uri, epoch, None, kek.generate_data_key(kh.PROBE_CONTEXT))
                back = await self._call(
                    kek_uri, epoch, None, kek.unwrap(dk.wrapped, kh.PROBE_CONTEXT)
                )
        except (KeyUnavailableError, KmsUnreachableError):
            return  # ``_call`` has recorded it (and dropped material on denial)
        except KmsError as exc:
            self._set_health(kek_uri, "unreachable", f"error: {exc}")
            return
        except TimeoutError:
            self._set_health(
                kek_uri, "unreachable", f"unreachable: probe timed out after {self._probe_timeout}s"
            )
            return
        if not hmac.compare_digest(back, dk.plaintext):
            self._set_health(
                kek_uri, "unreachable", "error: probe unwrap did not return the generated key"
            )
            return
        if self._epoch(kek_uri) == epoch:
            self._succeeded(kek_uri, "round_trip")

    def drop_key(self, kek_uri: str, reason: str) -> None:
        """Drop all cached material of a key now (e.g. it was removed from the config)."""
        self._drop(kek_uri, "dropped")
        log.info("dropped cached material of key %s: %s", kek_uri, reason)

    def _drop(self, kek_uri: str, reason: str) -> int:
        self._epochs[kek_uri] = self._epoch(kek_uri) + 1
        return self._writes.drop_uri(kek_uri, reason) + self._reads.drop_uri(kek_uri, reason)

    def _denied(self, kek_uri: str, op: Op | None, exc: KeyUnavailableError) -> None:
        self._denial_kind[kek_uri] = exc.kind
        dropped = self._drop(kek_uri, "denied")
        for member in self.groups.siblings(kek_uri):  # fail closed: the whole group
            dropped += self._drop(member, "denied")
        reason = f"{exc.kind.value}: {exc}"
        if dropped:
            log.warning("key %s denied; dropped %d cached entries", kek_uri, dropped)
        self._set_health(kek_uri, "revoked", reason, denied_op=op)

    def _succeeded(self, kek_uri: str, op: Op) -> None:
        if op == "round_trip":  # a probe or validation that succeeded clears remembered denials
            self._denied_writes.drop_uri(kek_uri, "dropped")
            self._denied_reads.drop_uri(kek_uri, "dropped")
        h = self._health.get(kek_uri)
        if h is not None and h.state == "available":
            return
        if (
            h is not None
            and h.state == "revoked"
            and op != "round_trip"
            and h.denied_op is not None
            and h.denied_op != op
        ):
            # e.g. encrypt still allowed while decrypt is denied: not restored
            return
        self._set_health(kek_uri, "available", "ok")

    def mark_refused(self, kek_uri: str, reason: str) -> None:
        """A key that failed validation definitively but must not stop the start."""
        self._drop(kek_uri, "denied")
        self._set_health(kek_uri, "revoked", reason)

    def mark_pending(self, kek_uri: str, reason: str) -> None:
        """A key that could not be validated (KMS unreachable): not ready until it answers."""
        h = self._health.get(kek_uri)
        if h is None or h.state in ("unknown", "unreachable", "pending"):
            self._set_health(kek_uri, "pending", reason)

    def _set_health(
        self, kek_uri: str, state: KeyState, reason: str, *, denied_op: Op | None = None
    ) -> None:
        h = self._health.get(kek_uri)
        if h is not None and h.state == "pending" and state == "unreachable":
            # still never validated: stays pending (not ready), with the latest reason
            h.reason = f"not yet validated: {reason}"
            return
        if h is not None and h.state == state:
            # ``denied_op`` stays that of the call that revoked the key, so that a key
            # still allowing one side (say encrypt) does not flap revoked/restored
            h.reason = reason
            return
        previous = h.state if h is not None else "unknown"
        now = self._wall_clock()
        self._health[kek_uri] = Health(state, reason, now, denied_op)
        if kek_uri in self._registered:
            self._metrics.key_available.labels(kek_uri).set(1.0 if state == "available" else 0.0)
        kind: EventKind | None
        if state == "revoked":
            kind = "revoked"
            log.warning("key %s is unavailable: %s", kek_uri, reason)
        elif state in ("unreachable", "pending"):
            kind = "unreachable"
            log.warning("key %s is unreachable: %s", kek_uri, reason)
        elif state == "available" and previous in ("revoked", "unreachable", "pending"):
            kind = "restored"
            log.info("key %s is available again", kek_uri)
        else:
            kind = None
        if kind is not None and self._on_event is not None:
            self._on_event(KeyEvent(kind, kek_uri, reason, now))
