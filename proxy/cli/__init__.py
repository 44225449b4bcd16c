"""The cmek-proxy command line: one module per command group.

Every error a user can cause ends in one line on stderr (``cmek-proxy: <message>``) and a
documented exit status (``EXIT_*`` below, listed in ``--help``), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Coroutine
from typing import Any, Final

import proxy
from proxy.errors import CmekError, ConfigError, KmsError
from proxy.logs import FORMATS
from proxy.logs import configure as configure_logging

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
"""The command ran and found a problem: a job counted errors, an audit chain is broken,
``doctor`` found a check failing."""
EXIT_USAGE: Final = 2
"""Bad command line (argparse's own status)."""
EXIT_CONFIG: Final = 3
"""The configuration file is missing, unreadable or invalid."""
EXIT_KEY: Final = 4
"""A key is unusable: malformed URI, unreadable key file, denied or unreachable KMS."""
EXIT_RUNTIME: Final = 5
"""Anything else the environment caused: port in use, backend unreachable, file missing."""
EXIT_INTERRUPTED: Final = 130
"""Stopped by Ctrl-C (SIGINT)."""

EXIT_CODES_HELP: Final = """exit status:
  0    success
  1    the command ran and found a problem (job errors, broken audit chain, failed check)
  2    bad command line
  3    configuration error (missing, unreadable or invalid config file)
  4    key error (malformed key URI, unreadable key file, KMS denied or unreachable)
  5    runtime error (port in use, backend unreachable, missing file, ...)
  130  interrupted (Ctrl-C)"""


class Failed(Exception):
    """Raised by a command that ran and found a problem (exit status 1); already reported."""


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (``--concurrency 0`` is refused)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def port(text: str) -> int:
    """argparse type: a TCP port, 0 (any free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, not {value}")
    return value


def nonempty(text: str) -> str:
    """argparse type: a name that is not empty."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], not {value}")
    return value


def network_reason(exc: CmekError) -> str:
    """The network's own words for a backend failure (S3 clients get a shorter message)."""
    cause = exc.__cause__
    return str(cause) if cause is not None and str(cause) else getattr(exc, "message", str(exc))


def backend_problem(endpoint: str, exc: CmekError) -> CmekError:
    """A backend failure, said with the endpoint and the network's reason."""
    return CmekError(f"backend {endpoint} unreachable: {network_reason(exc)}")


def run_async(coro: Coroutine[Any, Any, None]) -> None:
    """Run on the process's event loop (uvloop when installed, see ``proxy.loop``)."""
    from proxy.loop import run

    run(coro)


def build_parser() -> argparse.ArgumentParser:
    from proxy.cli import admin, audit, doctor, jobs, keygen, serve

    p = argparse.ArgumentParser(
        prog="cmek-proxy",
        description="Transparent encrypting S3 sidecar with customer-managed encryption keys.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"cmek-proxy {proxy.__version__}")
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="log level (default INFO)",
    )
    p.add_argument(
        "--log-format",
        choices=FORMATS,
        help="text or json (one object per line); default: the config's logging.format, or text",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add_parsers(sub)
    jobs.add_parser(sub)
    audit.add_parser(sub)
    admin.add_parser(sub)
    doctor.add_parsers(sub)
    keygen.add_parser(sub)
    return p


def exit_code(exc: CmekError) -> int:
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG
    if isinstance(exc, KmsError):
        return EXIT_KEY
    return EXIT_RUNTIME


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_format or "text", args.log_level)
    try:
        args.func(args)
    except Failed:
        sys.exit(EXIT_FAILED)
    except CmekError as exc:
        print(f"cmek-proxy: {exc}", file=sys.stderr)
        sys.exit(exit_code(exc))
    except OSError as exc:
        # a file or socket the user named: say which and why, not where in the code
        print(
            f"cmek-proxy: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr
        )
        sys.exit(EXIT_RUNTIME)
    except KeyboardInterrupt:
        # Ctrl-C during start-up: everything started is closed by its context managers
        print("cmek-proxy: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
