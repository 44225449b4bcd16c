from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import load_config, parse_config
from proxy.control.policy import Policy
from proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["serve.example.yaml", "dev.example.yaml"])
def test_examples_parse(name: str) -> None:
    cfg = load_config(ROOT / "config" / name, environ={})
    assert cfg.clients


def test_env_override_and_error_names_field(tmp_path: Path) -> None:
    src = (ROOT / "config" / "dev.example.yaml").read_text()
    f = tmp_path / "c.yaml"
    f.write_text(src)
    cfg = load_config(f, environ={"CMEK_PROXY__KMS__CACHE_TTL": "42"})
    assert cfg.kms.cache_ttl == 42
    with pytest.raises(ConfigError, match=r"kms\.cache_ttl"):
        load_config(f, environ={"CMEK_PROXY__KMS__CACHE_TTL": "7200"})
    with pytest.raises(ConfigError, match=r"backend\.endpoint"):
        load_config(f, environ={"CMEK_PROXY__BACKEND__ENDPOINT": "ftp://x"})
    with pytest.raises(ConfigError, match=r"listen\.port"):
        load_config(f, environ={"CMEK_PROXY__LISTEN__PORT": "not-a-port"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_policy_longest_match_and_unencrypted_paths() -> None:
    cfg = load_config(ROOT / "config" / "serve.example.yaml", environ={})
    p = Policy(cfg.encryption)
    assert p.decide("medical-records", "a/b").key_uri is not None
    assert p.decide("medical-records", "cache/x").rule == "unencrypted-path"
    assert p.decide("analytics", "exports/x").key_uri.startswith("gcp-kms://")  # type: ignore[union-attr]
    assert p.decide("analytics", "tmp/x").rule == "unencrypted-path"
    assert p.decide("analytics", "other").refuse
    assert not p.decide("public-assets", "x").encrypt and not p.decide("public-assets", "x").refuse
    assert p.decide("elsewhere", "x").refuse


def test_bad_rule_names_field() -> None:
    with pytest.raises(ConfigError, match=r"encryption\.buckets\.b"):
        parse_config(
            {
                "clients": [{"access_key": "abc", "secret_key": "12345678"}],
                "backend": {"endpoint": "http://x", "access_key": "a", "secret_key": "b"},
                "encryption": {"buckets": {"b": {"key": "local://x", "passthrough": True}}},
            },
            environ={},
        )
