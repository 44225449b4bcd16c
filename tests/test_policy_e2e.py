"""Policy end to end on moto and rclone: passthrough rules, legacy plaintext, strict mode;
and the pure parts the data path asks (TTL rule, activation time)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from botocore.exceptions import ClientError

from proxy.config import Encryption, EncryptionRule, UnencryptedTtl
from proxy.control.policy import RULE_PATH, RULE_TTL, Policy
from tests.servers import ProxyThread, Server, proxy_config

BODY = b"stored as sent? " * 100


def _bucket(client: Any, name: str) -> str:
    bucket = f"{name}-{time.monotonic_ns()}"
    client.create_bucket(Bucket=bucket)
    return bucket


def test_passthrough_rules_store_sent_bytes_and_encrypt_elsewhere(
    backend: Server, keyfile: Path, direct: Any
) -> None:
    config = proxy_config(
        backend.url,
        keyfile,
        encryption={
            "default": {"key": f"local://{keyfile}"},
            "unencrypted_paths": ["*/cache/**", "*/tmp/"],
            "buckets": {},
        },
    )
    with ProxyThread(config) as p:
        c = p.client()
        bucket = _bucket(c, "rules")
        for key in ("cache/a/b.bin", "tmp/x", "data/y"):
            c.put_object(Bucket=bucket, Key=key, Body=BODY)
            assert c.get_object(Bucket=bucket, Key=key)["Body"].read() == BODY
        for key in ("cache/a/b.bin", "tmp/x"):
            assert direct.get_object(Bucket=bucket, Key=key)["Body"].read() == BODY
            assert "ServerSideEncryption" not in c.head_object(Bucket=bucket, Key=key)
        raw = direct.get_object(Bucket=bucket, Key="data/y")["Body"].read()
        assert raw != BODY and BODY[:16] not in raw
        metrics = requests.get(p.admin + "/metrics", timeout=10).text
        assert f'rule="{RULE_PATH}"' in metrics


def test_passthrough_spec_for_a_prefix(backend: Server, keyfile: Path, direct: Any) -> None:
    bucket = f"pfx-{time.monotonic_ns()}"
    config = proxy_config(
        backend.url,
        keyfile,
        encryption={
            "default": {"key": f"local://{keyfile}"},
            "buckets": {f"{bucket}/public": {"passthrough": True}},
        },
    )
    with ProxyThread(config) as p:
        c = p.client()
        c.create_bucket(Bucket=bucket)
        c.put_object(Bucket=bucket, Key="public/p", Body=BODY)
        c.put_object(Bucket=bucket, Key="private/p", Body=BODY)
        assert direct.get_object(Bucket=bucket, Key="public/p")["Body"].read() == BODY
        assert direct.get_object(Bucket=bucket, Key="private/p")["Body"].read() != BODY


def test_legacy_plaintext_is_served_and_counted_strict_refuses(
    backend: Server, keyfile: Path, direct: Any
) -> None:
    bucket = f"legacy-{time.monotonic_ns()}"
    direct.create_bucket(Bucket=bucket)
    direct.put_object(Bucket=bucket, Key="old.txt", Body=BODY)  # before CMEK was turned on
    # Start the proxy in a later second than the object's Last-Modified: the activation record
    # then dates the object as older (same-second objects count as encrypted, see activation).
    written = direct.head_object(Bucket=bucket, Key="old.txt")["LastModified"].timestamp()
    time.sleep(max(0.0, written + 1.05 - time.time()))
    # Metadata envelopes on both backends (rclone keeps them while it runs): with sidecar
    # envelopes an envelope-less object on an encrypted path is refused instead, see
    # tests/test_e2e_core.py::test_legacy_plaintext_object_served_as_stored.
    with ProxyThread(proxy_config(backend.url, keyfile, envelope_store="metadata")) as p:
        c = p.client()
        assert c.get_object(Bucket=bucket, Key="old.txt")["Body"].read() == BODY
        c.put_object(Bucket=bucket, Key="new.txt", Body=BODY)
        assert direct.get_object(Bucket=bucket, Key="new.txt")["Body"].read() != BODY
        metrics = requests.get(p.admin + "/metrics", timeout=10).text
        assert 'cmek_plaintext_reads_total{reason="legacy"}' in metrics
    strict = proxy_config(
        backend.url,
        keyfile,
        envelope_store="metadata",
        encryption={"default": {"key": f"local://{keyfile}"}, "strict": True},
    )
    with ProxyThread(strict) as p:
        c = p.client()
        with pytest.raises(ClientError):
            c.get_object(Bucket=bucket, Key="old.txt")
        assert c.get_object(Bucket=bucket, Key="new.txt")["Body"].read() == BODY


def test_ttl_rule_decides_from_headers() -> None:
    enc = Encryption(
        default=EncryptionRule(key="local:///k"),
        unencrypted_ttl=UnencryptedTtl(header="X-Amz-Meta-TTL-Seconds", use_expires=True),
    )
    now = 1_700_000_000.0
    policy = Policy(enc, clock=lambda: now)
    assert policy.decide("b", "k", {"x-amz-meta-ttl-seconds": "3600"}).rule == RULE_TTL
    assert policy.decide("b", "k", {"x-amz-meta-ttl-seconds": "90000"}).encrypt
    assert policy.decide("b", "k", {"x-amz-meta-ttl-seconds": "soon"}).encrypt
    assert policy.decide("b", "k").encrypt
    soon = format_datetime(datetime.fromtimestamp(now + 600, UTC), usegmt=True)
    later = format_datetime(datetime.fromtimestamp(now + 10 * 86400, UTC), usegmt=True)
    assert policy.decide("b", "k", {"Expires": soon}).rule == RULE_TTL
    assert policy.decide("b", "k", {"Expires": later}).encrypt
    # a stored object's headers tell reads that it was let through, not legacy
    assert not policy.may_be_encrypted("b", "k", headers={"x-amz-meta-ttl-seconds": "60"})


def test_activation_time_marks_older_objects_as_legacy() -> None:
    since = datetime(2025, 1, 1, tzinfo=UTC)
    enc = Encryption(buckets={"b": EncryptionRule(key="local:///k", encrypted_since=since)})
    policy = Policy(enc)
    assert not policy.may_be_encrypted("b", "k", since.timestamp() - 1)
    assert policy.may_be_encrypted("b", "k", since.timestamp() + 1)
    assert policy.may_be_encrypted("b", "k")
    assert not policy.may_be_encrypted("other", "k")
