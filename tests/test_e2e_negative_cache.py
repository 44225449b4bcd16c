"""Negative caching end to end: OpenBao Transit behind the counting front.

The customer revokes the proxy's access (policy emptied); a client retrying a GET ten times
costs Transit one decrypt in the denial-cache period; ``cmek_key_negative_cache_hits_total``
counts the other nine; when access is restored the next successful probe clears the
remembered denial and the object reads back.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tests import kms_servers
from tests.kms_servers import ErrorFront, MotoServer, OpenBaoServer
from tests.servers import ProxyThread
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


def test_retries_against_a_revoked_key_cost_one_kms_call_per_period(
    openbao: OpenBaoServer, vault_front: ErrorFront, moto_server: MotoServer, tmp_path: Path
) -> None:
    name = uniq("k")
    token = openbao.create_key(name)
    uri = vault_uri(vault_front.host, name)
    # long TTLs: only the denial cache and the probe decide what happens below
    config = e2e_config(
        moto_server.endpoint_url, uri, tmp_path, cache_ttl=1.0, negative_ttl=60, probe_interval=0.5
    )
    decrypt = f"/v1/transit/decrypt/{name}"
    with ProxyThread(config, kms_clients=vault_clients(token)) as p:
        c = no_retry_client(p)
        bucket = uniq("neg-")
        c.create_bucket(Bucket=bucket)
        blob = data(5000, 3)
        c.put_object(Bucket=bucket, Key="k", Body=blob)
        openbao.deny(name)
        # the cached data key expires after 1 s; the probe then sees the denial
        wait_for(
            lambda: scrape(p).get(("cmek_key_available", frozenset({("key", uri)}))) == 0.0,
            30,
            "key revoked",
        )
        before = vault_front.calls[decrypt]
        for _ in range(10):
            with pytest.raises(ClientError) as ei:
                c.get_object(Bucket=bucket, Key="k")
            assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        assert vault_front.calls[decrypt] - before == 1
        assert sample(scrape(p), "cmek_key_negative_cache_hits_total", kind="read") == 9

        openbao.allow(name)  # reinstated: the next successful probe clears the denial
        wait_for(
            lambda: scrape(p).get(("cmek_key_available", frozenset({("key", uri)}))) == 1.0,
            30,
            "key available again",
        )
        assert c.get_object(Bucket=bucket, Key="k")["Body"].read() == blob
