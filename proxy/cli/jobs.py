"""``cmek-proxy job rewrap|encrypt-existing|verify``: run a key lifecycle job from the config.

Ctrl-C (or SIGTERM) stops the job: the partial summary is printed, the audit log records
``job.interrupted``, and the exit status is 130. Running the same command again resumes
(objects already done are skipped). ``--json`` prints the summary as JSON and nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from proxy.cli import (
    EXIT_INTERRUPTED,
    Failed,
    backend_problem,
    fraction,
    nonempty,
    positive_int,
    run_async,
)

JOB_HELP: Final = {
    "rewrap": "move objects to another key (only the sealed keys change)",
    "encrypt-existing": "encrypt in place the plaintext objects of encrypted paths",
    "verify": "check that every object opens and authenticates",
    "inventory": "objects and bytes per key URI and version, from envelopes only",
    "gc": "remove orphaned envelopes, upload state and job leftovers",
}
ONLY_FOR: Final = {"--to": "rewrap", "--sample": "verify", "--limit": "gc", "--min-age": "gc"}
"""Flags that apply to one job only; any other job refuses them."""
RESUME: Final = {
    "rewrap": "objects already under the target key are skipped",
    "encrypt-existing": "objects already encrypted are skipped",
    "verify": "verify checks every object again; narrow it with --prefix",
    "inventory": "inventory lists the bucket again from the start",
    "gc": "what is gone stays gone; gc goes on with what remains",
}


class UsageError(Exception):
    """A flag that does not apply to the chosen job."""


def add_parser(sub: Any) -> None:
    j = sub.add_parser(
        "job",
        help="run a key lifecycle job from the configuration",
        description="Run a key lifecycle job against the backend named in the configuration "
        "(no proxy needed). Ctrl-C prints the partial summary; run the same command again "
        "to resume.",
    )
    jsub = j.add_subparsers(dest="job", required=True, metavar="JOB")
    for name, helptext in JOB_HELP.items():
        jp = jsub.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:])
        jp.add_argument("--config", required=True, help="YAML configuration file")
        add_job_flags(jp, name)
        jp.add_argument("--no-progress", action="store_true", help="no progress bar")
        jp.add_argument(
            "--json", action="store_true", help="print the summary as JSON only (no bar, no text)"
        )
        jp.set_defaults(func=run_job_command)


def add_job_flags(p: argparse.ArgumentParser, job: str | None) -> None:
    """The flags of a job; ``job`` None: all of them (checked later by ``check_job_flags``)."""
    p.add_argument("--bucket", required=True, type=nonempty, help="bucket to run the job on")
    p.add_argument("--prefix", default="", help="only keys under this prefix")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="count what the job would do; change nothing, read no object body",
    )
    p.add_argument(
        "--concurrency", type=positive_int, default=8, help="objects in flight (default 8)"
    )
    flags = {
        "--sample": {"type": fraction, "help": "verify: fraction (0-1] of objects to check"},
        "--to": {"help": "rewrap: target key URI (default: the spec's key)"},
        "--limit": {"type": positive_int, "help": "gc: reserved objects examined at most"},
        "--min-age": {
            "type": float,
            "help": "gc: seconds state must be old to go (default gc.min_age)",
        },
    }
    for flag, kwargs in flags.items():
        if job is None or ONLY_FOR[flag] == job:
            p.add_argument(flag, **kwargs)  # type: ignore[arg-type]
        else:
            p.add_argument(flag, action=_Refuse, job=job, help=argparse.SUPPRESS)


class _Refuse(argparse.Action):
    """A flag of another job: refused with a message naming the job it belongs to."""

    def __init__(self, option_strings: Sequence[str], dest: str, job: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", **kw)
        self.job = job

    def __call__(self, parser: argparse.ArgumentParser, *_: Any, **__: Any) -> None:
        flag = self.option_strings[0]
        parser.error(f"{flag} does not apply to {self.job}; it is an option of {ONLY_FOR[flag]}")


def check_job_flags(job: str, args: argparse.Namespace) -> None:
    """For ``admin job``: refuse flags of another job, as the ``job`` parsers do."""
    for flag, owner in ONLY_FOR.items():
        if getattr(args, flag.lstrip("-"), None) is not None and owner != job:
            print(
                f"cmek-proxy: {flag} does not apply to {job}; it is an option of {owner}",
                file=sys.stderr,
            )
            sys.exit(2)


def run_job_command(args: argparse.Namespace) -> None:
    from proxy.backend.client import BackendUnavailable
    from proxy.config import load_config
    from proxy.control.jobs.common import JobOptions, JobProgress
    from proxy.control.jobs.standalone import run_standalone

    config = load_config(Path(args.config))
    opts = JobOptions(
        bucket=args.bucket,
        prefix=args.prefix,
        dry_run=args.dry_run,
        concurrency=args.concurrency,
        sample=getattr(args, "sample", None),
        target_key=getattr(args, "to", None),
        progress=not (args.no_progress or args.json),
        limit=getattr(args, "limit", None),
        min_age=args.min_age if getattr(args, "min_age", None) is not None else config.gc.min_age,
    )
    prog = JobProgress(args.job, opts)
    interrupted = False

    async def main() -> None:
        nonlocal interrupted
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(run_standalone(config, args.job, opts, progress=prog))
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
            interrupted = True
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    try:
        run_async(main())
    except BackendUnavailable as exc:
        raise backend_problem(config.backend.endpoint, exc) from None
    if args.json:
        print(json.dumps({**prog.to_json(), "interrupted": interrupted}, indent=2, sort_keys=True))
    else:
        print(prog.summary(), flush=True)
    if interrupted:
        print(
            f"cmek-proxy: {args.job} interrupted after {prog.objects} objects. To resume, run "
            f"the same command again ({RESUME[args.job]}).",
            file=sys.stderr,
        )
        sys.exit(EXIT_INTERRUPTED)
    if prog.outcomes.get("error", 0):
        raise Failed
