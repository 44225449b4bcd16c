"""The key service's caches: a bounded TTL map and single-flight calls (no KMS, no keys logged)."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from prometheus_client import Counter

from proxy.errors import DenialKind, KeyUnavailableError
from proxy.metrics import EVICTION_REASONS

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """A bounded map with a fixed time-to-live, keyed by ``(kek_uri, K)``.

    Entries are kept in insertion order, which - the TTL being fixed and the clock
    monotonic - is also expiry order: expired entries are swept from the front on
    insert, and when full the entry closest to expiry is evicted.  An index by
    ``kek_uri`` lets a denial drop all of one key's material without a scan.
    """

    def __init__(
        self,
        kind: str,
        *,
        ttl: float,
        max_entries: int,
        clock: Callable[[], float],
        evictions: Counter,
    ) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, K], tuple[float, V]] = OrderedDict()
        self._by_uri: dict[str, set[tuple[str, K]]] = {}
        self._evicted = {r: evictions.labels(kind, r) for r in EVICTION_REASONS}

    def __len__(self) -> int:
        return len(self._entries)

    def count_for(self, kek_uri: str) -> int:
        return len(self._by_uri.get(kek_uri, ()))

    def get(self, key: tuple[str, K]) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            self._remove(key)
            self._evicted["expired"].inc()
            return None
        return entry[1]

    def put(self, key: tuple[str, K], value: V) -> None:
        now = self._clock()
        self._sweep(now)
        if key in self._entries:
            self._remove(key)
        while len(self._entries) >= self._max:
            self._remove(next(iter(self._entries)))
            self._evicted["capacity"].inc()
        self._entries[key] = (now + self._ttl, value)
        self._by_uri.setdefault(key[0], set()).add(key)

    def drop_uri(self, kek_uri: str, reason: str) -> int:
        keys = self._by_uri.pop(kek_uri, set())
        for key in keys:
            del self._entries[key]
        if keys:
            self._evicted[reason].inc(len(keys))
        return len(keys)

    def _sweep(self, now: float) -> None:
        while self._entries:
            key, (expires, _) = next(iter(self._entries.items()))
            if expires > now:
                return
            self._remove(key)
            self._evicted["expired"].inc()

    def _remove(self, key: tuple[str, K]) -> None:
        del self._entries[key]
        owned = self._by_uri[key[0]]
        owned.discard(key)
        if not owned:
            del self._by_uri[key[0]]


@dataclass(frozen=True)
class Denial:
    """A remembered denial: enough to raise the same error again (no key material)."""

    message: str
    kind: DenialKind
    provider: str

    @classmethod
    def of(cls, exc: KeyUnavailableError) -> Denial:
        return cls(str(exc), exc.kind, exc.provider)

    def error(self, kek_uri: str) -> KeyUnavailableError:
        return KeyUnavailableError(
            f"{self.message} (denied within the last denial-cache period; not asked again)",
            kind=self.kind,
            key_uri=kek_uri,
            provider=self.provider,
        )


async def single_flight(
    flights: dict[K, asyncio.Task[V]],
    key: K,
    fetch: Callable[[], Coroutine[Any, Any, V]],
) -> V:
    """Join the in-flight call for ``key`` or start it; every waiter gets its outcome.

    The call runs as its own task, so a waiter that is cancelled does not cancel
    it for the others.
    """
    task = flights.get(key)
    if task is None:
        task = asyncio.create_task(_flight(flights, key, fetch))
        flights[key] = task
        task.add_done_callback(lambda t: _forget(flights, key, t))
    return await asyncio.shield(task)


async def _flight(
    flights: dict[K, asyncio.Task[V]], key: K, fetch: Callable[[], Coroutine[Any, Any, V]]
) -> V:
    try:
        return await fetch()
    finally:
        # leave at completion, in the same step that filled the cache
        flights.pop(key, None)


def _forget(flights: dict[K, asyncio.Task[V]], key: K, task: asyncio.Task[V]) -> None:
    # a task cancelled before it started never ran ``_flight``'s finally
    if flights.get(key) is task:
        del flights[key]
