"""``cmek-proxy admin ...``: call the admin API of a running proxy."""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from proxy.cli import Failed
from proxy.cli.jobs import add_job_flags, check_job_flags
from proxy.errors import CmekError


def add_parser(sub: Any) -> None:
    ad = sub.add_parser(
        "admin",
        help="call the admin API of a running proxy",
        description="Call the admin API of a running proxy. The URL and bearer token come "
        "from --url/--token or CMEK_ADMIN_URL/CMEK_ADMIN_TOKEN (dev mode writes both to "
        "dev.env).",
    )
    ad.add_argument("--url", help="admin listener URL (default $CMEK_ADMIN_URL)")
    ad.add_argument("--token", help="admin bearer token (default $CMEK_ADMIN_TOKEN)")
    adsub = ad.add_subparsers(dest="admin_command", required=True, metavar="COMMAND")
    ai = adsub.add_parser("init", help="InitializeEncryptionSpec for a bucket (or prefix)")
    ai.add_argument("bucket", help="bucket to turn encryption on (or passthrough) for")
    key = ai.add_mutually_exclusive_group(required=True)
    key.add_argument("--kms-key", help="key URI to encrypt under")
    key.add_argument("--passthrough", action="store_true", help="store as sent")
    ai.add_argument("--location", help="location the key must be in")
    ai.add_argument("--prefix", help="only this key prefix of the bucket")
    ai.add_argument("--wait", action="store_true", help="wait for the operation to finish")
    ai.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (default 120)")
    ag = adsub.add_parser("get", help="GetEncryptionSpec")
    ag.add_argument("bucket", help="bucket whose spec to show")
    ag.add_argument("--prefix", help="the spec of this prefix")
    adsub.add_parser("list", help="ListEncryptionSpecs")
    ao = adsub.add_parser("operation", help="GetOperation")
    ao.add_argument("id", help="operation id (operations/<id> or <id>)")
    aj = adsub.add_parser("job", help="start a job in the proxy")
    aj.add_argument(
        "job", choices=["rewrap", "encrypt-existing", "verify", "inventory", "gc"], help="the job"
    )
    add_job_flags(aj, None)
    aj.add_argument("--wait", action="store_true", help="wait for the job to finish")
    aj.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait (default 3600)")
    ad.set_defaults(func=admin)


def admin(args: argparse.Namespace) -> None:
    url = (args.url or os.environ.get("CMEK_ADMIN_URL") or "").rstrip("/")
    token = args.token or os.environ.get("CMEK_ADMIN_TOKEN")
    if not url or not token:
        raise CmekError("give --url and --token (or CMEK_ADMIN_URL and CMEK_ADMIN_TOKEN)")
    if not url.startswith(("http://", "https://")):
        raise CmekError(f"admin API at {url}: the URL must start with http:// or https://")
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
        check_job_flags(args.job, args)
        body = {"job": args.job, "dry_run": args.dry_run, "concurrency": args.concurrency}
        if args.prefix:
            body["prefix"] = args.prefix
        if args.sample is not None:
            body["sample"] = args.sample
        if args.to:
            body["target_key"] = args.to
        if args.limit is not None:
            body["limit"] = args.limit
        if args.min_age is not None:
            body["min_age"] = args.min_age
        method, path = "POST", f"/v1/buckets/{args.bucket}/jobs"
    status, answer = _http(method, url + path, token, body)
    if status < 300 and getattr(args, "wait", False) and "name" in answer:
        answer = _wait(url, token, str(answer["name"]), args.timeout)
        status = 200 if "error" not in answer else 409
    print(json.dumps(answer, indent=2, sort_keys=True))
    if status >= 300:
        raise Failed


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
    except ValueError as exc:
        raise CmekError(f"admin API at {url} did not answer JSON: {exc}") from exc


def _wait(url: str, token: str, name: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    answer: dict[str, Any] = {}
    while time.monotonic() < deadline:
        _, answer = _http("GET", f"{url}/v1/{name}", token, None)
        if answer.get("done") or ("error" in answer and "name" not in answer):
            return answer
        time.sleep(0.5)
    raise CmekError(f"{name} not done after {timeout}s: {json.dumps(answer)}")
