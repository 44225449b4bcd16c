"""``cmek-proxy keygen PATH [--rotate]``: make or rotate a ``local://`` key file (mode 0600)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from proxy.errors import KeyConfigError


def add_parser(sub: Any) -> None:
    k = sub.add_parser(
        "keygen",
        help="create a local:// key file, or add a new primary key to one",
        description="Create a local:// key file (JSON, mode 0600) holding one fresh 256-bit "
        "key. With --rotate, add a new key to an existing file and make it the primary: new "
        "writes use it, objects sealed under the older keys still open. For development and "
        "tests; production keys belong in a KMS.",
    )
    k.add_argument("path", help="key file to create (or, with --rotate, to rotate)")
    k.add_argument(
        "--rotate", action="store_true", help="add a new primary key to an existing key file"
    )
    k.set_defaults(func=keygen)


def keygen(args: argparse.Namespace) -> None:
    from proxy.kms.local import create_key_file, rotate_key_file

    path = Path(args.path).absolute()
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise KeyConfigError(f"cannot create {path}: {parent} is not a directory")
            break
    if args.rotate:
        kf = rotate_key_file(path)
        print(f"{path}: new primary key {kf.primary!r} ({len(kf.keys)} keys)")
    else:
        if path.exists():
            raise KeyConfigError(f"{path} already exists; use --rotate to add a new primary key")
        kf = create_key_file(path)
        print(f"{path}: created, primary key {kf.primary!r}")
    print(f"key URI: local://{path}")
