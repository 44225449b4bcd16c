"""``MeteredKek``: duration and count of every KMS call, by outcome.

This wrapper is the only place KMS metrics are recorded; providers never import
``proxy.metrics``.  The outcome comes from the exception type:

* ``ok`` - the call returned;
* ``denied`` - ``KeyUnavailableError`` (the KMS refused);
* ``unreachable`` - ``KmsUnreachableError`` (timeout, 5xx, throttling, refused);
* ``error`` - any other ``KmsError`` or unexpected exception.

A call cancelled by its caller is not recorded: the KMS gave no answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from proxy import reqctx
from proxy.errors import KeyUnavailableError, KmsUnreachableError
from proxy.kms.base import Context, DataKey, Kek, WrappedKey
from proxy.metrics import Metrics

T = TypeVar("T")


class MeteredKek:
    """A ``Kek`` that records ``cmek_kms_request_duration_seconds`` and
    ``cmek_kms_requests_total`` for each call to the wrapped ``Kek``."""

    def __init__(
        self,
        inner: Kek,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._inner = inner
        self._metrics = metrics
        self._clock = clock

    @property
    def uri(self) -> str:
        return self._inner.uri

    @property
    def provider(self) -> str:
        return self._inner.provider

    @property
    def location(self) -> str | None:
        return self._inner.location

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        with reqctx.count_retries() as retries:
            try:
                return await self._timed_once(operation, call)
            finally:
                if retries.count:
                    self._metrics.kms_retries.labels(self._inner.provider, operation).inc(
                        retries.count
                    )

    async def _timed_once(self, operation: str, call: Awaitable[T]) -> T:
        start = self._clock()
        outcome: str | None = "error"  # any KmsError other than the two below, or a bug
        try:
            result = await call
        except KeyUnavailableError:
            outcome = "denied"
            raise
        except KmsUnreachableError:
            outcome = "unreachable"
            raise
        except asyncio.CancelledError:
            outcome = None
            raise
        else:
            outcome = "ok"
            return result
        finally:
            took = self._clock() - start
            reqctx.add_kms(took)
            if outcome is not None:
                self._metrics.observe_kms(self._inner.provider, operation, outcome, took)

    async def generate_data_key(self, context: Context) -> DataKey:
        return await self._timed("generate_data_key", self._inner.generate_data_key(context))

    async def wrap(self, plaintext: bytes, context: Context) -> WrappedKey:
        return await self._timed("wrap", self._inner.wrap(plaintext, context))

    async def unwrap(self, wrapped: bytes, context: Context) -> bytes:
        return await self._timed("unwrap", self._inner.unwrap(wrapped, context))

    def __repr__(self) -> str:
        return f"MeteredKek({self._inner.provider}, {self._inner.uri!r})"
