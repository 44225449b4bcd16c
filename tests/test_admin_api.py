"""The admin API end to end: a proxy on a real backend, specs stored there, two replicas."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from proxy.cli import main
from proxy.control.audit import Head, line_hash, verify
from tests.servers import ProxyThread, Server, new_keyfile, proxy_config, wait_until

TOKEN = "admin-test-token-0123456789"


def admin_config(backend: Server, keyfile: Path, tmp: Path, **over: Any) -> Any:
    return proxy_config(
        backend.url,
        keyfile,
        admin={"host": "127.0.0.1", "port": 0, "token": TOKEN},
        specs={"control_bucket": "cmek-control", "poll_interval": 0.2},
        audit={"path": str(tmp / "audit.jsonl")},
        **over,
    )


@pytest.fixture
def two(
    backend: Server, keyfile: Path, tmp_path: Path
) -> Iterator[tuple[ProxyThread, ProxyThread]]:
    # each replica has its own audit log, both share the backend's spec store
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        ProxyThread(admin_config(backend, keyfile, tmp_path / "a")) as a,
        ProxyThread(admin_config(backend, keyfile, tmp_path / "b")) as b,
    ):
        yield a, b


def call(
    p: ProxyThread, method: str, path: str, body: Any = None, token: str | None = TOKEN
) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, p.admin + path, json=body, headers=headers, timeout=30)


def wait_op(p: ProxyThread, name: str) -> dict[str, Any]:
    answer: dict[str, Any] = {}

    def done() -> bool:
        nonlocal answer
        answer = call(p, "GET", f"/v1/{name}").json()
        return bool(answer.get("done"))

    wait_until(done, 60, name)
    return answer


def test_without_a_valid_token_nothing_is_answered_or_changed(
    two: tuple[ProxyThread, ProxyThread],
) -> None:
    a, _ = two
    body = {"encryption_spec": {"passthrough": True}}
    for token in (None, "wrong-token"):
        for method, path in (
            ("POST", "/v1/buckets/nobody/encryptionSpec:initialize"),
            ("GET", "/v1/encryptionSpecs"),
            ("GET", "/v1/buckets/nobody/encryptionSpec"),
            ("POST", "/v1/buckets/nobody/jobs"),
        ):
            r = call(a, method, path, body, token=token)
            assert r.status_code == 401, (method, path)
            assert r.json()["error"]["status"] == "UNAUTHENTICATED"
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert call(a, "GET", "/v1/buckets/nobody/encryptionSpec").json()["source"] == "default"
    assert requests.get(a.admin + "/healthz", timeout=10).status_code == 200  # needs no token


def test_initialize_validates_activates_and_every_replica_sees_it(
    two: tuple[ProxyThread, ProxyThread], tmp_path: Path
) -> None:
    a, b = two
    bucket = f"spec-{time.monotonic_ns()}"
    ca, cb = a.client(), b.client()
    ca.create_bucket(Bucket=bucket)
    ca.put_object(Bucket=bucket, Key="before.txt", Body=b"old key")
    old_key = ca.head_object(Bucket=bucket, Key="before.txt")["SSEKMSKeyId"]

    new_keyfile_path = new_keyfile(tmp_path / "new-keys.json")
    new_key = f"local://{new_keyfile_path}"
    r = call(
        a,
        "POST",
        f"/v1/buckets/{bucket}/encryptionSpec:initialize",
        {"encryption_spec": {"kms_key": new_key}},
    )
    assert r.status_code == 200
    name = r.json()["name"]
    assert name.startswith("operations/")
    op = wait_op(a, name)
    assert "error" not in op, op
    assert op["response"]["encryption_spec"] == {"kms_key": new_key}
    assert op["response"]["state"] == "ACTIVE"

    spec = call(a, "GET", f"/v1/buckets/{bucket}/encryptionSpec").json()
    assert spec["source"] == "api" and spec["encryption_spec"]["kms_key"] == new_key
    listed = call(a, "GET", "/v1/encryptionSpecs").json()["encryption_specs"]
    assert any(s["bucket"] == bucket for s in listed)

    # writes after activation use the new key on this replica ...
    ca.put_object(Bucket=bucket, Key="after-a.txt", Body=b"new key")
    assert ca.head_object(Bucket=bucket, Key="after-a.txt")["SSEKMSKeyId"] == new_key
    # ... and, within the poll bound, on the other one
    wait_until(
        lambda: call(b, "GET", f"/v1/buckets/{bucket}/encryptionSpec").json()["source"] == "api",
        30,
        "replica b sees the spec",
    )
    cb.put_object(Bucket=bucket, Key="after-b.txt", Body=b"new key too")
    assert cb.head_object(Bucket=bucket, Key="after-b.txt")["SSEKMSKeyId"] == new_key
    # the object written before keeps its own envelope and still opens
    assert cb.get_object(Bucket=bucket, Key="before.txt")["Body"].read() == b"old key"
    assert cb.head_object(Bucket=bucket, Key="before.txt")["SSEKMSKeyId"] == old_key
    # the other replica answers GetOperation from the stored operation
    assert call(b, "GET", f"/v1/{name}").json()["done"] is True

    # the reserved store is not reachable through the S3 front
    from botocore.exceptions import ClientError

    listing = ca.list_objects_v2(Bucket="cmek-control")
    assert listing.get("KeyCount", 0) == 0
    with pytest.raises(ClientError) as err:
        ca.get_object(Bucket="cmek-control", Key=".cmek-proxy/specs/x.json")
    assert err.value.response["Error"]["Code"] == "AccessDenied"

    # the audit trail holds validation, creation and activation, and its chain holds
    audit = tmp_path / "a" / "audit.jsonl"
    events = [json.loads(x) for x in audit.read_text().splitlines()]
    mine = [e for e in events if e.get("spec") == bucket]
    assert [e["event"] for e in mine] == ["key.validated", "spec.created", "spec.activated"]
    assert mine[0]["ok"] is True and mine[0]["provider"]
    assert verify(audit).ok


def test_an_operation_that_fails_validation_names_key_and_provider(
    two: tuple[ProxyThread, ProxyThread], tmp_path: Path
) -> None:
    a, _ = two
    bad = f"local://{tmp_path / 'no-such-keyfile.json'}"
    r = call(
        a,
        "POST",
        "/v1/buckets/failing-bucket/encryptionSpec:initialize",
        {"encryption_spec": {"kms_key": bad}},
    )
    op = wait_op(a, r.json()["name"])
    err = op["error"]
    assert err["status"] == "FAILED_PRECONDITION"
    assert bad in err["message"]
    assert err["details"]["kms_key"] == bad
    assert err["details"]["provider"] == "local"
    assert "is gone" in err["details"]["provider_error"]
    assert call(a, "GET", "/v1/buckets/failing-bucket/encryptionSpec").json()["source"] == "default"
    events = [json.loads(x) for x in (tmp_path / "a" / "audit.jsonl").read_text().splitlines()]
    failed = [e for e in events if e.get("kms_key") == bad]
    assert failed and failed[-1]["event"] == "key.validated" and failed[-1]["ok"] is False


def test_bad_requests(two: tuple[ProxyThread, ProxyThread]) -> None:
    a, _ = two
    for body in (
        {},
        {"encryption_spec": {}},
        {"encryption_spec": {"kms_key": "local:///k", "passthrough": True}},
        {"encryption_spec": {"passthrough": True, "prefix": ".cmek-proxy/x"}},
    ):
        r = call(a, "POST", "/v1/buckets/some-bucket/encryptionSpec:initialize", body)
        assert r.status_code == 400, body
        assert r.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert call(a, "GET", "/v1/operations/ffffffffffffffffffffffff").status_code == 404
    assert call(a, "POST", "/v1/buckets/some-bucket/jobs", {"job": "nope"}).status_code == 400


def test_cli_admin_and_a_job_through_the_api(
    two: tuple[ProxyThread, ProxyThread], capsys: pytest.CaptureFixture[str]
) -> None:
    a, _ = two
    bucket = f"cli-{time.monotonic_ns()}"
    c = a.client()
    c.create_bucket(Bucket=bucket)
    for i in range(3):
        c.put_object(Bucket=bucket, Key=f"k{i}", Body=b"x" * 70_000 * i)
    base = ["admin", "--url", a.admin, "--token", TOKEN]
    main([*base, "init", bucket, "--passthrough", "--prefix", "public/", "--wait"])
    out = json.loads(capsys.readouterr().out)
    assert out["done"] and out["response"]["encryption_spec"] == {"passthrough": True}
    main([*base, "get", bucket, "--prefix", "public/"])
    assert json.loads(capsys.readouterr().out)["source"] == "api"
    c.put_object(Bucket=bucket, Key="public/plain.txt", Body=b"as sent")
    main([*base, "job", "verify", "--bucket", bucket, "--wait"])
    summary = json.loads(capsys.readouterr().out)["response"]
    assert summary["outcomes"]["ok"] == 3
    assert summary["outcomes"]["plaintext-allowed"] == 1
    with pytest.raises(SystemExit):
        main(["admin", "--url", a.admin, "--token", "wrong", "list"])
    assert json.loads(capsys.readouterr().out)["error"]["status"] == "UNAUTHENTICATED"


def test_audit_head_in_the_api_and_the_metrics_detects_a_cut(
    backend: Server, keyfile: Path, tmp_path: Path
) -> None:
    """A monitor that records the head (API or scrape) finds entries cut off the end."""
    with ProxyThread(admin_config(backend, keyfile, tmp_path)) as p:
        body = {"encryption_spec": {"passthrough": True, "prefix": "head/"}}
        r = call(p, "POST", "/v1/buckets/head-bucket/encryptionSpec:initialize", body)
        assert r.status_code == 200
        wait_op(p, r.json()["name"])
        assert call(p, "GET", "/v1/audit/head", token=None).status_code == 401
        head = call(p, "GET", "/v1/audit/head").json()
        audit = tmp_path / "audit.jsonl"
        lines = audit.read_bytes().splitlines(keepends=True)
        assert head["entries"] == len(lines) >= 2
        assert head["last_hash"] == line_hash(lines[-1][:-1])
        scraped = requests.get(p.admin + "/metrics", timeout=10).text
        assert f"cmek_audit_entries {float(len(lines))}" in scraped
        assert f'cmek_audit_head_info{{hash="{head["last_hash"]}"}} 1.0' in scraped
        audit.write_bytes(b"".join(lines[:-1]))
        scraped = requests.get(p.admin + "/metrics", timeout=10).text
        assert f"cmek_audit_entries {float(len(lines) - 1)}" in scraped
        assert call(p, "GET", "/v1/audit/head").json()["entries"] == len(lines) - 1
    assert verify(audit).ok
    assert not verify(audit, Head(head["entries"], head["last_hash"])).ok


def test_gc_through_the_api_and_the_cli(
    two: tuple[ProxyThread, ProxyThread], capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy.control.jobs.common import TMP_PREFIX
    from tests.servers import BACKEND_AK, BACKEND_SK, s3_client

    a, _ = two
    bucket = f"gc-{time.monotonic_ns()}"
    a.client().create_bucket(Bucket=bucket)
    direct = s3_client(a.config.backend.endpoint, BACKEND_AK, BACKEND_SK)
    direct.put_object(Bucket=bucket, Key=TMP_PREFIX + "left", Body=b"")
    base = ["admin", "--url", a.admin, "--token", TOKEN]
    main([*base, "job", "gc", "--bucket", bucket, "--dry-run", "--min-age", "0", "--wait"])
    dry = json.loads(capsys.readouterr().out)["response"]
    assert dry["outcomes"]["would-remove-job-tmp"] == 1 and dry["dry_run"]
    main([*base, "job", "gc", "--bucket", bucket, "--min-age", "0", "--wait"])
    assert json.loads(capsys.readouterr().out)["response"]["outcomes"]["removed-job-tmp"] == 1
    left = direct.list_objects_v2(Bucket=bucket, Prefix=TMP_PREFIX).get("Contents", [])
    assert left == []
