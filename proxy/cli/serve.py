"""``cmek-proxy serve`` (production) and ``cmek-proxy dev`` (everything on one machine)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from proxy.cli import Failed, backend_problem, port, positive_int, run_async
from proxy.logs import configure as configure_logging


def add_parsers(sub: Any) -> None:
    s = sub.add_parser(
        "serve",
        help="run in front of an S3-compatible backend",
        description="Run the proxy in front of an S3-compatible backend. Every configured "
        "key is validated (a wrap/unwrap round trip) before the listeners open.",
    )
    s.add_argument("--config", required=True, help="YAML configuration file")
    s.add_argument(
        "--workers",
        type=positive_int,
        help="S3 worker processes (default: config 'workers', else the CPUs available)",
    )
    s.set_defaults(func=serve)

    d = sub.add_parser(
        "dev",
        help="run the whole product on one machine: local key, disk backend, admin API",
        description="Run an encrypting S3 endpoint on a local disk backend (rclone serve s3) "
        "with a local key file and the admin API; writes the client environment, the admin "
        "token and a config file for jobs to the data directory.",
    )
    d.add_argument("--port", type=port, default=8080, help="S3 port (default 8080)")
    d.add_argument("--admin-port", type=port, default=8081, help="admin port (default 8081)")
    d.add_argument("--data-dir", default=".cmek-dev", help="state directory (default .cmek-dev)")
    d.add_argument(
        "--tls",
        action="store_true",
        help="serve https with a self-signed certificate (AWS_CA_BUNDLE in dev.env)",
    )
    d.set_defaults(func=dev)

    h = sub.add_parser(
        "health",
        help="exit 0 if the proxy of this configuration answers /healthz (container checks)",
        description="Ask the admin listener named by the configuration (after environment "
        "overrides) for /healthz; exit status 0 when it answers 200, 1 otherwise. Used by "
        "the container image's HEALTHCHECK.",
    )
    h.add_argument("--config", required=True, help="YAML configuration file")
    h.add_argument("--timeout", type=float, default=2.0, help="seconds to wait (default 2)")
    h.set_defaults(func=health)


def serve(args: argparse.Namespace) -> None:
    from proxy.config import load_config
    from proxy.workers import multiprocess_metrics, worker_count

    config = load_config(Path(args.config))
    if args.log_format is None:  # the flag wins over logging.format
        configure_logging(config.logging.format, args.log_level)
    count = worker_count(config, args.workers)
    if count > 1:
        with multiprocess_metrics():  # before prometheus_client is first imported
            from proxy.workers import serve_workers

            run_async(serve_workers(config, count, args.log_level, args.log_format))
        return

    from proxy.app import start
    from proxy.backend.client import BackendUnavailable
    from proxy.devmode import wait_for_signal

    async def main() -> None:
        try:
            running = await start(config)
        except BackendUnavailable as exc:  # reading the API specs before listening
            raise backend_problem(config.backend.endpoint, exc) from None
        s3 = "https" if config.listen.tls else "http"
        admin = "https" if config.admin.tls else "http"
        print(
            f"cmek-proxy: S3 on {s3}://{config.listen.host}:{running.s3_port}, "
            f"admin on {admin}://{config.admin.host}:{running.admin_port}",
            flush=True,
        )
        try:
            await wait_for_signal()
        finally:
            await running.close()

    run_async(main())


def dev(args: argparse.Namespace) -> None:
    from proxy.devmode import run_dev

    run_async(run_dev(Path(args.data_dir), args.port, args.admin_port, args.tls))


def health(args: argparse.Namespace) -> None:
    import sys
    import urllib.error
    import urllib.request

    from proxy.config import load_config

    config = load_config(Path(args.config))
    host = config.admin.host
    if host in ("", "0.0.0.0", "::"):  # listening everywhere: ask on loopback
        host = "127.0.0.1"
    url = f"http://{host}:{config.admin.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:
            if resp.status == 200:
                return
            problem = f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        problem = f"HTTP {exc.code}"
    except OSError as exc:
        problem = str(getattr(exc, "reason", exc))
    print(f"cmek-proxy: {url}: {problem}", file=sys.stderr)
    raise Failed
