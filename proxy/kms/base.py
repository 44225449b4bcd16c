"""The key-management interface every provider implements.

Modelled on Tink's ``KmsClient``: a *client* says which key URIs it supports
(``does_support``) and hands out a *key-encryption key* object for one URI
(``get_kek``).  The SDK client is passed in by the caller, so tests can pass
another one.  Providers raise only the ``KmsError`` subclasses of
``proxy.errors``:

* ``KeyUnavailableError`` when the KMS *denies* (disabled, destroyed, permission
  removed) - never retried;
* ``KmsUnreachableError`` for timeouts, throttling, 5xx, refused connections -
  retried here with jittered backoff, then raised;
* ``KeyConfigError`` for a URI that is malformed or names no key.

Providers know nothing of metrics, caches or S3; those wrap this interface.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from proxy.crypto.envelope import WrappedReplica
from proxy.errors import KmsUnreachableError
from proxy.reqctx import note_retry

DATA_KEY_BYTES = 32

Context = Mapping[str, str]
"""Binding context sent with every call (e.g. ``{"bucket": "b"}``).

Providers bind it in their native way: AWS encryption context, GCP / Vault
associated data, Azure (which has none) by prefixing the wrapped plaintext.
Unwrap must be given the same context as wrap.
"""


@dataclass(frozen=True, repr=False)
class DataKey:
    """A fresh data key: its plaintext (never logged) and its wrapped form."""

    plaintext: bytes
    wrapped: bytes
    key_version: str
    kek_uri: str = ""
    """The key URI ``wrapped`` is wrapped under, when not the one asked for (a replica
    that answered while the first was unreachable); empty: the one asked for."""
    replicas: tuple[WrappedReplica, ...] = ()
    """The same data key wrapped under the key's other replicas."""

    def __repr__(self) -> str:  # never show key material
        return (
            f"DataKey(wrapped={len(self.wrapped)}B, key_version={self.key_version!r}, "
            f"replicas={len(self.replicas)})"
        )


@dataclass(frozen=True)
class WrappedKey:
    wrapped: bytes
    key_version: str


class Kek(Protocol):
    """One key-encryption key in the customer's KMS, named by a key URI."""

    @property
    def uri(self) -> str: ...

    @property
    def provider(self) -> str:
        """Short provider name used in metrics labels: local, aws-kms, gcp-kms, ..."""
        ...

    @property
    def location(self) -> str | None:
        """Region/location the key lives in, when its URI names one."""
        ...

    async def generate_data_key(self, context: Context) -> DataKey: ...

    async def wrap(self, plaintext: bytes, context: Context) -> WrappedKey: ...

    async def unwrap(self, wrapped: bytes, context: Context) -> bytes: ...


class KmsClient(Protocol):
    """A provider: supports a URI prefix and makes ``Kek`` objects."""

    prefix: str

    def does_support(self, key_uri: str) -> bool: ...

    def get_kek(self, key_uri: str) -> Kek: ...

    async def close(self) -> None: ...


async def generate_by_wrapping(kek: Kek, context: Context) -> DataKey:
    """``generate_data_key`` for KMSes without a native call: random key, then wrap."""
    import os

    plaintext = os.urandom(DATA_KEY_BYTES)
    w = await kek.wrap(plaintext, context)
    return DataKey(plaintext=plaintext, wrapped=w.wrapped, key_version=w.key_version)


@dataclass(frozen=True)
class RetryPolicy:
    """Timeouts and jittered exponential backoff for transient KMS failures."""

    attempts: int = 4
    base_delay: float = 0.05
    max_delay: float = 2.0
    timeout: float = 5.0
    rng: Callable[[], float] = field(default=random.random, compare=False)

    def delay(self, attempt: int) -> float:
        """Full-jitter backoff for the given 0-based retry attempt."""
        cap = min(self.max_delay, self.base_delay * (2**attempt))
        return float(cap * self.rng())


T = TypeVar("T")


async def with_retries(
    policy: RetryPolicy, call: Callable[[], Awaitable[T]], *, what: str = "kms call"
) -> T:
    """Run ``call`` with a per-attempt timeout, retrying only ``KmsUnreachableError``.

    Denials (``KeyUnavailableError``) and config errors propagate at once.
    """
    last: KmsUnreachableError | None = None
    for attempt in range(policy.attempts):
        try:
            async with asyncio.timeout(policy.timeout):
                return await call()
        except TimeoutError:
            last = KmsUnreachableError(f"{what}: timed out after {policy.timeout}s")
        except KmsUnreachableError as exc:
            last = exc
        if attempt + 1 < policy.attempts:
            note_retry()  # counted by MeteredKek as cmek_kms_retries_total
            await asyncio.sleep(policy.delay(attempt))
    assert last is not None
    raise last
