"""Configuration: YAML file, then environment-variable overrides, then validation.

Environment overrides use ``CMEK_PROXY__`` and double underscores for nesting, e.g.
``CMEK_PROXY__BACKEND__ENDPOINT=http://127.0.0.1:9000`` or
``CMEK_PROXY__KMS__CACHE_TTL=120``.  Values are parsed as YAML scalars.

A bad configuration raises ``ConfigError`` whose message names the field
(``backend.endpoint``) and the problem.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from proxy.errors import ConfigError

ENV_PREFIX = "CMEK_PROXY__"
MAX_CACHE_TTL = 3600.0


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tls(_Model):
    """TLS on a listener. Without it the listener speaks plain HTTP, and the S3 listener
    then sends decrypted objects over the network in the clear."""

    cert_file: Path
    """PEM certificate chain (server certificate first)."""
    key_file: Path
    """PEM private key of the certificate."""
    reload_interval: float = Field(default=30.0, gt=0)
    """Seconds between checks of the two files; changed files are loaded for new
    connections without a restart (a pair that does not load keeps the old one)."""
    client_ca_file: Path | None = None
    """Admin listener only: CAs whose client certificates are accepted (read at start)."""
    require_client_cert: bool = False
    """Admin listener only: refuse connections without a client certificate."""

    @model_validator(mode="after")
    def _ca(self) -> Tls:
        if self.require_client_cert and self.client_ca_file is None:
            raise ValueError("require_client_cert needs client_ca_file")
        return self


class Listen(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    tls: Tls | None = None

    @field_validator("tls")
    @classmethod
    def _no_client_certs(cls, v: Tls | None) -> Tls | None:
        if v is not None and v.client_ca_file is not None:
            raise ValueError("client certificates are for the admin listener (S3 uses SigV4)")
        return v


class Admin(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=8081, ge=0, le=65535)
    token: str | None = None
    """Bearer token for the admin API (health and metrics need none)."""
    tls: Tls | None = None


class ClientKey(_Model):
    access_key: str = Field(min_length=3)
    secret_key: str = Field(min_length=8)


class Backend(_Model):
    endpoint: str
    region: str = "us-east-1"
    access_key: str
    secret_key: str
    addressing: Literal["path", "virtual"] = "path"
    verify_tls: bool = True
    ca_bundle: Path | None = None
    envelope_store: Literal["metadata", "sidecar"] = "metadata"
    """Where envelopes live: object metadata, or sidecar objects for backends that do not
    persist user metadata (``rclone serve s3``). See ``proxy/envelopes.py``."""
    max_connections: int = Field(default=256, ge=1)
    connect_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(default=300.0, gt=0)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")


class VaultAuthConfig(_Model):
    """How the Transit provider logs in (see ``proxy/kms/vault_auth.py``)."""

    method: Literal["token", "approle", "kubernetes"] = "token"
    mount: str | None = None
    """The auth method's mount path; default ``approle`` / ``kubernetes``."""
    token: str | None = None
    token_file: Path | None = None
    role_id: str | None = None
    role_id_file: Path | None = None
    secret_id: str | None = None
    """Prefer ``secret_id_file`` or ``CMEK_PROXY__KMS__VAULT__AUTH__SECRET_ID``."""
    secret_id_file: Path | None = None
    role: str | None = None
    """Kubernetes auth role."""
    jwt_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")

    @model_validator(mode="after")
    def _complete(self) -> VaultAuthConfig:
        if self.method == "approle" and not (self.role_id or self.role_id_file):
            raise ValueError("approle needs role_id or role_id_file")
        if self.method == "kubernetes" and not self.role:
            raise ValueError("kubernetes needs role")
        return self


class VaultConfig(_Model):
    """Vault / OpenBao Transit: transport, namespace and login."""

    tls: bool = True
    """HTTPS (verified); false only for a local dev server over plain HTTP."""
    ca_file: Path | None = None
    """PEM CA bundle to verify the server with, instead of the system trust store."""
    namespace: str | None = None
    """Sent as ``X-Vault-Namespace`` (Vault Enterprise / OpenBao namespaces)."""
    auth: VaultAuthConfig = Field(default_factory=VaultAuthConfig)


