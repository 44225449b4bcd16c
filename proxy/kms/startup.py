"""Key validation at start that does not let a KMS outage stop the proxy.

Every key is checked concurrently (``KeyService.validate``: location, then a wrap/unwrap
round trip).  The outcome decides what happens:

* **definitive** - malformed URI, no provider, wrong location, unknown key, denied,
  wrong round trip (``KeyConfigError``): for a key of the configuration file the start
  stops with that error (the administrator fixes the file); for a key named by an API
  spec the key is marked revoked and the proxy starts (the admin API that could fix the
  spec runs in this very process);
* **transient** - timeouts, 5xx, throttling, refused connections (``KmsUnreachableError``)
  or no answer within ``deadline``: the key is marked ``pending`` (``/readyz`` 503 naming
  it and the reason), the proxy starts and serves what does not need that key, and the
  prober's first successful round trip makes it ready by itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.errors import KeyConfigError, KmsUnreachableError
from proxy.kms.keys import KeyService

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartKey:
    uri: str
    location: str | None
    fatal: bool
    """A definitive error stops the start (configuration-file keys)."""


async def validate_at_start(keys: KeyService, targets: Sequence[StartKey], deadline: float) -> None:
    """Validate every key; raise the first definitive error of a ``fatal`` key."""
    results = await asyncio.gather(*(_one(keys, t, deadline) for t in targets))
    for err in results:
        if err is not None:
            raise err


async def _one(keys: KeyService, t: StartKey, deadline: float) -> KeyConfigError | None:
    try:
        async with asyncio.timeout(deadline):
            await keys.validate(t.uri, t.location)
    except KmsUnreachableError as exc:
        keys.mark_pending(t.uri, f"unreachable at start: {exc}")
        log.warning("key %s could not be validated at start, starting anyway: %s", t.uri, exc)
        return None
    except TimeoutError:
        reason = f"unreachable at start: no answer within {deadline}s"
        keys.mark_pending(t.uri, reason)
        log.warning("key %s could not be validated at start, starting anyway: %s", t.uri, reason)
        return None
    except KeyConfigError as exc:
        if t.fatal:
            return exc
        keys.mark_refused(t.uri, f"failed validation at start: {exc}")
        log.error("key %s named by an API spec failed validation at start: %s", t.uri, exc)
        return None
    log.info("key validated: %s", t.uri)
    return None
