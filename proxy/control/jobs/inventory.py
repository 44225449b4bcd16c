"""``inventory``: which keys protect what - before disabling or destroying a key.

For every object of the bucket (under the prefix) the job reads the *envelope only*: a
backend HEAD (object metadata) or, with ``backend.envelope_store: sidecar``, the small
sidecar object - never an object body and never a KMS call.  It counts objects and stored
bytes per key URI, per key version and per provider, and the plaintext objects: legacy
(on a path the policy encrypts, i.e. written before encryption was turned on) and allowed
(passthrough / unencrypted paths).  Each wrapped form counts under its key URI: an object
with replicas counts under each; ``sole`` counts the objects whose only form is under that
key - "what would destroying key K shred?" is ``keys[K]["sole"]``.

The report (``JobProgress.to_json()["inventory"]``)::

    {"keys": {"<uri>": {"provider": "aws-kms", "objects": 3, "bytes": 1234,
                        "sole": {"objects": 3, "bytes": 1234},
                        "versions": {"<version>": {"objects": 3, "bytes": 1234}}}},
     "plaintext_legacy": {"objects": 1, "bytes": 10},
     "plaintext_allowed": {"objects": 0, "bytes": 0}}

Memory is bounded by the number of distinct key URIs and versions, not by objects.
"""

from __future__ import annotations

from typing import Any

from proxy.control.jobs.common import JobContext, JobOptions, JobProgress, Listed, run_job

MAX_KEYS = 10_000
"""Distinct (key URI, version) pairs counted; beyond it versions fold into ``(other)``."""


def _add(slot: dict[str, Any], size: int) -> None:
    slot["objects"] += 1
    slot["bytes"] += size


def _empty() -> dict[str, Any]:
    return {"objects": 0, "bytes": 0}


def new_report() -> dict[str, Any]:
    return {"keys": {}, "plaintext_legacy": _empty(), "plaintext_allowed": _empty()}


def provider_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "unknown"


async def inventory(
    ctx: JobContext, opts: JobOptions, progress: JobProgress | None = None
) -> JobProgress:
    prog = progress or JobProgress("inventory", opts)
    report = new_report()
    prog.extra["inventory"] = report
    pairs = 0

    async def step(obj: Listed, p: JobProgress) -> None:
        nonlocal pairs
        resp, _ = await ctx.backend.call("HEAD", opts.bucket, obj.key, ok=(200,))
        env = await ctx.envelopes.read(opts.bucket, obj.key, resp.headers)
        p.bytes += obj.size
        if env is None:
            legacy = (
                ctx.policy().decide(opts.bucket, obj.key, resp.headers).encrypt
            )  # an encrypted path: legacy, older or not
            _add(report["plaintext_legacy" if legacy else "plaintext_allowed"], obj.size)
            p.by_key["(plaintext)"] += 1
            p.outcome("plaintext-legacy" if legacy else "plaintext-allowed")
            return
        keys: dict[str, Any] = report["keys"]
        forms = [(env.kek_uri, env.kek_version)] + [
            (r.kek_uri, r.kek_version) for r in env.replicas
        ]
        for uri, kek_version in forms:
            entry = keys.get(uri)
            if entry is None:
                entry = {
                    "provider": provider_of(uri),
                    "versions": {},
                    "sole": _empty(),
                    **_empty(),
                }
                keys[uri] = entry
            _add(entry, obj.size)
            if len(forms) == 1:
                _add(entry["sole"], obj.size)
            versions: dict[str, Any] = entry["versions"]
            version = kek_version or "(none)"
            if version not in versions:
                if pairs >= MAX_KEYS:
                    version = "(other)"
                else:
                    pairs += 1
                versions.setdefault(version, _empty())
            _add(versions[version], obj.size)
        p.by_key[f"{env.kek_uri}#{env.kek_version}" if env.kek_version else env.kek_uri] += 1
        p.outcome("encrypted")

    return await run_job("inventory", ctx, opts, step, prog)
