"""The ``cmek-proxy`` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
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


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (extra "fast")
        asyncio.run(coro)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


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
    return p


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
        pass


if __name__ == "__main__":
    main()
