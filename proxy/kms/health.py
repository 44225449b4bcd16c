"""Key availability: the states a configured key is in and the events between them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

MAX_TTL: Final = 3600.0
"""Hard cap on how long key material may stay cached (seconds)."""

MAX_NEGATIVE_TTL: Final = 60.0
"""Hard cap on how long a denial is remembered (seconds)."""

VALIDATION_CONTEXT: Final = {"bucket": "cmek-proxy-validation"}
PROBE_CONTEXT: Final = {"bucket": "cmek-proxy-probe"}

EventKind = Literal["revoked", "restored", "unreachable"]
KeyState = Literal["unknown", "pending", "available", "revoked", "unreachable"]
"""``pending``: not yet validated - the KMS could not be reached at start (or the key was
never answered for); not ready until a probe or request succeeds."""
# which side of a key a call used: a key may allow encrypt but deny decrypt
Op = Literal["encrypt", "decrypt", "round_trip"]


@dataclass(frozen=True)
class KeyEvent:
    """A change of a key's availability."""

    kind: EventKind
    kek_uri: str
    reason: str
    at: float  # wall-clock seconds since the epoch


@dataclass(frozen=True)
class KeyStatus:
    """Availability of one configured key, as of its last call or probe."""

    available: bool
    state: KeyState
    reason: str
    since: float  # wall-clock seconds since the epoch at which ``state`` began


@dataclass
class Health:
    state: KeyState
    reason: str
    since: float
    denied_op: Op | None = None
