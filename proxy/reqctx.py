"""What one S3 request has cost so far, reachable from every layer through ``contextvars``.

The front end opens a ``RequestContext`` per request (``begin``); the backend client adds
its time (``add_backend``), the metered KMS wrapper its time (``add_kms``), and the access
log line reads the totals. Log records carry the request id through ``RequestIdFilter``.
Tasks started during a request copy the context, so work they do is counted too.

``count_retries`` lets ``MeteredKek`` learn how often a provider retried one call
(``note_retry`` in ``with_retries``) without the providers knowing about metrics.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class RequestContext:
    request_id: str
    backend_seconds: float = 0.0
    backend_calls: int = 0
    kms_seconds: float = 0.0
    kms_calls: int = 0
    access_key: str | None = None
    """The access key id whose signature verified."""
    auth_failed: bool = False
    """Authentication refused this request (the front end logs why)."""


@dataclass
class _Retries:
    count: int = 0


_CURRENT: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "cmek_request", default=None
)
_RETRIES: contextvars.ContextVar[_Retries | None] = contextvars.ContextVar(
    "cmek_kms_retries", default=None
)


def current() -> RequestContext | None:
    return _CURRENT.get()


@contextmanager
def begin(request_id: str) -> Iterator[RequestContext]:
    ctx = RequestContext(request_id)
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


def add_backend(seconds: float) -> None:
    ctx = _CURRENT.get()
    if ctx is not None:
        ctx.backend_seconds += seconds
        ctx.backend_calls += 1


def add_kms(seconds: float) -> None:
    ctx = _CURRENT.get()
    if ctx is not None:
        ctx.kms_seconds += seconds
        ctx.kms_calls += 1


def note_retry() -> None:
    box = _RETRIES.get()
    if box is not None:
        box.count += 1


@contextmanager
def count_retries() -> Iterator[_Retries]:
    box = _Retries()
    token = _RETRIES.set(box)
    try:
        yield box
    finally:
        _RETRIES.reset(token)


class RequestIdFilter(logging.Filter):
    """Puts ``request_id`` (or None) on every record: logged inside a request, it names it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            ctx = _CURRENT.get()
            record.request_id = ctx.request_id if ctx is not None else None
        return True
