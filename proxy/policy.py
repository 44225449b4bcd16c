"""Which key protects which object, and what passes through unencrypted.

A ``Policy`` answers one question for a (bucket, key): *encrypt under key URI X*,
*store as sent* (passthrough, and which rule said so), or *refuse*.  Rules:

1. ``unencrypted_paths`` globs (``bucket/cache/**``, ``*/tmp/*``): short-lived data is
   stored as sent, as the CMEK documents leave caches and short-TTL data unencrypted;
2. the longest ``bucket`` or ``bucket/prefix`` spec;
3. the default: a key, ``passthrough`` or ``refuse``.

It is pure: no I/O.  Specs from the admin API are merged in by ``with_specs``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from proxy.config import Encryption, EncryptionRule


@dataclass(frozen=True)
class Decision:
    """What to do with one object."""

    key_uri: str | None
    """The key-encryption key URI, or None for passthrough/refuse."""
    rule: str
    """Which rule decided (shown in metrics labels and debug headers): bounded strings."""
    refuse: bool = False
    location: str | None = None

    @property
    def encrypt(self) -> bool:
        return self.key_uri is not None


@lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    """``**`` crosses '/', ``*`` does not; a trailing '/' means the whole subtree."""
    if pattern.endswith("/"):
        pattern += "**"
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


class Policy:
    def __init__(
        self, enc: Encryption, extra_specs: Mapping[str, EncryptionRule] | None = None
    ) -> None:
        self._enc = enc
        specs = dict(enc.buckets)
        specs.update(extra_specs or {})
        # Longest path first, so bucket/prefix wins over bucket.
        self._specs = sorted(specs.items(), key=lambda kv: len(kv[0]), reverse=True)
        self._globs = [(g, _glob_regex(g)) for g in enc.unencrypted_paths]
        self.strict = enc.strict

    def with_specs(self, extra: Mapping[str, EncryptionRule]) -> Policy:
        return Policy(self._enc, extra)

    def specs(self) -> dict[str, EncryptionRule]:
        return dict(self._specs)

    def decide(self, bucket: str, key: str) -> Decision:
        path = f"{bucket}/{key}"
        for glob, rx in self._globs:
            if rx.match(path) or fnmatch.fnmatchcase(path, glob):
                return Decision(None, "unencrypted-path")
        for name, rule in self._specs:
            if path.startswith(name if "/" in name else name + "/"):
                return self._from_rule(rule, "bucket-spec")
        return self._default()

    def bucket_default(self, bucket: str) -> Decision:
        """The decision for a bucket as a whole (used for listings)."""
        for name, rule in self._specs:
            if name == bucket:
                return self._from_rule(rule, "bucket-spec")
        return self._default()

    def _default(self) -> Decision:
        d = self._enc.default
        if d == "refuse":
            return Decision(None, "default-refuse", refuse=True)
        if d == "passthrough":
            return Decision(None, "default-passthrough")
        assert isinstance(d, EncryptionRule)
        return self._from_rule(d, "default")

    @staticmethod
    def _from_rule(rule: EncryptionRule, name: str) -> Decision:
        if rule.passthrough:
            return Decision(None, f"{name}-passthrough")
        return Decision(rule.key, name, location=rule.location)

    def may_be_encrypted(self, bucket: str, key: str) -> bool:
        """Whether a listed object at this path is expected to be stored encrypted."""
        return self.decide(bucket, key).encrypt
