"""Which key protects which object, and what passes through unencrypted.

A ``Policy`` answers one question for a (bucket, key): *encrypt under key URI X*,
*store as sent* (passthrough, and which rule said so), or *refuse*.  Rules:

1. ``unencrypted_paths`` globs (``bucket/cache/**``, ``*/tmp/*``): short-lived data is
   stored as sent, as the CMEK documents leave caches and short-TTL data unencrypted;
2. ``unencrypted_ttl``: a PUT whose TTL header (a configured header holding seconds, or
   ``Expires``) is under the threshold is stored as sent (rule ``unencrypted-ttl``);
3. the longest ``bucket`` or ``bucket/prefix`` spec;
4. the default: a key, ``passthrough`` or ``refuse``.

It is pure: no I/O (the clock for ``Expires`` is a parameter).  Specs from the admin API
are merged in by ``with_specs``; the data path swaps the whole ``Policy`` object.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
import time
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from functools import lru_cache

from proxy.config import Encryption, EncryptionRule, UnencryptedTtl, glob_regex
from proxy.errors import S3Error
from proxy.layer.decision import Decision

__all__ = ["RULE_PATH", "RULE_TTL", "Decision", "Policy", "ttl_seconds"]

RULE_TTL = "unencrypted-ttl"
RULE_PATH = "unencrypted-path"


@lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    """``**`` crosses '/', ``*`` does not; a trailing '/' means the whole subtree."""
    if pattern.endswith("/"):
        pattern += "**"
    return glob_regex(pattern, "/")


def ttl_seconds(
    rule: UnencryptedTtl, headers: Mapping[str, str], now: Callable[[], float] = time.time
) -> float | None:
    """The TTL an object's headers declare under ``rule`` (the smallest), or None."""
    lower = {k.lower(): v for k, v in headers.items()}
    found: list[float] = []
    if rule.header is not None and rule.header in lower:
        with contextlib.suppress(ValueError):
            found.append(float(lower[rule.header].strip()))
    if rule.use_expires and "expires" in lower:
        with contextlib.suppress(TypeError, ValueError, IndexError):
            found.append(parsedate_to_datetime(lower["expires"]).timestamp() - now())
    return min(found) if found else None


class Policy:
    def __init__(
        self,
        enc: Encryption,
        extra_specs: Mapping[str, EncryptionRule] | None = None,
        *,
        clock: Callable[[], float] = time.time,
        refused: Mapping[str, str] | None = None,
        activations: Mapping[tuple[str, str], float] | None = None,
    ) -> None:
        self._enc = enc
        self._clock = clock
        # API specs read from the store that the key policy (kms.allowed_keys,
        # encryption.require_cmek) refuses: writes under them are refused, never
        # sent elsewhere (name -> reason)
        self._refused = dict(refused or {})
        # (bucket, spec name or "default") -> epoch seconds the config rule first took effect
        # there (``proxy.control.activation``); a rule's own ``encrypted_since`` wins.
        self._activations = dict(activations or {})
        specs = dict(enc.buckets)
        specs.update(extra_specs or {})
        # Longest path first, so bucket/prefix wins over bucket.
        self._specs = sorted(specs.items(), key=lambda kv: len(kv[0]), reverse=True)
        self._globs = [(g, _glob_regex(g)) for g in enc.unencrypted_paths]
        self.strict = enc.strict

    @property
    def encryption(self) -> Encryption:
        return self._enc

    def with_specs(
        self, extra: Mapping[str, EncryptionRule], refused: Mapping[str, str] | None = None
    ) -> Policy:
        return Policy(
            self._enc, extra, clock=self._clock, refused=refused, activations=self._activations
        )

    def refused(self) -> dict[str, str]:
        """API specs the key policy refuses (name -> reason)."""
        return dict(self._refused)

    def specs(self) -> dict[str, EncryptionRule]:
        return dict(self._specs)

    def decide(self, bucket: str, key: str, headers: Mapping[str, str] | None = None) -> Decision:
        """The decision for one object; ``headers`` (a PUT's request headers, or a stored
        object's response headers) let the ``unencrypted_ttl`` rule apply."""
        path = f"{bucket}/{key}"
        for glob, rx in self._globs:
            if rx.match(path) or fnmatch.fnmatchcase(path, glob):
                return Decision(None, RULE_PATH)
        ttl_rule = self._enc.unencrypted_ttl
        if ttl_rule is not None and headers:
            ttl = ttl_seconds(ttl_rule, headers, self._clock)
            if ttl is not None and ttl < ttl_rule.max_seconds:
                return Decision(None, RULE_TTL)
        for name, rule in self._specs:
            if path.startswith(name if "/" in name else name + "/"):
                refusal = self._refused.get(name)
                if refusal is not None:
                    raise S3Error(
                        "AccessDenied",
                        f"the encryption spec {name} is refused by the key policy: {refusal}",
                        403,
                    )
                return self._from_rule(rule, "bucket-spec", self._activations.get((bucket, name)))
        return self._default(bucket)

    def bucket_decision(self, bucket: str) -> Decision | None:
        if self._globs or "/" in bucket:
            return None
        applying = [(n, r) for n, r in self._specs if n == bucket or n.startswith(bucket + "/")]
        if not applying:
            return self._default(bucket)
        name, rule = applying[0]
        if len(applying) > 1 or name != bucket or name in self._refused:
            return None
        return self._from_rule(rule, "bucket-spec", self._activations.get((bucket, name)))

    def _refused_spec(self, bucket: str, key: str) -> bool:
        path = f"{bucket}/{key}"
        for name, _ in self._specs:
            if path.startswith(name if "/" in name else name + "/"):
                return name in self._refused
        return False

    def _default(self, bucket: str) -> Decision:
        d = self._enc.default
        if d == "refuse":
            return Decision(None, "default-refuse", refuse=True)
        if d == "passthrough":
            return Decision(None, "default-passthrough")
        assert isinstance(d, EncryptionRule)
        return self._from_rule(d, "default", self._activations.get((bucket, "default")))

    @staticmethod
    def _from_rule(rule: EncryptionRule, name: str, activated: float | None = None) -> Decision:
        if rule.passthrough:
            return Decision(None, f"{name}-passthrough")
        since = rule.encrypted_since.timestamp() if rule.encrypted_since else activated
        return Decision(rule.key, name, location=rule.location, encrypted_since=since)

    def may_be_encrypted(
        self,
        bucket: str,
        key: str,
        last_modified: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> bool:
        """Whether an object at this path is expected to be stored encrypted.

        ``last_modified`` (epoch seconds, from a listing or HEAD): an object older than the
        moment encryption was turned on for its path is legacy plaintext. ``headers`` (a
        stored object's response headers): an object the TTL rule let through is not.
        """
        if self._refused and self._refused_spec(bucket, key):
            return True  # written under the refused spec's key, if at all
        d = self.decide(bucket, key, headers)
        if not d.encrypt:
            return False
        if last_modified is not None and d.encrypted_since is not None:
            return last_modified >= d.encrypted_since
        return True