class Kms(_Model):
    cache_ttl: float = Field(default=300.0, gt=0, le=MAX_CACHE_TTL)
    """Seconds an unwrapped key may be used; the revocation delay. Hard cap 1 hour."""
    cache_entries: int = Field(default=10_000, ge=1)
    probe_interval: float = Field(default=30.0, gt=0)
    timeout: float = Field(default=5.0, gt=0)
    retries: int = Field(default=3, ge=0, le=10)
    negative_ttl: float = Field(default=5.0, ge=0, le=60)
    """Seconds a denied generate / unwrap is remembered per (key, bucket) / wrapped key, so
    retries against a revoked key do not reach the KMS; 0 disables. Hard cap 60 s."""
    start_timeout: float = Field(default=30.0, gt=0, le=600)
    """Seconds start waits for a key's validation before marking it pending and listening."""
    providers: list[Literal["aws-kms", "gcp-kms", "azure-kv", "vault-transit"]] = Field(
        default_factory=list
    )
    vault: VaultConfig = Field(default_factory=VaultConfig)
    allowed_keys: list[str] = Field(default_factory=list)
    """Patterns of the key URIs that may be used (empty: any). ``*`` matches any run of
    characters except ``:`` (so an AWS account or a GCP project stays pinned), ``**`` any
    run, ``?`` one character except ``:``: ``aws-kms://arn:aws:kms:*:111122223333:key/*``,
    ``gcp-kms://projects/acme-keys/*``. The configuration, InitializeEncryptionSpec, API
    specs read from the store and rewrap targets are refused outside them."""

    @field_validator("allowed_keys")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for pattern in v:
            scheme, sep, rest = pattern.partition("://")
            if not sep or not scheme or "*" in scheme or not rest:
                raise ValueError(f"{pattern!r} must be <scheme>://<pattern>, e.g. gcp-kms://...")
        return v

    """Providers to load besides those the configured key URIs need: keys named only by
    specs made through the admin API need their provider loaded at start."""


class EncryptionRule(_Model):
    """One bucket or bucket/prefix spec: a key, or passthrough."""

    key: str | None = None
    replicas: list[str] = Field(default_factory=list, max_length=3)
    """Further key URIs holding the same role as ``key`` (AWS multi-region replicas, or
    keys in another provider): every data key is wrapped under each; reads fail over."""
    location: str | None = None
    passthrough: bool = False
    encrypted_since: datetime | None = None
    """When encryption was turned on for this path (set by the admin API on activation).
    Listings treat objects last modified before it as legacy plaintext; None: always."""

    @model_validator(mode="after")
    def _one(self) -> EncryptionRule:
        if self.passthrough == (self.key is not None):
            raise ValueError("give exactly one of 'key' or 'passthrough: true'")
        if self.replicas and (
            self.key in self.replicas or len(set(self.replicas)) != len(self.replicas)
        ):
            raise ValueError("replicas must be distinct key URIs other than 'key'")
        return self


class UnencryptedTtl(_Model):
    """Objects that declare a short life are stored as sent (the Anthropic document leaves
    data with a TTL under 24 hours unencrypted). Decided per PUT from its headers."""

    header: str | None = None
    """A request header holding the object's TTL in seconds (``x-amz-meta-ttl-seconds``)."""
    use_expires: bool = False
    """Also honour the standard ``Expires`` header (an HTTP date)."""
    max_seconds: float = Field(default=86400.0, gt=0)
    """Objects whose TTL is below this are stored as sent."""

    @field_validator("header")
    @classmethod
    def _lower(cls, v: str | None) -> str | None:
        return v.lower() if v else v

    @model_validator(mode="after")
    def _some(self) -> UnencryptedTtl:
        if self.header is None and not self.use_expires:
            raise ValueError("give 'header' or 'use_expires: true'")
        return self


class Encryption(_Model):
    default: EncryptionRule | Literal["refuse", "passthrough"] = "refuse"
    buckets: dict[str, EncryptionRule] = Field(default_factory=dict)
    """Keys are ``bucket`` or ``bucket/prefix``; the longest match wins."""
    unencrypted_paths: list[str] = Field(default_factory=list)
    """Globs (``bucket/cache/**``, ``*/tmp/*``) stored as sent: short-lived data."""
    unencrypted_ttl: UnencryptedTtl | None = None
    """Optional rule: objects whose TTL header is under a threshold are stored as sent."""
    strict: bool = False
    """Refuse to serve objects that are stored unencrypted on encrypted paths."""
    require_cmek: bool = False
    """Refuse passthrough specs and a passthrough default (config and admin API); the
    ``unencrypted_paths`` and ``unencrypted_ttl`` rules stay allowed (listed at start)."""


class Specs(_Model):
    """Encryption specs made through the admin API, shared by every replica."""

    control_bucket: str | None = None
    """Backend bucket whose reserved prefix ``.cmek-proxy/specs/`` holds API-made specs and
    operations (clients can never address it). None: the API cannot change specs."""
    poll_interval: float = Field(default=10.0, gt=0, le=300)
    """Seconds between a replica's reads of the spec store: the bound on how long other
    replicas take to see a change."""


class Gc(_Model):
    """The ``gc`` job run by the proxy itself: orphaned envelopes, state of aborted or
    expired uploads and job leftovers under the reserved prefix of every bucket."""

    interval: float = Field(default=3600.0, ge=0)
    """Seconds between runs (0: never; ``cmek-proxy job gc`` and the admin API still work)."""
    max_objects: int = Field(default=10_000, ge=1)
    """Reserved objects examined per run and bucket; the next run goes on where it stopped."""
    min_age: float = Field(default=3600.0, ge=0)
    """Only state older than this (backend clock) is removed: a write or job in flight keeps
    its own."""


