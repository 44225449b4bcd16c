"""``cmek-proxy doctor`` (check a configuration end to end) and ``cmek-proxy whoami``.

doctor: parses the config, reaches the backend with its credentials (ListBuckets, the
control bucket), and for every key - configured, or named by a spec made through the admin
API - shows its provider, the identity the proxy presents, a wrap/unwrap round trip, its
location (against the configured one), its rotation status where the provider tells it, and
the cache settings. Exit status 0 when every check passes, 1 when one fails, 3 for a config
that does not parse.

whoami: the identity the proxy presents to each configured provider, and the exact grant to
give it on the keys (key policy statement, gcloud command, az role assignment, Vault policy).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.cli import Failed, network_reason, run_async
from proxy.config import Config
from proxy.errors import CmekError, KmsError
from proxy.kms.base import KmsClient


def add_parsers(sub: Any) -> None:
    d = sub.add_parser(
        "doctor",
        help="check a configuration: backend, every key (round trip, identity, rotation)",
        description="Check a configuration end to end: it parses; the backend answers with "
        "its credentials; every key does a wrap/unwrap round trip, is where the config says, "
        "and its provider's identity and rotation status are shown. Exit status 0 when all "
        "checks pass, 1 when one fails.",
    )
    d.add_argument("--config", required=True, help="YAML configuration file")
    d.add_argument("--json", action="store_true", help="print the report as JSON only")
    d.set_defaults(func=doctor_command)
    w = sub.add_parser(
        "whoami",
        help="the identity the proxy presents to each KMS, and the grant to give it",
        description="Show the identity the proxy presents to each configured KMS provider "
        "(AWS STS caller, GCP service account, Azure principal, Vault token) and the exact "
        "grant to give it on the configured keys.",
    )
    w.add_argument("--config", required=True, help="YAML configuration file")
    w.add_argument("--json", action="store_true", help="print the result as JSON only")
    w.set_defaults(func=whoami_command)


@dataclass
class Report:
    checks: list[dict[str, Any]] = field(default_factory=list)

    def add(self, what: str, ok: bool | None, text: str, **extra: Any) -> None:
        """``ok`` None: information only (never fails the report)."""
        self.checks.append({"check": what, "ok": ok, "text": text, **extra})

    @property
    def ok(self) -> bool:
        return all(c["ok"] is not False for c in self.checks)

    def lines(self) -> list[str]:
        mark = {True: "ok  ", False: "FAIL", None: "    "}
        out = [f"{mark[c['ok']]} {c['check']}: {c['text']}" for c in self.checks]
        failed = sum(1 for c in self.checks if c["ok"] is False)
        out.append("doctor: all checks passed" if not failed else f"doctor: {failed} failed")
        return out


def _clients(config: Config) -> list[KmsClient]:
    from proxy.kms.registry import make_kms_clients

    return make_kms_clients(config)


def _client_for(clients: Sequence[KmsClient], uri: str) -> KmsClient | None:
    return next((c for c in clients if c.does_support(uri)), None)


async def diagnose(
    config: Config, source: str, *, kms_clients: Sequence[KmsClient] | None = None
) -> Report:
    """Every check of ``doctor``; never raises for what it checks (it reports it)."""
    from proxy.backend.client import BackendClient
    from proxy.control.specs import SpecStore
    from proxy.kms.keys import KeyService
    from proxy.kms.registry import resolver
    from proxy.metrics import Metrics

    report = Report()
    report.add("config", True, f"{source} parses")
    clients = list(kms_clients) if kms_clients is not None else _clients(config)
    session = BackendClient.make_session(config.backend)
    uris = list(config.key_uris())
    try:
        backend = BackendClient(config.backend, session)
        backend_ok = await _check_backend(report, config, backend)
        if backend_ok and config.specs.control_bucket:
            specs = SpecStore(config, backend, on_policy=lambda _p: None)
            try:
                await specs.refresh()
            except CmekError as exc:
                report.add("specs", False, f"cannot read API specs: {exc}")
            uris += [r.rule.key for r in specs.records() if r.rule.key and r.source == "api"]
        keys = KeyService(resolver(clients), Metrics(), ttl=config.kms.cache_ttl)
        identities: dict[str, str] = {}
        for uri in sorted(set(uris)):
            await _check_key(report, config, keys, clients, uri, identities, uris)
        kms = config.kms
        report.add(
            "cache",
            None,
            f"unwrapped keys kept {kms.cache_ttl:g}s (the revocation delay), at most "
            f"{kms.cache_entries} entries; keys probed every {kms.probe_interval:g}s; KMS "
            f"timeout {kms.timeout:g}s, {kms.retries} retries",
        )
    finally:
        await session.close()
        for c in clients:
            await c.close()
    return report


async def _check_backend(report: Report, config: Config, backend: Any) -> bool:
    """ListBuckets with the configured credentials, then the control bucket; False: the
    backend cannot be used (later checks that need it are skipped)."""
    from xml.etree.ElementTree import ParseError

    from proxy.backend.client import BackendUnavailable
    from proxy.wire.xmldoc import parse_backend

    where = f"backend {config.backend.endpoint}"
    try:
        _, body = await backend.call("GET")
        names = [el.text for el in parse_backend(body).iter() if el.tag.endswith("Name")]
        report.add(where, True, f"reachable, credentials accepted ({len(names)} buckets listed)")
    except BackendUnavailable as exc:
        report.add(where, False, f"unreachable: {network_reason(exc)}")
        return False
    except CmekError as exc:
        code = getattr(exc, "code", "")
        if code == "AccessDenied":
            report.add(where, True, "reachable, credentials accepted (ListBuckets not allowed)")
        else:
            report.add(where, False, str(exc))
            return False
    except ParseError as exc:
        report.add(where, False, f"answered something that is not S3 XML: {exc}")
        return False
    control = config.specs.control_bucket
    if control:
        resp, _ = await backend.call("HEAD", control, ok=(200, 403, 404))
        if resp.status == 200:
            report.add(f"control bucket {control}", True, "exists")
        else:
            report.add(
                f"control bucket {control}",
                None,
                f"HTTP {resp.status} (created on the first spec change if the credentials "
                "may create buckets)",
            )
    return True


async def _check_key(
    report: Report,
    config: Config,
    keys: Any,
    clients: Sequence[KmsClient],
    uri: str,
    identities: dict[str, str],
    all_uris: Sequence[str],
) -> None:
    from proxy.app import _location_for
    from proxy.kms.identity import identity_of, rotation_of

    client = _client_for(clients, uri)
    what = f"key {uri}"
    if client is None:
        report.add(what, False, "no provider supports this key URI")
        return
    try:
        kek = keys.kek(uri)
    except KmsError as exc:
        report.add(what, False, str(exc))
        return
    expected = _location_for(config, uri)
    if client.prefix not in identities:
        ident = await identity_of(client, [u for u in all_uris if client.does_support(u)])
        identities[client.prefix] = ident.principal or f"unknown ({ident.detail})"
    report.add(f"{what} provider", None, kek.provider)
    report.add(f"{what} identity", None, identities[client.prefix])
    try:
        await keys.validate(uri, expected)
        report.add(f"{what} round trip", True, "wrap and unwrap agree")
    except KmsError as exc:
        report.add(f"{what} round trip", False, str(exc))
    loc = kek.location or "(the provider names none)"
    report.add(f"{what} location", None, loc + (f", expected {expected}" if expected else ""))
    report.add(f"{what} rotation", None, await rotation_of(client, uri))


def doctor_command(args: argparse.Namespace) -> None:
    from proxy.config import load_config

    config = load_config(Path(args.config))
    result: list[Report] = []

    async def main() -> None:
        result.append(await diagnose(config, args.config))

    run_async(main())
    report = result[0]
    if args.json:
        print(json.dumps({"ok": report.ok, "checks": report.checks}, indent=2))
    else:
        print("\n".join(report.lines()))
    if not report.ok:
        raise Failed


async def identities(
    config: Config, *, kms_clients: Sequence[KmsClient] | None = None
) -> list[dict[str, Any]]:
    """whoami: one entry per provider the configuration uses."""
    from proxy.kms.identity import identity_of

    clients = list(kms_clients) if kms_clients is not None else _clients(config)
    uris = config.key_uris()
    out = []
    try:
        for client in clients:
            mine = [u for u in uris if client.does_support(u)]
            if not mine and client.prefix == "local://":
                continue  # always loaded, named by no key: nothing to grant
            ident = await identity_of(client, mine)
            out.append({"keys": mine, **ident.__dict__})
    finally:
        for c in clients:
            await c.close()
    return out


def whoami_command(args: argparse.Namespace) -> None:
    from proxy.config import load_config

    config = load_config(Path(args.config))
    result: list[list[dict[str, Any]]] = []

    async def main() -> None:
        result.append(await identities(config))

    run_async(main())
    if args.json:
        print(json.dumps(result[0], indent=2))
        return
    for ident in result[0]:
        print(f"{ident['provider']}: {ident['principal'] or 'unknown'}")
        print(f"  {ident['detail']}")
        if ident["keys"]:
            print("  keys: " + ", ".join(ident["keys"]))
        if ident["grant"]:
            print("  grant:")
            print("\n".join("    " + line for line in ident["grant"].splitlines()))
