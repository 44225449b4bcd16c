"""``verify``: check that every object (or a sample) opens and authenticates.

Each encrypted object is read whole, as a stream, and decrypted: its data key unwrapped by
the KMS (cached per key and bucket), its object key opened, every segment authenticated.
Outcomes: ``ok``, ``plaintext-legacy`` (stored as sent on a path the policy encrypts - written
before encryption was turned on), ``plaintext-allowed`` (stored as sent where the policy
allows it), ``error:<Kind>``. Counts per key URI and key version (and per error there) are in
``by_key``. Nothing is written. ``--dry-run`` reads no object body: it counts the objects (and their
stored bytes) a run would check, outcome ``would-verify``.
"""

from __future__ import annotations

from proxy.control.jobs.common import (
    JobContext,
    JobOptions,
    JobProgress,
    Listed,
    decrypt_stream,
    get_ok,
    object_key_of,
    run_job,
)
from proxy.errors import CmekError


async def verify(
    ctx: JobContext, opts: JobOptions, progress: JobProgress | None = None
) -> JobProgress:
    async def step(obj: Listed, prog: JobProgress) -> None:
        if opts.dry_run:  # count what a run would check; read no object body
            prog.planned_bytes += obj.size
            prog.outcome("would-verify")
            return
        resp = await get_ok(ctx.backend, opts.bucket, obj.key)
        try:
            env = await ctx.envelopes.read(opts.bucket, obj.key, resp.headers)
            if env is None:
                legacy = (
                    ctx.policy().decide(opts.bucket, obj.key, resp.headers).encrypt
                )  # an encrypted path: legacy, older or not
                prog.by_key["(plaintext)"] += 1
                prog.outcome("plaintext-legacy" if legacy else "plaintext-allowed")
                return
            label = f"{env.kek_uri}#{env.kek_version}" if env.kek_version else env.kek_uri
            try:
                object_key = await object_key_of(ctx, opts.bucket, obj.key, env)
                async for chunk in decrypt_stream(resp, object_key, env):
                    prog.bytes += len(chunk)
            except CmekError as exc:
                prog.by_key[f"{label} error:{type(exc).__name__}"] += 1
                raise
            prog.by_key[label] += 1
            prog.outcome("ok")
        finally:
            resp.release()

    return await run_job("verify", ctx, opts, step, progress)
