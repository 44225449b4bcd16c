"""A circuit breaker for KMS calls, so a dead KMS is not hammered.

States::

    closed --(failure_threshold consecutive KmsUnreachableError)--> open
    open   --(reset_timeout elapsed, next call is the trial)-------> half_open
    half_open --(trial answered)--> closed
    half_open --(trial unreachable)--> open (timer restarts)

While open (and while a half-open trial is in flight) calls fail fast with
``KmsUnreachableError("circuit open ...")`` without touching the KMS.

Only ``KmsUnreachableError`` counts as a failure.  Any other ``KmsError`` - a denial
above all - means the KMS *answered*, so it counts as a success of the KMS.  Other
exceptions (cancellation, bugs) are neutral: they neither count nor close.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import TypeVar

from proxy.errors import KmsError, KmsUnreachableError
from proxy.kms.base import Context, DataKey, Kek, WrappedKey

T = TypeVar("T")


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Consecutive-failure circuit breaker with one half-open trial call."""

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if reset_timeout <= 0:
            raise ValueError("reset_timeout must be > 0")
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def _admit(self) -> bool:
        """Decide whether a call may go to the KMS; returns True if it is the trial.

        Raises ``KmsUnreachableError`` when the call must fail fast.
        """
        if self._state is BreakerState.CLOSED:
            return False
        if self._state is BreakerState.OPEN:
            waited = self._clock() - self._opened_at
            if waited < self.reset_timeout:
                raise KmsUnreachableError(
                    f"circuit open after {self._failures} consecutive unreachable calls; "
                    f"next trial in {self.reset_timeout - waited:.1f}s"
                )
            self._state = BreakerState.HALF_OPEN
        if self._trial_in_flight:
            raise KmsUnreachableError("circuit open: a trial call is in flight")
        self._trial_in_flight = True
        return True

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()

    def _on_answer(self) -> None:
        self._failures = 0
        self._state = BreakerState.CLOSED

    def _on_failure(self, trial: bool) -> None:
        if trial:
            self._failures += 1
            self._open()
        elif self._state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._open()
        # a late failure of a call started before the circuit opened changes nothing

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` through the breaker."""
        trial = self._admit()
        try:
            result = await fn()
        except KmsUnreachableError:
            self._on_failure(trial)
            raise
        except KmsError:
            self._on_answer()  # the KMS answered (denied, bad request): it is alive
            raise
        else:
            self._on_answer()
            return result
        finally:
            # cancellation and bugs are neutral: only the trial slot is freed, so the
            # next call becomes the trial
            if trial:
                self._trial_in_flight = False

    def __repr__(self) -> str:
        return f"CircuitBreaker(state={self._state.value}, failures={self._failures})"


class BreakerKek:
    """A ``Kek`` whose calls go through a ``CircuitBreaker``.

    Fail-fast errors carry the key URI and provider of the wrapped ``Kek``.
    """

    def __init__(self, inner: Kek, breaker: CircuitBreaker | None = None) -> None:
        self._inner = inner
        self.breaker = breaker if breaker is not None else CircuitBreaker()

    @property
    def uri(self) -> str:
        return self._inner.uri

    @property
    def provider(self) -> str:
        return self._inner.provider

    @property
    def location(self) -> str | None:
        return self._inner.location

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await self.breaker.call(fn)
        except KmsUnreachableError as exc:
            if not exc.key_uri:
                exc.key_uri = self._inner.uri
            if not exc.provider:
                exc.provider = self._inner.provider
            raise

    async def generate_data_key(self, context: Context) -> DataKey:
        return await self._call(lambda: self._inner.generate_data_key(context))

    async def wrap(self, plaintext: bytes, context: Context) -> WrappedKey:
        return await self._call(lambda: self._inner.wrap(plaintext, context))

    async def unwrap(self, wrapped: bytes, context: Context) -> bytes:
        return await self._call(lambda: self._inner.unwrap(wrapped, context))

    def __repr__(self) -> str:
        return f"BreakerKek({self._inner.provider}, {self._inner.uri!r}, {self.breaker!r})"
