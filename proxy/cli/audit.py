"""``cmek-proxy audit verify FILE``: check an audit log's hash chain."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from proxy.cli import Failed
from proxy.errors import CmekError


def add_parser(sub: Any) -> None:
    a = sub.add_parser("audit", help="audit log tools", description="Audit log tools.")
    asub = a.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    av = asub.add_parser(
        "verify",
        help="check the hash chain; report the first broken link",
        description="Check the hash chain of an audit log; report the first broken link. "
        "Exit status 1 when the chain is broken.",
    )
    av.add_argument("file", help="the audit log (JSON lines), e.g. <data_dir>/audit.jsonl")
    av.add_argument(
        "--head",
        metavar="COUNT:HASH",
        help="a head recorded earlier (GET /v1/audit/head, cmek_audit_head_info): "
        "also fail if the log no longer reaches it (entries cut off the end)",
    )
    av.set_defaults(func=audit_verify)


def audit_verify(args: argparse.Namespace) -> None:
    from proxy.control.audit import Head, verify

    path = Path(args.file)
    if not path.is_file():
        raise CmekError(f"audit log {path} does not exist or is not a file")
    try:
        head = Head.parse(args.head) if args.head else None
    except ValueError as exc:
        raise CmekError(f"--head: {exc}") from None
    try:
        res = verify(path, head)
    except PermissionError:
        raise CmekError(f"audit log {path} is not readable (permission denied)") from None
    if res.ok:
        reaches = f", reaches the recorded head ({head.entries} entries)" if head else ""
        print(f"audit log {args.file}: chain intact, {res.entries} entries{reaches}")
        return
    print(
        f"audit log {args.file}: chain broken at line {res.broken_line}: {res.reason} "
        f"({res.entries} entries before it are intact)",
        file=sys.stderr,
    )
    raise Failed
