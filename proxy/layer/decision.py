"""What the encryption layer asks of the control plane's policy, and the answer it gets.

The layer depends on this small interface only; ``proxy.control.policy.Policy`` implements it
(specs from config and the admin API, unencrypted paths, the TTL rule, strict mode).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Decision:
    """What to do with one object."""

    key_uri: str | None
    """The key-encryption key URI, or None for passthrough/refuse."""
    rule: str
    """Which rule decided (shown in metrics labels and debug headers): bounded strings."""
    refuse: bool = False
    location: str | None = None
    encrypted_since: float | None = None
    """Epoch seconds since when this path is encrypted (None: always); see ``may_be_encrypted``."""

    @property
    def encrypt(self) -> bool:
        return self.key_uri is not None


class KeyPolicy(Protocol):
    """Which key protects an object, and whether a stored object is expected encrypted."""

    @property
    def strict(self) -> bool:
        """Refuse plaintext reads on paths that require encryption."""
        ...

    def decide(self, bucket: str, key: str, headers: Mapping[str, str] | None = None) -> Decision:
        """The decision for one object (``headers``: a PUT's or a stored object's)."""
        ...

    def may_be_encrypted(
        self,
        bucket: str,
        key: str,
        last_modified: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> bool:
        """Whether an object at this path is expected to be stored encrypted."""
        ...

    def bucket_decision(self, bucket: str) -> Decision | None:
        """The decision ``decide`` gives every key of ``bucket`` without headers, when all
        keys there get the same one (no prefix spec, unencrypted path or refused spec can
        apply); None otherwise. Listings use it to ask once per page, not once per key."""
        ...
