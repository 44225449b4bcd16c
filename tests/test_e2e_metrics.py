"""Metrics end to end, and the operability artefacts (Grafana dashboard, Kubernetes example).

The proxy talks to OpenBao through the counting front, so every KMS call the proxy
records in ``cmek_kms_request_duration_seconds_count`` can be compared with the calls the
server really received.  Label values stay bounded: no bucket or object name appears.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from botocore.exceptions import ClientError

from proxy.config import parse_config
from tests import kms_servers
from tests.kms_servers import ErrorFront, MotoServer, OpenBaoServer
from tests.servers import BACKEND_AK, BACKEND_SK, ProxyThread, proxy_config, s3_client
from tests.test_e2e_kms import (
    data,
    e2e_config,
    no_retry_client,
    sample,
    scrape,
    uniq,
    vault_clients,
    vault_uri,
    wait_for,
)

moto_server = kms_servers.moto_server
openbao = kms_servers.openbao
vault_front = kms_servers.vault_front

REPO = Path(__file__).resolve().parent.parent
OPS = {"generate_data_key": "datakey/plaintext", "wrap": "encrypt", "unwrap": "decrypt"}
OUTCOMES = ("ok", "denied", "unreachable", "error")
LABEL_NAMES = {"provider", "operation", "outcome", "kind", "reason", "key", "status", "rule", "le"}
LABEL_NAMES |= {"state", "job", "hash", "version", "python"}  # breakers, jobs, audit, build
LABEL_NAMES |= {"implementation", "major", "minor", "patchlevel"}  # python_info
COUNT = "cmek_kms_request_duration_seconds_count"


def _front_calls(front: ErrorFront, name: str) -> dict[str, int]:
    return {op: front.calls[f"/v1/transit/{path}/{name}"] for op, path in OPS.items()}


def _recorded(p: ProxyThread) -> dict[str, int]:
    s = scrape(p)
    return {
        op: int(
            sum(
                sample(s, COUNT, provider="vault-transit", operation=op, outcome=o)
                for o in OUTCOMES
            )
        )
        for op in OPS
    }


def _matches(p: ProxyThread, front: ErrorFront, name: str) -> bool:
    return _recorded(p) == _front_calls(front, name)


def test_kms_metrics_match_server_calls(
    openbao: OpenBaoServer, vault_front: ErrorFront, moto_server: MotoServer, tmp_path: Path
) -> None:
    name = uniq("met")
    token = openbao.create_key(name)
    uri = vault_uri(vault_front.host, name)
    # no denial cache: the write right after reinstatement below must reach the KMS
    config = e2e_config(moto_server.endpoint_url, uri, tmp_path, negative_ttl=0)
    with ProxyThread(config, kms_clients=vault_clients(token)) as p:
        # start-up: validation (encrypt + decrypt) and the first probe (datakey + decrypt);
        # the probe runs in the background, so wait for all four calls, then for the metrics
        startup = {"generate_data_key": 1, "wrap": 1, "unwrap": 2}
        wait_for(
            lambda: _front_calls(vault_front, name) == startup and _matches(p, vault_front, name),
            10,
            "start-up calls recorded",
        )
        s0 = scrape(p)
        assert sample(s0, "cmek_key_available", key=uri) == 1.0

        c = no_retry_client(p)
        bucket = uniq("metrics-bucket-")
        c.create_bucket(Bucket=bucket)
        bodies = {f"secret/object-{i}.bin": data(10_000 * (i + 1), 40) for i in range(3)}
        for key, body in bodies.items():
            c.put_object(Bucket=bucket, Key=key, Body=body)
        for key, body in bodies.items():
            assert c.get_object(Bucket=bucket, Key=key)["Body"].read() == body
        rng = c.get_object(Bucket=bucket, Key="secret/object-2.bin", Range="bytes=10-99")
        assert rng["Body"].read() == bodies["secret/object-2.bin"][10:100]
        s1 = scrape(p)
        # one data key for three PUTs; the reads found it cached under its wrapped form
        assert (
            sample(s1, "cmek_key_cache_misses_total", kind="write")
            - sample(s0, "cmek_key_cache_misses_total", kind="write")
            == 1
        )
        assert (
            sample(s1, "cmek_key_cache_hits_total", kind="write")
            - sample(s0, "cmek_key_cache_hits_total", kind="write")
            == 2
        )
        assert (
            sample(s1, "cmek_key_cache_hits_total", kind="read")
            - sample(s0, "cmek_key_cache_hits_total", kind="read")
            == 4
        )
        assert _recorded(p) == _front_calls(vault_front, name)

        # revoke: the next call that needs the KMS (a write to a new bucket) is denied
        openbao.deny(name)
        other = uniq("metrics-other-")
        c.create_bucket(Bucket=other)
        with pytest.raises(ClientError) as ei:
            c.put_object(Bucket=other, Key="x", Body=b"x")
        assert ei.value.response["Error"]["Code"] == "AccessDenied"
        s2 = scrape(p)
        assert sample(s2, "cmek_key_available", key=uri) == 0.0
        assert (
            sample(
                s2, COUNT, provider="vault-transit", operation="generate_data_key", outcome="denied"
            )
            == 1
        )
        assert sample(s2, "cmek_key_cache_evictions_total", kind="read", reason="denied") >= 1
        openbao.allow(name)
        c.put_object(Bucket=other, Key="x", Body=b"x")
        assert c.get_object(Bucket=other, Key="x")["Body"].read() == b"x"
        s3 = scrape(p)
        assert sample(s3, "cmek_key_available", key=uri) == 1.0
        wait_for(lambda: _matches(p, vault_front, name), 5, "KMS calls recorded")

        # S3 side: request durations by operation and status, bytes in and out
        s3_counts = {
            dict(labels)["operation"]: v
            for (n, labels), v in s3.items()
            if n == "cmek_s3_request_duration_seconds_count" and dict(labels)["status"] == "200"
        }
        assert len(s3_counts) >= 2 and all(v > 0 for v in s3_counts.values())
        assert any(
            n == "cmek_s3_request_duration_seconds_count" and dict(labels)["status"] == "403"
            for (n, labels) in s3
        )
        assert sample(s3, "cmek_s3_bytes_in_total") >= sum(len(b) for b in bodies.values())
        assert sample(s3, "cmek_s3_bytes_out_total") >= sum(len(b) for b in bodies.values())
        assert ("cmek_integrity_failures_total", frozenset()) in s3

        # bounded labels: known names only, never a bucket or an object name
        names = {bucket, other, *bodies, "secret", "x"}
        for (_, labels), _v in s3.items():
            for label, value in labels:
                assert label in LABEL_NAMES, label
                assert not any(n in value for n in names if n != "x"), (label, value)
                assert value != "x"


# ---- Grafana dashboard ------------------------------------------------------------------


def test_grafana_dashboard_is_well_formed() -> None:
    doc = json.loads((REPO / "config" / "grafana-dashboard.json").read_text())
    assert doc["title"] and doc["uid"] and isinstance(doc["panels"], list)
    exprs = [t["expr"] for panel in doc["panels"] for t in panel.get("targets", [])]
    joined = "\n".join(exprs)
    for metric in (
        "cmek_kms_request_duration_seconds_bucket",
        "cmek_key_cache_hits_total",
        "cmek_key_cache_misses_total",
        "cmek_key_available",
        "cmek_s3_request_duration_seconds_count",
        "cmek_s3_request_duration_seconds_bucket",
        "cmek_s3_bytes_in_total",
        "cmek_s3_bytes_out_total",
        "cmek_integrity_failures_total",
    ):
        assert metric in joined, metric
    assert "histogram_quantile(0.99" in joined and "histogram_quantile(0.5" in joined
    ids = [panel["id"] for panel in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        assert panel["title"] and panel["type"] and "gridPos" in panel


# ---- Kubernetes sidecar example ---------------------------------------------------------


def _k8s_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((REPO / "config" / "kubernetes").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def test_kubernetes_example_parses_and_config_is_valid() -> None:
    docs = _k8s_docs()
    by_kind = {d["kind"]: d for d in docs}
    assert {"Deployment", "ConfigMap", "Secret"} <= set(by_kind)
    deploy, cm, secret = by_kind["Deployment"], by_kind["ConfigMap"], by_kind["Secret"]
    pod = deploy["spec"]["template"]["spec"]
    # the proxy is a native sidecar: an init container with restartPolicy Always
    containers = {c["name"]: c for c in pod["containers"] + pod.get("initContainers", [])}
    assert len(containers) == 2 and "cmek-proxy" in containers
    sidecar = containers["cmek-proxy"]
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["readinessProbe"]["httpGet"]["port"] in ("admin", ports["admin"])
    assert sidecar["livenessProbe"]["httpGet"]["port"] in ("admin", ports["admin"])

    # the config file comes from the ConfigMap, overrides from the Secret
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    cfg_vol = next(n for n, v in volumes.items() if "configMap" in v)
    assert volumes[cfg_vol]["configMap"]["name"] == cm["metadata"]["name"]
    assert cfg_vol in mounts
    secret_name = secret["metadata"]["name"]
    env = sidecar["env"]
    overrides = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["key"]
        for e in env
        if e["name"].startswith("CMEK_PROXY__")
    }
    assert all(
        e["valueFrom"]["secretKeyRef"]["name"] == secret_name
        for e in env
        if e["name"].startswith("CMEK_PROXY__")
    )
    assert "CMEK_PROXY__ENCRYPTION__DEFAULT__KEY" in overrides
    assert "CMEK_PROXY__BACKEND__SECRET_KEY" in overrides

    # the app reaches the proxy on loopback
    app = next(c for n, c in containers.items() if n != "cmek-proxy")
    app_env = {e["name"]: e.get("value") for e in app.get("env", [])}
    assert app_env["AWS_ENDPOINT_URL_S3"] == f"http://127.0.0.1:{ports['s3']}"

    # the ConfigMap's config, after the Secret's env overrides, is a valid proxy config
    (cfg_text,) = cm["data"].values()
    values = secret["stringData"]
    environ = {name: values[key] for name, key in overrides.items()}
    config = parse_config(yaml.safe_load(cfg_text), environ=environ)
    assert config.listen.port == ports["s3"] and config.admin.port == ports["admin"]
    assert config.admin.host == "0.0.0.0"  # kubelet probes come from outside the pod netns
    assert config.key_uris() == [values[overrides["CMEK_PROXY__ENCRYPTION__DEFAULT__KEY"]]]
    assert config.backend.secret_key == values[overrides["CMEK_PROXY__BACKEND__SECRET_KEY"]]
    assert "secret_key" not in cfg_text  # secrets stay out of the ConfigMap


def test_kms_retries_and_breaker_state_are_exported(
    openbao: OpenBaoServer, vault_front: ErrorFront, moto_server: MotoServer, tmp_path: Path
) -> None:
    """A KMS 503 that a retry gets past is counted as a retry; the breaker stays closed."""
    name = uniq("retry")
    token = openbao.create_key(name)
    uri = vault_uri(vault_front.host, name)
    config = e2e_config(moto_server.endpoint_url, uri, tmp_path)
    with ProxyThread(config, kms_clients=vault_clients(token)) as p:
        startup = {"generate_data_key": 1, "wrap": 1, "unwrap": 2}
        wait_for(lambda: _front_calls(vault_front, name) == startup, 10, "start-up calls")
        retries = "cmek_kms_retries_total"
        assert (
            sample(scrape(p), retries, provider="vault-transit", operation="generate_data_key") == 0
        )
        vault_front.inject_json(
            f"/v1/transit/datakey/plaintext/{name}", 503, {"errors": ["injected"]}, times=1
        )
        c = no_retry_client(p)
        bucket = uniq("retry-bucket-")
        c.create_bucket(Bucket=bucket)
        c.put_object(Bucket=bucket, Key="k", Body=b"retried once")
        s = scrape(p)
        assert sample(s, retries, provider="vault-transit", operation="generate_data_key") == 1
        assert sample(s, "cmek_kms_breaker_state", key=uri, state="closed") == 1
        assert sample(s, "cmek_kms_breaker_state", key=uri, state="open") == 0


def test_job_progress_is_exported_while_a_job_runs(
    openbao: OpenBaoServer, vault_front: ErrorFront, moto_server: MotoServer, tmp_path: Path
) -> None:
    """A verify job started through the admin API shows in cmek_jobs_running and
    cmek_job_objects while it runs (held on its KMS unwrap), and leaves them when done."""
    name = uniq("jobm")
    token = openbao.create_key(name)
    uri = vault_uri(vault_front.host, name)
    bucket = uniq("job-metrics-")
    admin_token = "job-metrics-admin-token-0123"
    config = proxy_config(
        moto_server.endpoint_url,
        tmp_path / "unused-keyfile.json",
        encryption={"default": {"key": uri}},
        kms={"probe_interval": 3600},
        admin={"host": "127.0.0.1", "port": 0, "token": admin_token},
        audit={"path": str(tmp_path / "audit.jsonl")},
    )
    with ProxyThread(config, kms_clients=vault_clients(token)) as writer:
        c = no_retry_client(writer)
        c.create_bucket(Bucket=bucket)
        c.put_object(Bucket=bucket, Key="b-encrypted", Body=b"e" * 1000)
        decrypt = f"/v1/transit/decrypt/{name}"
        wait_for(lambda: vault_front.calls[decrypt] == 2, 10, "writer's start-up calls")
    direct = s3_client(moto_server.endpoint_url, BACKEND_AK, BACKEND_SK)
    direct.put_object(Bucket=bucket, Key="a-legacy", Body=b"p" * 10)  # listed first
    with ProxyThread(config, kms_clients=vault_clients(token)) as p:
        # a fresh proxy: its start-up calls done, its read cache empty
        wait_for(lambda: vault_front.calls[decrypt] == 4, 10, "start-up calls")
        vault_front.inject_hang(decrypt, 3.0)
        headers = {"Authorization": f"Bearer {admin_token}"}
        body = {"job": "verify", "concurrency": 1}
        op = requests.post(
            f"{p.admin}/v1/buckets/{bucket}/jobs", json=body, headers=headers, timeout=10
        ).json()["name"]
        wait_for(
            lambda: (
                sample(scrape(p), "cmek_jobs_running", job="verify") == 1
                and sample(scrape(p), "cmek_job_objects", job="verify", outcome="plaintext-legacy")
                == 1
            ),
            10,
            "the running job in the metrics",
        )

        def done() -> bool:
            got = requests.get(f"{p.admin}/v1/{op}", headers=headers, timeout=10).json()
            return bool(got.get("done"))

        wait_for(done, 30, "job done")
        s = scrape(p)
        assert sample(s, "cmek_jobs_running", job="verify") == 0
        assert ("cmek_job_objects", frozenset({("job", "verify"), ("outcome", "ok")})) not in s