class Logging(_Model):
    format: Literal["text", "json"] = "text"
    """``json``: one JSON object per line (``--log-format`` overrides)."""
    access_log: bool = True
    """One line per S3 request: request id, operation, status, bytes, durations."""
    include_names: bool = False
    """Also put bucket and object key in access lines (names can be personal data)."""


class Audit(_Model):
    path: Path | None = None
    """Hash-chained JSON-lines audit log; default ``<data_dir>/audit.jsonl``."""


class Config(_Model):
    listen: Listen = Field(default_factory=Listen)
    admin: Admin = Field(default_factory=Admin)
    region: str = "us-east-1"
    """The region clients sign their requests for."""
    clients: list[ClientKey] = Field(min_length=1)
    backend: Backend
    kms: Kms = Field(default_factory=Kms)
    encryption: Encryption = Field(default_factory=Encryption)
    max_clock_skew: float = Field(default=900.0, gt=0)
    virtual_host_domain: str | None = None
    """Base domain for virtual-host-style addressing (``bucket.<domain>``)."""
    data_dir: Path | None = None
    """Where the audit log and other local state live."""
    specs: Specs = Field(default_factory=Specs)
    audit: Audit = Field(default_factory=Audit)
    gc: Gc = Field(default_factory=Gc)
    logging: Logging = Field(default_factory=Logging)
    workers: int | None = Field(default=None, ge=1, le=256)
    """S3 worker processes (``serve``); None: the CPUs available to the process."""
    shutdown_grace: float = Field(default=30.0, ge=0, le=3600)
    """On SIGTERM, seconds that requests in flight get to finish (new connections refused)."""

    @model_validator(mode="after")
    def _audit_for_admin(self) -> Config:
        if self.admin.token is not None and self.audit_path() is None:
            raise ValueError(
                "admin.token enables the admin API, which needs an audit log: "
                "set audit.path or data_dir"
            )
        return self

    @model_validator(mode="after")
    def _key_policy(self) -> Config:
        problems: list[str] = []
        rules = [("encryption.default", self.encryption.default)] + [
            (f"encryption.buckets.{name}", rule) for name, rule in self.encryption.buckets.items()
        ]
        for where, rule in rules:
            problem = rule_refusal(self, rule)
            if problem:
                problems.append(f"{where}: {problem}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def audit_path(self) -> Path | None:
        if self.audit.path is not None:
            return self.audit.path
        if self.data_dir is not None:
            return self.data_dir / "audit.jsonl"
        return None

    def key_uris(self) -> list[str]:
        """Every configured key URI, replicas included."""
        uris: list[str] = []
        for rule in self.rules():
            if rule.key:
                uris += [rule.key, *rule.replicas]
        return sorted(set(uris))

    def rules(self) -> list[EncryptionRule]:
        """The default rule (if it is one) and every bucket rule."""
        d = self.encryption.default
        out = [d] if isinstance(d, EncryptionRule) else []
        return out + list(self.encryption.buckets.values())


@lru_cache(maxsize=512)
def glob_regex(pattern: str, sep: str) -> re.Pattern[str]:
    """A glob as a regex: ``**`` crosses ``sep``, ``*`` and ``?`` do not."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] in "*?":
            out.append(f"[^{re.escape(sep)}]" + ("*" if pattern[i] == "*" else ""))
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _key_pattern(pattern: str) -> re.Pattern[str]:
    return glob_regex(pattern, ":")


def key_refusal(config: Config, key_uri: str) -> str | None:
    """Why ``kms.allowed_keys`` refuses a key URI (a message naming the rule), or None."""
    patterns = config.kms.allowed_keys
    if not patterns or any(_key_pattern(p).match(key_uri) for p in patterns):
        return None
    return f"key {key_uri} is not allowed by kms.allowed_keys {patterns}"


def rule_refusal(config: Config, rule: EncryptionRule | str) -> str | None:
    """Why the key policy refuses a spec (``allowed_keys``, ``require_cmek``), or None."""
    passthrough = rule == "passthrough" or (isinstance(rule, EncryptionRule) and rule.passthrough)
    if passthrough and config.encryption.require_cmek:
        return "passthrough is refused by encryption.require_cmek: true"
    if isinstance(rule, EncryptionRule) and rule.key is not None:
        for uri in (rule.key, *rule.replicas):
            refusal = key_refusal(config, uri)
            if refusal is not None:
                return refusal
    return None


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[path[-1]] = value


def apply_env(tree: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        try:
            value = yaml.safe_load(raw) if raw else raw
        except yaml.YAMLError:
            value = raw
        _set_path(tree, path, value)
    return tree


def _format_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        lines.append(f"{loc or '<root>'}: {err['msg']}")
    return "invalid configuration: " + "; ".join(lines)


def parse_config(tree: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    data = apply_env(dict(tree), os.environ if environ is None else environ)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable (permission denied)") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return parse_config(raw, environ)
