"""KMS outage end to end, through the error-injecting front in front of moto's KMS.

While the KMS answers 500 to everything: reads and writes whose keys are cached keep
working until the cache TTL; after it, requests fail with 503 ``ServiceUnavailable`` as an
S3 XML error; the circuit breaker opens and stops calling the KMS (the calls counted at the
front stay bounded while it is open); readiness stays 200 (an outage served from cache is
not a revocation).  When the front heals, the breaker's trial (the prober's call, at most
one reset period after it opened) closes it and requests are served again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import requests
from botocore.exceptions import ClientError

from proxy.kms.breaker import BreakerState
from tests import kms_servers
from tests.kms_servers import ErrorFront, MotoServer
from tests.servers import ProxyThread
from tests.test_e2e_kms import FAST, aws_clients, data, e2e_config, no_retry_client, uniq, wait_for

moto_server = kms_servers.moto_server
aws_front = kms_servers.aws_front

TTL = 2.0
PROBE = 1.0
BREAKER_RESET = 10.0  # KeyService's default reset timeout (build() does not set it)
OPS = ("GenerateDataKey", "Encrypt", "Decrypt")


def _front_total(front: ErrorFront) -> int:
    return sum(front.calls[op] for op in OPS)


def _get(c: Any, bucket: str, key: str) -> bytes:
    body: bytes = c.get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


def _unavailable(c: Any, bucket: str, key: str) -> ClientError:
    with pytest.raises(ClientError) as ei:
        _get(c, bucket, key)
    return ei.value


def test_outage_cache_then_503_breaker_then_recovery(
    moto_server: MotoServer, aws_front: ErrorFront, tmp_path: Path
) -> None:
    uri = "aws-kms://" + moto_server.create_key()
    config = e2e_config(
        moto_server.endpoint_url, uri, tmp_path, cache_ttl=TTL, probe_interval=PROBE
    )
    clients = aws_clients(moto_server, aws_front.endpoint_url)
    with ProxyThread(config, kms_clients=clients) as p:
        c = no_retry_client(p)
        bucket = uniq("out-")
        c.create_bucket(Bucket=bucket)
        a, b = data(40_000, 30), data(1000, 31)
        cached_at = time.monotonic()
        c.put_object(Bucket=bucket, Key="a", Body=a)  # one GenerateDataKey fills both caches

        for op in OPS:
            aws_front.inject(op, "KMSInternalException", status=500, times=10_000)

        # within the TTL the cached data key serves reads and writes
        assert _get(c, bucket, "a") == a
        c.put_object(Bucket=bucket, Key="b", Body=b)
        assert _get(c, bucket, "b") == b
        assert time.monotonic() - cached_at < TTL  # the above really ran inside the TTL
        assert requests.get(p.admin + "/readyz", timeout=5).status_code == 200

        # after the TTL: 503 with an S3 error body
        time.sleep(max(0.0, cached_at + TTL + 0.2 - time.monotonic()))
        err = _unavailable(c, bucket, "a")
        assert err.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        assert err.response["Error"]["Code"] == "ServiceUnavailable"
        assert "customer-managed key service" in err.response["Error"]["Message"]
        raw = requests.get(f"{p.endpoint}/{bucket}/a", timeout=5)  # unsigned: auth first
        assert raw.headers["Content-Type"].startswith("application/xml")

        # the breaker opens after consecutive failures (requests and probes count)
        breaker = p.proxy.keys.kek(uri).breaker if p.proxy else None
        assert breaker is not None
        for _ in range(breaker.failure_threshold):
            if breaker.state is BreakerState.OPEN:
                break
            _unavailable(c, bucket, "a")
        assert breaker.state is BreakerState.OPEN
        opened_at = time.monotonic()
        calls_when_open = _front_total(aws_front)
        for _ in range(30):
            err = _unavailable(c, bucket, "a")
            assert err.response["Error"]["Code"] == "ServiceUnavailable"
        with pytest.raises(ClientError) as ei:
            c.put_object(Bucket=bucket, Key="c", Body=b"z")
        assert ei.value.response["Error"]["Code"] == "ServiceUnavailable"
        time.sleep(2 * PROBE)  # two probe periods: the prober is held back too
        # while open, at most one half-open trial (with its retries) reaches the KMS
        if time.monotonic() - opened_at < BREAKER_RESET:
            assert _front_total(aws_front) - calls_when_open == 0
        else:
            assert _front_total(aws_front) - calls_when_open <= FAST.attempts
        assert requests.get(p.admin + "/readyz", timeout=5).status_code == 200
        status = requests.get(p.admin + "/readyz", timeout=5).json()["keys"][uri]
        assert status["state"] == "unreachable"

        # heal: the next trial after the reset period closes the breaker
        aws_front.clear()
        within = BREAKER_RESET + PROBE + 3.0
        wait_for(lambda: breaker.state is BreakerState.CLOSED, within, "breaker closed")
        assert _get(c, bucket, "a") == a
        assert _get(c, bucket, "b") == b
        c.put_object(Bucket=bucket, Key="c", Body=b"z")
        assert _get(c, bucket, "c") == b"z"
        status = requests.get(p.admin + "/readyz", timeout=5).json()["keys"][uri]
        assert status["state"] == "available"
