"""Metrics an operator reads: S3 operation names, in-flight, backend time and errors, process
and build metrics, breakers, spec-poll age, jobs; counters that count what they say; and the
shipped alert rules and dashboard, checked against what a live proxy exports."""

from __future__ import annotations

import io
import json
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import yaml
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

import proxy
from proxy.wire.operations import operation_name
from tests.servers import ProxyThread, Server, free_port, proxy_config, wait_until

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_text(p: ProxyThread) -> str:
    return requests.get(p.admin + "/metrics", timeout=10).text


def samples(p: ProxyThread) -> Samples:
    out: Samples = {}
    for line in scrape_text(p).splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
        assert m, line
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        out[(m.group(1), labels)] = float(m.group(4))
    return out


def value(s: Samples, name: str, **labels: str) -> float:
    return s.get((name, frozenset(labels.items())), 0.0)


def by_label(s: Samples, name: str, label: str, **match: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, labels), v in s.items():
        d = dict(labels)
        if n == name and all(d.get(k) == x for k, x in match.items()):
            out[d[label]] = out.get(d[label], 0.0) + v
    return out


def exported_names(text: str) -> set[str]:
    """Every sample name the exposition can hold, from its TYPE lines and its samples."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
            if kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@pytest.fixture(scope="module")
def ops_proxy(
    moto: Server, keyfile: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyThread]:
    tmp = tmp_path_factory.mktemp("ops")
    config = proxy_config(
        moto.url,
        keyfile,
        admin={"host": "127.0.0.1", "port": 0, "token": "ops-admin-token-0123456789"},
        specs={"control_bucket": "cmek-ops-control", "poll_interval": 0.2},
        audit={"path": str(tmp / "audit.jsonl")},
        encryption={
            "default": {"key": f"local://{keyfile}"},
            "buckets": {"ops-public": {"passthrough": True}},
        },
    )
    with ProxyThread(config) as p:
        yield p


def test_operation_names_are_s3_names() -> None:
    def name(method: str, key: bool = True, *query: str, **headers: str) -> str:
        return operation_name(method, bucket=True, key=key, query=set(query), headers=headers)

    assert name("POST", True, "uploads") == "CreateMultipartUpload"
    assert name("PUT", True, "partNumber", "uploadId") == "UploadPart"
    assert name("PUT", True, "partNumber", "uploadId", **{"x-amz-copy-source": "b/k"}) == (
        "UploadPartCopy"
    )
    assert name("POST", True, "uploadId") == "CompleteMultipartUpload"
    assert name("DELETE", True, "uploadId") == "AbortMultipartUpload"
    assert name("GET", True, "uploadId") == "ListParts"
    assert name("PUT", True, **{"x-amz-copy-source": "b/k"}) == "CopyObject"
    assert name("GET", False, "list-type", "prefix") == "ListObjectsV2"
    assert name("GET", False, "prefix") == "ListObjects"
    assert name("GET", True, "attributes") == "GetObjectAttributes"
    assert name("PUT", False, "encryption") == "PutBucketEncryption"
    assert name("PUT", False) == "CreateBucket"
    assert name("POST", False, "delete") == "DeleteObjects"
    assert name("GET", False, "uploads") == "ListMultipartUploads"
    assert name("PUT", True, "tagging") == "PutObjectTagging"
    assert operation_name("GET", bucket=False, key=False, query=()) == "ListBuckets"
    assert name("PATCH") == "UnknownOperation"


def test_live_metrics_name_s3_operations_and_the_backend(ops_proxy: ProxyThread) -> None:
    c = ops_proxy.client()
    c.create_bucket(Bucket="ops-names")
    c.put_object(Bucket="ops-names", Key="a", Body=b"a" * 100)
    c.list_objects_v2(Bucket="ops-names")
    c.list_objects(Bucket="ops-names")
    c.head_object(Bucket="ops-names", Key="a")
    c.get_object(Bucket="ops-names", Key="a")["Body"].read()
    c.copy_object(Bucket="ops-names", Key="b", CopySource={"Bucket": "ops-names", "Key": "a"})
    c.upload_fileobj(
        io.BytesIO(b"m" * (6 * MiB)),
        "ops-names",
        "multi",
        Config=TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB),
    )
    c.delete_objects(Bucket="ops-names", Delete={"Objects": [{"Key": "b"}]})
    with pytest.raises(ClientError):
        c.put_bucket_encryption(
            Bucket="ops-names",
            ServerSideEncryptionConfiguration={
                "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
            },
        )
    c.get_object_attributes(Bucket="ops-names", Key="a", ObjectAttributes=["ETag"])
    s = samples(ops_proxy)
    count = "cmek_s3_request_duration_seconds_count"
    ok = by_label(s, count, "operation", status="200")
    for op in (
        "CreateBucket",
        "PutObject",
        "ListObjectsV2",
        "ListObjects",
        "HeadObject",
        "GetObject",
        "CopyObject",
        "CreateMultipartUpload",
        "UploadPart",
        "CompleteMultipartUpload",
        "DeleteObjects",
        "GetObjectAttributes",
    ):
        assert ok.get(op, 0) >= 1, (op, sorted(ok))
    assert ok["UploadPart"] == 2
    refused = by_label(s, count, "operation", status="501")
    assert refused.get("PutBucketEncryption") == 1
    everything = by_label(s, count, "operation")
    assert not {"ObjectPost", "BucketGet"} & set(everything)
    # what the proxy sent to its backend, by operation
    backend = by_label(s, "cmek_backend_request_duration_seconds_count", "operation", status="200")
    for op in ("PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload"):
        assert backend.get(op, 0) >= 1, (op, sorted(backend))
    assert value(s, "cmek_s3_requests_in_flight") == 0
    # process, build, breaker, spec poll, jobs
    assert value(s, "process_resident_memory_bytes") > 0
    build = by_label(s, "cmek_build_info", "version")
    assert build == {proxy.__version__: 1.0}
    key = ops_proxy.config.key_uris()[0]
    assert value(s, "cmek_kms_breaker_state", key=key, state="closed") == 1
    assert value(s, "cmek_kms_breaker_state", key=key, state="open") == 0
    assert ("cmek_spec_poll_age_seconds", frozenset()) in s
    assert value(s, "cmek_jobs_running", job="verify") == 0


def test_in_flight_counts_a_request_being_served(ops_proxy: ProxyThread) -> None:
    c = ops_proxy.client()
    c.create_bucket(Bucket="ops-flight")
    c.put_object(Bucket="ops-flight", Key="big", Body=b"f" * (48 * MiB))
    url = c.generate_presigned_url("get_object", Params={"Bucket": "ops-flight", "Key": "big"})
    flight = "cmek_s3_requests_in_flight"
    # the response is not read: the proxy's handler waits on the full socket buffers
    with requests.get(url, stream=True, timeout=60) as resp:
        assert resp.status_code == 200
        wait_until(lambda: value(samples(ops_proxy), flight) == 1, 30, "one request in flight")
        assert len(resp.content) == 48 * MiB
    wait_until(lambda: value(samples(ops_proxy), flight) == 0, 30, "no request in flight")
    # a client that goes away mid-body does not leave the gauge up
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(
            f"GET {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()
        )
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        wait_until(lambda: value(samples(ops_proxy), flight) == 1, 30, "one request in flight")
    wait_until(lambda: value(samples(ops_proxy), flight) == 0, 30, "abandoned request ended")


def test_passthrough_writes_count_only_stored_objects(ops_proxy: ProxyThread) -> None:
    c = ops_proxy.client()
    name = "cmek_passthrough_writes_total"
    before = value(samples(ops_proxy), name, rule="bucket-spec-passthrough")
    with pytest.raises(ClientError) as err:
        c.put_object(Bucket="ops-public", Key="x", Body=b"never stored")
    assert err.value.response["Error"]["Code"] == "NoSuchBucket"
    assert value(samples(ops_proxy), name, rule="bucket-spec-passthrough") == before
    c.create_bucket(Bucket="ops-public")
    c.put_object(Bucket="ops-public", Key="x", Body=b"stored as sent")
    assert value(samples(ops_proxy), name, rule="bucket-spec-passthrough") == before + 1


def test_backend_errors_by_operation(moto: Server, keyfile: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with ProxyThread(proxy_config(dead, keyfile)) as p:
        with pytest.raises(ClientError) as err:
            p.client().put_object(Bucket="gone", Key="k", Body=b"x")
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        s = samples(p)
        assert value(s, "cmek_backend_errors_total", operation="PutObject", kind="unreachable") >= 1
        assert (
            value(
                s,
                "cmek_backend_request_duration_seconds_count",
                operation="PutObject",
                status="unreachable",
            )
            >= 1
        )
        assert value(
            s, "cmek_s3_request_duration_seconds_count", operation="PutObject", status="503"
        )


# ---- alert rules and dashboard ----------------------------------------------------------

_FUNCS = {
    "rate", "irate", "increase", "sum", "max", "min", "avg", "count", "by", "without", "on",
    "histogram_quantile", "max_over_time", "min_over_time", "avg_over_time", "time", "absent",
    "and", "or", "unless", "bool", "le", "delta", "deriv", "clamp_min", "topk", "offset",
    "ignoring", "group_left", "changes", "resets", "label_replace", "vector", "scalar",
}  # fmt: skip


def _metric_names(expr: str) -> set[str]:
    """Identifiers in a PromQL expression that are metric names (not labels or functions)."""
    no_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    no_labels = re.sub(r"\{[^}]*\}", "", no_strings)
    no_groups = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", no_labels
    )
    no_ranges = re.sub(r"\[[^\]]*\]", "", no_groups)
    no_numbers = re.sub(r"(?<![\w.])\d+(\.\d+)?([eE][-+]?\d+)?", "", no_ranges)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", no_numbers))
    return {w for w in words if w not in _FUNCS and not re.fullmatch(r"\d+[smhd]?", w)}


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((REPO / "config" / "prometheus-alerts.yaml").read_text())
    assert isinstance(doc, dict) and isinstance(doc["groups"], list) and doc["groups"]
    rules: list[dict[str, Any]] = []
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["name"]
        rules += group["rules"]
    return rules


def test_alert_rules_name_metrics_the_proxy_exports(ops_proxy: ProxyThread) -> None:
    exported = exported_names(scrape_text(ops_proxy))
    rules = _alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for wanted in (
        "CmekKeyUnavailable",
        "CmekKmsErrors",
        "CmekS3LatencyHigh",
        "CmekIntegrityFailures",
        "CmekAuditLogShrank",
    ):
        assert wanted in names, wanted
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert re.fullmatch(r"Cmek[A-Za-z0-9]+", rule["alert"])
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"])
        expr = rule["expr"]
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}")
        used = _metric_names(expr)
        assert used, rule["alert"]
        assert used <= exported, (rule["alert"], used - exported)


def test_dashboard_queries_name_exported_metrics(ops_proxy: ProxyThread) -> None:
    exported = exported_names(scrape_text(ops_proxy))
    doc = json.loads((REPO / "config" / "grafana-dashboard.json").read_text())
    titles = {panel["title"]: panel for panel in doc["panels"]}
    exprs = [t["expr"] for panel in doc["panels"] for t in panel.get("targets", [])]
    for expr in exprs:
        assert _metric_names(expr) <= exported, (expr, _metric_names(expr) - exported)
    joined = "\n".join(exprs)
    for metric in ("cmek_plaintext_reads_total", "cmek_passthrough_writes_total"):
        assert metric in joined, metric
    assert any("plaintext" in t.lower() for t in titles)
    assert any("passthrough" in t.lower() for t in titles)


def test_concurrent_scrapes_and_requests_agree(ops_proxy: ProxyThread) -> None:
    """Requests from several threads are all counted once, under their S3 name."""
    c = ops_proxy.client()
    c.create_bucket(Bucket="ops-many")
    before = value(
        samples(ops_proxy), "cmek_s3_request_duration_seconds_count", operation="PutObject",
        status="200",
    )  # fmt: skip

    def put(i: int) -> None:
        ops_proxy.client().put_object(Bucket="ops-many", Key=f"k{i}", Body=b"x" * i)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = value(
        samples(ops_proxy), "cmek_s3_request_duration_seconds_count", operation="PutObject",
        status="200",
    )  # fmt: skip
    assert after - before == 8


def test_the_metric_name_check_can_fail() -> None:
    assert _metric_names('sum by (le) (rate(cmek_nope_total{a="b"}[5m])) > 0.5') == {
        "cmek_nope_total"
    }
    assert _metric_names("histogram_quantile(0.99, x_bucket) / clamp_min(y, 1e-9)") == {
        "x_bucket",
        "y",
    }


def test_bytes_in_counts_what_arrived_not_what_was_declared(ops_proxy: ProxyThread) -> None:
    """A PUT refused before its body is read did not deliver its declared 8 MiB."""
    name = "cmek_s3_bytes_in_total"
    c = ops_proxy.client()
    c.create_bucket(Bucket="ops-bytes")
    before = value(samples(ops_proxy), name)
    body = b"z" * (8 * MiB)
    try:
        r = requests.put(ops_proxy.endpoint + "/ops-bytes/refused", data=body, timeout=60)
        assert r.status_code == 403
    except requests.exceptions.ConnectionError:
        pass  # the proxy answered and closed while the client was still sending
    # counted when the handler ends, before the answer goes out
    assert value(samples(ops_proxy), name) - before < len(body)
    c.put_object(Bucket="ops-bytes", Key="counted", Body=body)
    assert value(samples(ops_proxy), name) - before >= len(body)
