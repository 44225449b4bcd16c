"""Revocation end to end: the customer withdraws the key, the proxy stops; reinstates, it resumes.

OpenBao: the proxy token's policy is replaced by one granting nothing on the key.  With
cache TTL t and probe interval p, requests needing the key must fail within min(t, p) plus
slack (one probe round trip and one request), with ``AccessDenied`` 403 saying the
customer-managed key is unavailable, and ``/readyz`` must answer 503 naming the key and why.
When the policy is restored, every object written before (a 1 MiB one and a range among
them) reads back byte-identical within the probe interval, ``/readyz`` is 200 again, and
the stored bytes and metadata never changed.

Cloud KMS fake: disabling the key version (``FAILED_PRECONDITION``) gives
``KMS.DisabledException`` 400 and comes back when the version is enabled again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from botocore.exceptions import ClientError

from tests import kms_servers
from tests.fakes.gcp_kms import FakeGcpKms
from tests.kms_servers import MotoServer, OpenBaoServer
from tests.servers import ProxyThread
from tests.test_e2e_kms import (
    backend_client,
    data,
    e2e_config,
    gcp_clients,
    gcp_name,
    gcp_uri,
    no_retry_client,
    uniq,
    vault_clients,
    vault_uri,
)

moto_server = kms_servers.moto_server
openbao = kms_servers.openbao
gcp_kms = kms_servers.gcp_kms

TTL = 2.0
PROBE = 1.0
# one probe round trip (datakey + decrypt on loopback) and one client request
SLACK = 1.5
POLL = 0.05

OBJECTS = {
    "small": data(1_000, 10),
    "mid": data(100_000, 11),
    "big": data(1 << 20, 12),
    "dir/nested": data(70_000, 13),
}


def _first_error(call: Callable[[], object], within: float) -> tuple[ClientError, float]:
    """Repeat ``call`` until it raises ``ClientError``; bounded by ``within`` seconds."""
    t0 = time.monotonic()
    for _ in range(int(within / POLL) + 1):
        try:
            call()
        except ClientError as exc:
            return exc, time.monotonic() - t0
        if time.monotonic() - t0 > within:
            break
        time.sleep(POLL)
    raise AssertionError(f"still served {within}s after the key was withdrawn")


def _first_success(call: Callable[[], bytes], within: float) -> tuple[bytes, float]:
    t0 = time.monotonic()
    last: ClientError | None = None
    for _ in range(int(within / POLL) + 1):
        try:
            return call(), time.monotonic() - t0
        except ClientError as exc:
            last = exc
        if time.monotonic() - t0 > within:
            break
        time.sleep(POLL)
    raise AssertionError(f"not served {within}s after the key was reinstated: {last}")


def _readyz(p: ProxyThread) -> tuple[int, dict[str, Any]]:
    r = requests.get(p.admin + "/readyz", timeout=5)
    body: dict[str, Any] = r.json()
    return r.status_code, body


def _ready_within(p: ProxyThread, want: int, within: float) -> dict[str, Any]:
    t0 = time.monotonic()
    for _ in range(int(within / POLL) + 1):
        status, body = _readyz(p)
        if status == want:
            return body
        if time.monotonic() - t0 > within:
            break
        time.sleep(POLL)
    raise AssertionError(f"/readyz not {want} within {within}s: {status} {body}")


def _stored(direct: Any, bucket: str) -> dict[str, tuple[bytes, dict[str, str]]]:
    out = {}
    for key in OBJECTS:
        obj = direct.get_object(Bucket=bucket, Key=key)
        out[key] = (obj["Body"].read(), dict(obj["Metadata"]))
    return out


def _get(c: Any, bucket: str, key: str, **kw: Any) -> bytes:
    body: bytes = c.get_object(Bucket=bucket, Key=key, **kw)["Body"].read()
    return body


def test_openbao_revoke_and_restore(
    openbao: OpenBaoServer, moto_server: MotoServer, tmp_path: Path
) -> None:
    name = uniq("rev")
    token = openbao.create_key(name)
    uri = vault_uri(openbao.host, name)
    config = e2e_config(
        moto_server.endpoint_url, uri, tmp_path, cache_ttl=TTL, probe_interval=PROBE
    )
    direct = backend_client(moto_server)
    with ProxyThread(config, kms_clients=vault_clients(token)) as p:
        c = no_retry_client(p)
        bucket = uniq("rev-")
        c.create_bucket(Bucket=bucket)
        for key, body in OBJECTS.items():
            c.put_object(Bucket=bucket, Key=key, Body=body)
        for key, body in OBJECTS.items():
            assert _get(c, bucket, key) == body  # every key cached
        before = _stored(direct, bucket)
        assert _readyz(p)[0] == 200

        openbao.deny(name)
        err, took = _first_error(lambda: _get(c, bucket, "big"), within=min(TTL, PROBE) + SLACK)
        assert took <= min(TTL, PROBE) + SLACK
        assert err.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        assert err.response["Error"]["Code"] == "AccessDenied"
        assert "customer-managed key" in err.response["Error"]["Message"]
        assert "unavailable" in err.response["Error"]["Message"]

        # every read and write that needs the key now fails the same way
        calls: list[Callable[[], object]] = [
            *(lambda k=k: _get(c, bucket, k) for k in OBJECTS),
            lambda: _get(c, bucket, "big", Range="bytes=500000-600000"),
            lambda: c.put_object(Bucket=bucket, Key="during", Body=b"x" * 10),
        ]
        for call in calls:
            with pytest.raises(ClientError) as ei:
                call()
            assert ei.value.response["Error"]["Code"] == "AccessDenied"
        status, body = _readyz(p)
        assert status == 503 and body["ready"] is False
        state = body["keys"][uri]
        assert state["state"] == "revoked" and state["available"] is False
        assert "access_denied" in state["reason"] and "permission denied" in state["reason"]
        assert uri in state["reason"]

        openbao.allow(name)
        got, took = _first_success(lambda: _get(c, bucket, "big"), within=PROBE + SLACK)
        assert got == OBJECTS["big"] and took <= PROBE + SLACK
        for key, body_ in OBJECTS.items():
            assert _get(c, bucket, key) == body_
        rng = _get(c, bucket, "big", Range="bytes=500000-600000")
        assert rng == OBJECTS["big"][500000:600001]
        _ready_within(p, 200, PROBE + SLACK)
        with pytest.raises(ClientError):
            c.head_object(Bucket=bucket, Key="during")  # the refused PUT stored nothing

        # nothing was deleted or rewritten across the episode
        assert _stored(direct, bucket) == before


def test_gcp_disable_and_enable(
    gcp_kms: FakeGcpKms, moto_server: MotoServer, tmp_path: Path
) -> None:
    name = gcp_name()
    gcp_kms.create_key(name)
    uri = gcp_uri(name)
    config = e2e_config(
        moto_server.endpoint_url, uri, tmp_path, cache_ttl=TTL, probe_interval=PROBE
    )
    direct = backend_client(moto_server)
    with ProxyThread(config, kms_clients=gcp_clients(gcp_kms)) as p:
        c = no_retry_client(p)
        bucket = uniq("dis-")
        c.create_bucket(Bucket=bucket)
        c.put_object(Bucket=bucket, Key="obj", Body=OBJECTS["mid"])
        stored = direct.get_object(Bucket=bucket, Key="obj")["Body"].read()

        gcp_kms.set_state(name, 1, "DISABLED")
        err, took = _first_error(lambda: _get(c, bucket, "obj"), within=min(TTL, PROBE) + SLACK)
        assert took <= min(TTL, PROBE) + SLACK
        assert err.response["ResponseMetadata"]["HTTPStatusCode"] == 400
        assert err.response["Error"]["Code"] == "KMS.DisabledException"
        assert "customer-managed key" in err.response["Error"]["Message"]
        with pytest.raises(ClientError) as ei:
            c.put_object(Bucket=bucket, Key="new", Body=b"y" * 10)
        assert ei.value.response["Error"]["Code"] == "KMS.DisabledException"
        status, body = _readyz(p)
        assert status == 503 and body["keys"][uri]["state"] == "revoked"
        assert "disabled" in body["keys"][uri]["reason"]

        gcp_kms.set_state(name, 1, "ENABLED")
        got, _ = _first_success(lambda: _get(c, bucket, "obj"), within=PROBE + SLACK)
        assert got == OBJECTS["mid"]
        _ready_within(p, 200, PROBE + SLACK)
        assert direct.get_object(Bucket=bucket, Key="obj")["Body"].read() == stored
