"""Structured logs: one JSON line per request, authentication failures, request ids, no secrets.

The proxy runs as ``python -m proxy --log-format json serve``; its stderr is parsed line by
line, so every line must be a JSON object.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from proxy.reqctx import RequestIdFilter
from tests.servers import (
    BACKEND_SK,
    CLIENT_AK,
    CLIENT_SK,
    REGION,
    ProxyThread,
    Server,
    free_port,
    http_ok,
    proxy_config,
    wait_until,
)

WRONG_SECRET = "wrong-secret-key-do-not-log-me"


@dataclass
class Running:
    endpoint: str
    proc: subprocess.Popen[bytes]
    lines: list[str]


@contextmanager
def serve(
    moto: Server, keyfile: Path, tmp: Path, *flags: str, **logging_cfg: Any
) -> Iterator[Running]:
    port, admin = free_port(), free_port()
    cfg = proxy_config(
        moto.url,
        keyfile,
        listen={"host": "127.0.0.1", "port": port},
        admin={"host": "127.0.0.1", "port": admin},
        logging=logging_cfg,
    )
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
    err = tmp / "stderr.log"
    with err.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", *flags, "serve", "--config", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=fh,
        )
    running = Running(f"http://127.0.0.1:{port}", proc, [])
    try:
        wait_until(lambda: http_ok(running.endpoint + "/"), 60, "cmek-proxy serve")
        yield running
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        running.lines[:] = err.read_text().splitlines()


def client(endpoint: str, ak: str = CLIENT_AK, sk: str = CLIENT_SK) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ak,
        aws_secret_access_key=sk,
        region_name=REGION,
        config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def _signatures(c: Any) -> list[str]:
    """Collect the signatures the client sends (to check none of them is logged)."""
    seen: list[str] = []

    def grab(request: Any, **_: Any) -> None:
        auth = request.headers.get("Authorization", b"")
        auth = auth.decode() if isinstance(auth, bytes) else auth
        if "Signature=" in auth:
            seen.append(auth.rsplit("Signature=", 1)[1])

    c.meta.events.register("before-send.s3.*", grab)
    return seen


def test_json_access_log_auth_failures_and_no_secrets(
    moto: Server, keyfile: Path, tmp_path: Path
) -> None:
    ids: dict[str, str] = {}
    with serve(moto, keyfile, tmp_path, "--log-format", "json") as run:
        c = client(run.endpoint)
        c.create_bucket(Bucket="logs-json")
        put = c.put_object(Bucket="logs-json", Key="secret/name.txt", Body=b"x" * 5000)
        ids["put"] = put["ResponseMetadata"]["RequestId"]
        got = c.get_object(Bucket="logs-json", Key="secret/name.txt")
        assert got["Body"].read() == b"x" * 5000
        ids["get"] = got["ResponseMetadata"]["RequestId"]
        bad = client(run.endpoint, sk=WRONG_SECRET)
        sent = _signatures(bad)
        with pytest.raises(ClientError) as err:
            bad.list_objects_v2(Bucket="logs-json")
        assert err.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
        ids["bad"] = err.value.response["ResponseMetadata"]["RequestId"]
        with pytest.raises(ClientError):
            client(run.endpoint, ak="NOSUCHKEYID", sk=WRONG_SECRET).list_buckets()
    assert run.proc.returncode == 0
    entries = [json.loads(line) for line in run.lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    access = {e["request_id"]: e for e in entries if e.get("event") == "request"}
    assert set(ids.values()) <= set(access)
    p = access[ids["put"]]
    assert p["operation"] == "PutObject" and p["status"] == 200 and p["method"] == "PUT"
    assert p["bytes_in"] >= 5000 and p["duration_ms"] > 0
    assert p["backend_ms"] > 0 and p["backend_calls"] >= 1
    assert p["kms_ms"] >= 0 and p["access_key"] == CLIENT_AK
    assert "bucket" not in p and "key" not in p  # names only with logging.include_names
    g = access[ids["get"]]
    assert g["operation"] == "GetObject" and g["bytes_out"] == 5000
    b = access[ids["bad"]]
    assert (b["status"], b["error"], b["operation"]) == (
        403,
        "SignatureDoesNotMatch",
        "ListObjectsV2",
    )
    fails = [e for e in entries if e.get("event") == "auth_failed"]
    by_key = {e["access_key"]: e for e in fails}
    assert by_key[CLIENT_AK]["reason"] == "SignatureDoesNotMatch"
    assert by_key[CLIENT_AK]["request_id"] == ids["bad"]
    assert by_key[CLIENT_AK]["level"] == "WARNING"
    assert by_key["NOSUCHKEYID"]["reason"] == "InvalidAccessKeyId"
    text = "\n".join(run.lines)
    assert sent and not any(sig in text for sig in sent)
    for secret in (CLIENT_SK, WRONG_SECRET, BACKEND_SK, "secret/name.txt", "logs-json"):
        assert secret not in text, secret
    assert "x" * 100 not in text


def test_names_when_configured_and_access_log_off(
    moto: Server, keyfile: Path, tmp_path: Path
) -> None:
    (tmp_path / "a").mkdir()
    with serve(moto, keyfile, tmp_path / "a", format="json", include_names=True) as run:
        c = client(run.endpoint)
        c.create_bucket(Bucket="logs-names")
        c.put_object(Bucket="logs-names", Key="k1", Body=b"1")
    entries = [json.loads(line) for line in run.lines]  # logging.format: json from the config
    put = next(e for e in entries if e.get("operation") == "PutObject")
    assert (put["bucket"], put["key"]) == ("logs-names", "k1")

    (tmp_path / "b").mkdir()
    with serve(moto, keyfile, tmp_path / "b", "--log-format", "text", access_log=False) as run:
        c = client(run.endpoint)
        c.list_buckets()
        with pytest.raises(ClientError):
            client(run.endpoint, sk=WRONG_SECRET).list_buckets()
    assert not any("ListBuckets 200" in line for line in run.lines)
    fails = [line for line in run.lines if "authentication failed" in line]
    # the readiness poll (an anonymous GET /) and the bad signature
    assert len(fails) == 2, "\n".join(run.lines)
    assert "no access key" in fails[0] and "AccessDenied" in fails[0]
    fail = fails[1]
    assert f"access key {CLIENT_AK}: SignatureDoesNotMatch" in fail
    assert "request_id=" in fail and WRONG_SECRET not in fail


def test_every_line_about_a_request_names_its_request_id(
    keyfile: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A warning logged deep in a request (the backend is down) carries the client's id."""
    dead = f"http://127.0.0.1:{free_port()}"
    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.INFO), ProxyThread(proxy_config(dead, keyfile)) as p:
        with pytest.raises(ClientError) as err:
            p.client().get_object(Bucket="b", Key="k")
        rid = err.value.response["ResponseMetadata"]["RequestId"]
    mine = [r for r in caplog.records if getattr(r, "request_id", None) == rid]
    assert {r.name for r in mine} >= {"proxy.s3.server", "proxy.access"}
    warning = next(r for r in mine if r.name == "proxy.s3.server")
    assert warning.levelno == logging.WARNING and "ServiceUnavailable" in warning.getMessage()
