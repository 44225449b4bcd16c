"""The ``cmek-proxy`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from proxy.errors import CmekError


def _serve(args: argparse.Namespace) -> None:
    from proxy.app import start
    from proxy.config import load_config
    from proxy.devmode import wait_for_signal

    config = load_config(Path(args.config))

    async def main() -> None:
        running = await start(config)
        print(
            f"cmek-proxy: S3 on {config.listen.host}:{running.s3_port}, "
            f"admin on {config.admin.host}:{running.admin_port}",
            flush=True,
        )
        try:
            await wait_for_signal()
        finally:
            await running.close()

    _run(main())


def _dev(args: argparse.Namespace) -> None:
    from proxy.devmode import run_dev

    _run(run_dev(Path(args.data_dir), args.port, args.admin_port))


def _job(args: argparse.Namespace) -> None:
    from proxy.config import load_config
    from proxy.control.jobs.common import JobOptions
    from proxy.control.jobs.standalone import run_standalone

    config = load_config(Path(args.config))
    opts = JobOptions(
        bucket=args.bucket,
        prefix=args.prefix,
        dry_run=args.dry_run,
        concurrency=args.concurrency,
        sample=args.sample,
        target_key=getattr(args, "to", None),
        progress=not args.no_progress,
    )
    result: list[dict[str, Any]] = []

    async def main() -> None:
        prog = await run_standalone(config, args.job, opts)
        print(prog.summary(), flush=True)
        result.append(prog.to_json())

    _run(main())
    if args.json:
        print(json.dumps(result[0], indent=2, sort_keys=True))
    if result and result[0]["outcomes"].get("error", 0):
        sys.exit(1)


def _audit_verify(args: argparse.Namespace) -> None:
    from proxy.control.audit import verify

    res = verify(Path(args.file))
    if res.ok:
        print(f"audit log {args.file}: chain intact, {res.entries} entries")
        return
    print(
        f"audit log {args.file}: chain broken at line {res.broken_line}: {res.reason} "
        f"({res.entries} entries before it are intact)",
        file=sys.stderr,
    )
    sys.exit(1)


def _admin(args: argparse.Namespace) -> None:
    url = (args.url or os.environ.get("CMEK_ADMIN_URL") or "").rstrip("/")
    token = args.token or os.environ.get("CMEK_ADMIN_TOKEN")
    if not url or not token:
        raise CmekError("give --url and --token (or CMEK_ADMIN_URL and CMEK_ADMIN_TOKEN)")
    body: dict[str, Any] | None = None
    method = "GET"
    if args.admin_command == "init":
        spec: dict[str, Any] = (
            {"passthrough": True} if args.passthrough else {"kms_key": args.kms_key}
        )
        if args.location:
            spec["location"] = args.location
        if args.prefix:
            spec["prefix"] = args.prefix
        method, path, body = (
            "POST",
            f"/v1/buckets/{args.bucket}/encryptionSpec:initialize",
            {"encryption_spec": spec},
        )
    elif args.admin_command == "get":
        path = f"/v1/buckets/{args.bucket}/encryptionSpec"
        if args.prefix:
            path += "?" + urllib.parse.urlencode({"prefix": args.prefix})
    elif args.admin_command == "list":
        path = "/v1/encryptionSpecs"
    elif args.admin_command == "operation":
        path = f"/v1/operations/{args.id.removeprefix('operations/')}"
    else:
        body = {"job": args.job, "dry_run": args.dry_run, "concurrency": args.concurrency}
        if args.prefix:
            body["prefix"] = args.prefix
        if args.sample is not None:
            body["sample"] = args.sample
        if args.to:
            body["target_key"] = args.to
        method, path = "POST", f"/v1/buckets/{args.bucket}/jobs"
    status, answer = _http(method, url + path, token, body)
    if status < 300 and getattr(args, "wait", False) and "name" in answer:
        answer = _wait(url, token, str(answer["name"]), args.timeout)
        status = 200 if "error" not in answer else 409
    print(json.dumps(answer, indent=2, sort_keys=True))
    if status >= 300:
        sys.exit(1)


def _http(
    method: str, url: str, token: str, body: dict[str, Any] | None
) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - admin URL
    req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {"error": {"message": exc.reason}}
    except OSError as exc:
        raise CmekError(f"admin API at {url} unreachable: {exc}") from exc


def _wait(url: str, token: str, name: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    answer: dict[str, Any] = {}
    while time.monotonic() < deadline:
        _, answer = _http("GET", f"{url}/v1/{name}", token, None)
        if answer.get("done") or ("error" in answer and "name" not in answer):
            return answer
        time.sleep(0.5)
    raise CmekError(f"{name} not done after {timeout}s: {json.dumps(answer)}")


def _run(coro: Coroutine[Any, Any, None]) -> None:
    """Run under uvloop when it is installed (extra "fast"), unless CMEK_PROXY_LOOP=asyncio.

    See benchmarks/README.md for what uvloop buys on the small-object path.
    """
    if os.environ.get("CMEK_PROXY_LOOP") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass  # uvloop is optional (extra "fast"): fall through to asyncio
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(coro)
            return
    asyncio.run(coro)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cmek-proxy", description=__doc__)
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run in front of an S3-compatible backend")
    s.add_argument("--config", required=True, help="YAML configuration file")
    s.set_defaults(func=_serve)
    d = sub.add_parser("dev", help="run an encrypting endpoint on a local disk backend")
    d.add_argument("--port", type=int, default=8080, help="S3 port (default 8080)")
    d.add_argument("--admin-port", type=int, default=0, help="admin port (default: free port)")
    d.add_argument("--data-dir", default=".cmek-dev", help="state directory (default .cmek-dev)")
    d.set_defaults(func=_dev)

    j = sub.add_parser("job", help="run a key lifecycle job from the configuration")
    jsub = j.add_subparsers(dest="job", required=True)
    for name, helptext in (
        ("rewrap", "move objects to another key (only the sealed keys change)"),
        ("encrypt-existing", "encrypt in place the plaintext objects of encrypted paths"),
        ("verify", "check that every object opens and authenticates"),
        ("inventory", "objects and bytes per key URI and version, from envelopes only"),
    ):
        jp = jsub.add_parser(name, help=helptext)
        jp.add_argument("--config", required=True, help="YAML configuration file")
        _job_args(jp)
        jp.add_argument("--no-progress", action="store_true", help="no progress bar")
        jp.add_argument("--json", action="store_true", help="also print the summary as JSON")
        jp.set_defaults(func=_job)

    a = sub.add_parser("audit", help="audit log tools")
    asub = a.add_subparsers(dest="audit_command", required=True)
    av = asub.add_parser("verify", help="check the hash chain; report the first broken link")
    av.add_argument("file")
    av.set_defaults(func=_audit_verify)

    ad = sub.add_parser("admin", help="call the admin API (token from --token/CMEK_ADMIN_TOKEN)")
    ad.add_argument("--url", help="admin listener URL (default $CMEK_ADMIN_URL)")
    ad.add_argument("--token", help="admin bearer token (default $CMEK_ADMIN_TOKEN)")
    adsub = ad.add_subparsers(dest="admin_command", required=True)
    ai = adsub.add_parser("init", help="InitializeEncryptionSpec for a bucket (or prefix)")
    ai.add_argument("bucket")
    key = ai.add_mutually_exclusive_group(required=True)
    key.add_argument("--kms-key", help="key URI")
    key.add_argument("--passthrough", action="store_true", help="store as sent")
    ai.add_argument("--location", help="location the key must be in")
    ai.add_argument("--prefix")
    ai.add_argument("--wait", action="store_true", help="wait for the operation to finish")
    ai.add_argument("--timeout", type=float, default=120.0)
    ag = adsub.add_parser("get", help="GetEncryptionSpec")
    ag.add_argument("bucket")
    ag.add_argument("--prefix")
    adsub.add_parser("list", help="ListEncryptionSpecs")
    ao = adsub.add_parser("operation", help="GetOperation")
    ao.add_argument("id")
    aj = adsub.add_parser("job", help="start a job in the proxy")
    aj.add_argument("job", choices=["rewrap", "encrypt-existing", "verify", "inventory"])
    _job_args(aj)
    aj.add_argument("--wait", action="store_true", help="wait for the job to finish")
    aj.add_argument("--timeout", type=float, default=3600.0)
    ad.set_defaults(func=_admin)
    return p


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bucket", required=True)
    p.add_argument("--prefix", default="")
    p.add_argument("--dry-run", action="store_true", help="count what would change; change nothing")
    p.add_argument("--concurrency", type=int, default=8, help="objects in flight (default 8)")
    p.add_argument("--sample", type=float, help="verify: fraction of objects to check")
    p.add_argument("--to", help="rewrap: target key URI (default: the spec's key)")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        args.func(args)
    except CmekError as exc:
        print(f"cmek-proxy: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        pass  # Ctrl-C during start-up: exit quietly, everything started is closed


if __name__ == "__main__":
    main()
