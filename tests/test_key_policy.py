"""Allowed-key policy (``kms.allowed_keys``) and ``encryption.require_cmek``.

Config: keys outside the patterns and passthrough under require_cmek are refused with a
message naming the rule.  End to end (moto backend, ``local://`` keys): a permissive replica
stores API specs the strict replica's policy refuses; the strict replica refuses writes
under them (403 naming the rule, the refused key is never called), refuses them at
InitializeEncryptionSpec and as rewrap targets, and writes all of it to the audit log.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from proxy.config import parse_config
from proxy.errors import ConfigError
from tests.servers import ProxyThread, Server, new_keyfile
from tests.test_admin_api import admin_config, call, wait_op

BASE: dict[str, Any] = {
    "clients": [{"access_key": "client", "secret_key": "client-secret"}],
    "backend": {"endpoint": "http://127.0.0.1:1", "access_key": "a", "secret_key": "b"},
}
ACME = "aws-kms://arn:aws:kms:*:111122223333:key/*"


def _parse(**tree: Any) -> Any:
    return parse_config({**BASE, **tree}, environ={})


def test_config_refuses_a_key_outside_allowed_keys_naming_the_rule() -> None:
    with pytest.raises(ConfigError) as ei:
        _parse(
            kms={"allowed_keys": [ACME]},
            encryption={
                "default": {"key": "aws-kms://arn:aws:kms:eu-west-1:111122223333:key/ok"},
                "buckets": {"b": {"key": "aws-kms://arn:aws:kms:eu-west-1:999999999999:key/x"}},
            },
        )
    msg = str(ei.value)
    assert "encryption.buckets.b" in msg and "kms.allowed_keys" in msg and ACME in msg
    assert "999999999999" in msg and "encryption.default" not in msg


def test_star_does_not_cross_colons_but_crosses_slashes() -> None:
    sneaky = "aws-kms://arn:aws:kms:eu-west-1:999999999999:key/x:111122223333:key/y"
    with pytest.raises(ConfigError):
        _parse(kms={"allowed_keys": [ACME]}, encryption={"default": {"key": sneaky}})
    gcp = "gcp-kms://projects/acme-keys/locations/eu/keyRings/r/cryptoKeys/k"
    _parse(
        kms={"allowed_keys": ["gcp-kms://projects/acme-keys/*"]},
        encryption={"default": {"key": gcp}},
    )
    with pytest.raises(ConfigError):
        _parse(
            kms={"allowed_keys": ["gcp-kms://projects/acme-keys/*"]},
            encryption={"default": {"key": gcp.replace("acme-keys", "acme-keys-evil")}},
        )
    with pytest.raises(ConfigError, match="allowed_keys"):
        _parse(kms={"allowed_keys": ["no-scheme-*"]})


def test_require_cmek_refuses_passthrough_but_keeps_short_lived_paths() -> None:
    for enc in (
        {"default": "passthrough"},
        {"default": {"passthrough": True}},
        {"default": "refuse", "buckets": {"logs": {"passthrough": True}}},
    ):
        with pytest.raises(ConfigError, match="require_cmek"):
            _parse(encryption={"require_cmek": True, **enc})
    cfg = _parse(
        encryption={
            "require_cmek": True,
            "default": "refuse",
            "unencrypted_paths": ["*/tmp/**"],
            "unencrypted_ttl": {"header": "x-amz-meta-ttl-seconds"},
        }
    )
    assert cfg.encryption.unencrypted_paths == ["*/tmp/**"]


def _audit(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_strict_replica_refuses_specs_outside_the_policy(
    moto: Server, keyfile: Path, tmp_path: Path
) -> None:
    allowed_dir = tmp_path / "allowed"
    other_dir = tmp_path / "other"
    allowed_dir.mkdir()
    other_dir.mkdir()
    good = f"local://{new_keyfile(allowed_dir / 'k.json')}"
    foreign_path = new_keyfile(other_dir / "k.json")
    foreign = f"local://{foreign_path}"
    control = f"cmek-control-{time.monotonic_ns()}"
    stamp = time.monotonic_ns()
    enc_bucket, plain_bucket = f"foreign-{stamp}", f"plain-{stamp}"

    (tmp_path / "a").mkdir()
    loose = admin_config(moto, keyfile, tmp_path / "a")
    loose = loose.model_copy(
        update={"specs": loose.specs.model_copy(update={"control_bucket": control})}
    )
    with ProxyThread(loose) as a:
        ca = a.client()
        for name in (enc_bucket, plain_bucket):
            ca.create_bucket(Bucket=name)
        for name, spec in (
            (enc_bucket, {"kms_key": foreign}),
            (plain_bucket, {"passthrough": True}),
        ):
            r = call(
                a,
                "POST",
                f"/v1/buckets/{name}/encryptionSpec:initialize",
                {"encryption_spec": spec},
            )
            assert r.status_code == 200
            assert "error" not in wait_op(a, r.json()["name"])
        ca.put_object(Bucket=enc_bucket, Key="old", Body=b"written under the foreign key")

    (tmp_path / "b").mkdir()
    strict = admin_config(
        moto,
        keyfile,
        tmp_path / "b",
        kms={"allowed_keys": [f"local://{allowed_dir}/*"]},
        encryption={
            "default": {"key": good},
            "require_cmek": True,
            "unencrypted_paths": ["*/tmp/**"],
        },
    )
    strict = strict.model_copy(
        update={"specs": strict.specs.model_copy(update={"control_bucket": control})}
    )
    foreign_path.chmod(0o000)  # any call with the refused key would fail loudly
    try:
        with ProxyThread(strict) as b:
            cb = b.client()
            for bucket, rule in ((enc_bucket, "kms.allowed_keys"), (plain_bucket, "require_cmek")):
                with pytest.raises(ClientError) as ei:
                    cb.put_object(Bucket=bucket, Key="new", Body=b"x")
                assert ei.value.response["Error"]["Code"] == "AccessDenied"
                assert rule in ei.value.response["Error"]["Message"]
            # short-lived paths stay allowed
            cb.put_object(Bucket=plain_bucket, Key="tmp/x", Body=b"scratch")

            r = call(
                b,
                "POST",
                f"/v1/buckets/{enc_bucket}/encryptionSpec:initialize",
                {"encryption_spec": {"kms_key": foreign}},
            )
            assert r.status_code == 400
            err = r.json()["error"]
            assert err["status"] == "FAILED_PRECONDITION" and "kms.allowed_keys" in err["message"]
            r = call(
                b,
                "POST",
                f"/v1/buckets/{plain_bucket}/encryptionSpec:initialize",
                {"encryption_spec": {"passthrough": True}},
            )
            assert r.status_code == 400 and "require_cmek" in r.json()["error"]["message"]
            r = call(
                b,
                "POST",
                f"/v1/buckets/{enc_bucket}/jobs",
                {"job": "rewrap", "target_key": foreign},
            )
            assert r.status_code == 400 and "kms.allowed_keys" in r.json()["error"]["message"]
            # an allowed spec replaces the refused one
            r = call(
                b,
                "POST",
                f"/v1/buckets/{enc_bucket}/encryptionSpec:initialize",
                {"encryption_spec": {"kms_key": good}},
            )
            assert "error" not in wait_op(b, r.json()["name"])
            cb.put_object(Bucket=enc_bucket, Key="new", Body=b"x")
            assert cb.head_object(Bucket=enc_bucket, Key="new")["SSEKMSKeyId"] == good
    finally:
        foreign_path.chmod(0o600)

    events = _audit(tmp_path / "b" / "audit.jsonl")
    loaded = next(e for e in events if e["event"] == "policy.loaded")
    assert loaded["require_cmek"] is True and loaded["allowed_keys"] == [f"local://{allowed_dir}/*"]
    assert loaded["unencrypted_paths"] == ["*/tmp/**"]
    refused = [e for e in events if e["event"] == "spec.refused"]
    assert {e["spec"] for e in refused} == {enc_bucket, plain_bucket}
    assert any(e["event"] == "job.refused" for e in events)
