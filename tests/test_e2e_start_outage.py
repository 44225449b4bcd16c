"""Start through a KMS outage, for each provider: its server or fake is stopped at start.

The proxy still listens; ``/readyz`` answers 503 naming the key (state ``pending``, the
reason says unreachable); a bucket under another (``local://``) key and a passthrough
path are served; writes under the missing key get 503.  When the server is started again
the prober's round trip makes the proxy ready by itself and the key serves.  A definitive
error (unknown key) still stops the start; a backend not reachable at start does not, and
S3 requests get 503 until the spec store has been read.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from botocore.exceptions import ClientError

from proxy.config import Config
from proxy.errors import KeyConfigError
from proxy.kms.local import LocalKmsClient
from tests import kms_servers
from tests.fakes.azure_kv import FakeKeyVault, TlsMaterial
from tests.fakes.gcp_kms import FakeGcpKms
from tests.kms_servers import ErrorFront, MotoServer, OpenBaoServer, free_port
from tests.servers import ProxyThread, new_keyfile, proxy_config, start_process
from tests.test_e2e_kms import (
    Factory,
    OwnedGcpClient,
    _start_fails,
    aws_clients,
    azure_clients,
    data,
    gcp_name,
    gcp_uri,
    no_retry_client,
    uniq,
    vault_clients,
    vault_uri,
    wait_for,
)

moto_server = kms_servers.moto_server
aws_front = kms_servers.aws_front
openbao = kms_servers.openbao
vault_front = kms_servers.vault_front
gcp_kms = kms_servers.gcp_kms
azure_tls = kms_servers.azure_tls
azure_kv = kms_servers.azure_kv

PROBE = 0.3


@dataclass
class Down:
    """A provider's key whose server is stopped; ``up()`` starts it again."""

    key_uri: str
    clients: Factory
    up: Callable[[], object]


def _with_local(factory: Factory) -> Factory:
    return lambda: [*factory(), LocalKmsClient()]


@pytest.fixture(params=["aws-kms", "gcp-kms", "azure-kv", "vault-transit"])
def down(request: pytest.FixtureRequest) -> Down:
    p = request.param
    if p == "aws-kms":
        moto: MotoServer = request.getfixturevalue("moto_server")
        front: ErrorFront = request.getfixturevalue("aws_front")
        uri = "aws-kms://" + moto.create_key()
        port = front.port
        front.stop()
        return Down(uri, aws_clients(moto, front.endpoint_url), lambda: front.start(port))
    if p == "vault-transit":
        bao: OpenBaoServer = request.getfixturevalue("openbao")
        vfront: ErrorFront = request.getfixturevalue("vault_front")
        name = uniq("k")
        token = bao.create_key(name)
        vport = vfront.port
        vfront.stop()
        return Down(vault_uri(vfront.host, name), vault_clients(token), lambda: vfront.start(vport))
    if p == "gcp-kms":
        gcp: FakeGcpKms = request.getfixturevalue("gcp_kms")
        name = gcp_name()
        gcp.create_key(name)
        gport = gcp.port
        gcp.stop()
        return Down(gcp_uri(name), lambda: [OwnedGcpClient(gcp.target)], lambda: _up(gcp, gport))
    akv: FakeKeyVault = request.getfixturevalue("azure_kv")
    tls: TlsMaterial = request.getfixturevalue("azure_tls")
    kname = uniq("k")
    akv.create_key(kname)
    aport = akv.port
    akv.stop()
    return Down(
        f"azure-kv://{akv.host}/keys/{kname}",
        azure_clients(tls, akv),
        lambda: akv.start(tls, aport),
    )


def _up(fake: FakeGcpKms, port: int) -> None:
    fake.start(port)


def _config(backend: str, uri: str, tmp_path: Path, **kms: Any) -> Config:
    local = f"local://{new_keyfile(tmp_path / 'local-keys.json')}"
    return proxy_config(
        backend,
        tmp_path / "unused",
        encryption={
            "default": {"key": uri},
            "buckets": {"other": {"key": local}},
            "unencrypted_paths": ["scratch/**"],
        },
        kms={"probe_interval": PROBE, "timeout": 2.0, **kms},
    )


def _readyz(p: ProxyThread) -> tuple[int, dict[str, Any]]:
    r = requests.get(p.admin + "/readyz", timeout=5)
    body: dict[str, Any] = r.json()
    return r.status_code, body


def _bucket(c: Any, name: str) -> None:
    try:
        c.create_bucket(Bucket=name)
    except ClientError as exc:
        if exc.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


def test_start_with_kms_down_then_ready_by_itself(
    down: Down, moto_server: MotoServer, tmp_path: Path
) -> None:
    config = _config(moto_server.endpoint_url, down.key_uri, tmp_path)
    with ProxyThread(config, kms_clients=_with_local(down.clients)) as p:
        status, body = _readyz(p)
        assert status == 503 and body["ready"] is False
        key = body["keys"][down.key_uri]
        assert key["state"] == "pending" and "unreachable" in key["reason"]
        assert (
            body["keys"][config.key_uris()[1 - config.key_uris().index(down.key_uri)]]["state"]
            == "available"
        )

        c = no_retry_client(p)
        for b in ("other", "scratch"):
            _bucket(c, b)
        blob = data(3000, 1)
        c.put_object(Bucket="other", Key="k", Body=blob)  # another key: served
        assert c.get_object(Bucket="other", Key="k")["Body"].read() == blob
        c.put_object(Bucket="scratch", Key="x", Body=blob)  # passthrough path: served
        assert c.get_object(Bucket="scratch", Key="x")["Body"].read() == blob
        main = uniq("main-")
        _bucket(c, main)
        with pytest.raises(ClientError) as ei:
            c.put_object(Bucket=main, Key="k", Body=blob)  # needs the missing key
        assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503

        down.up()
        wait_for(lambda: _readyz(p)[0] == 200, 30, "ready after the KMS came back")
        assert _readyz(p)[1]["keys"][down.key_uri]["state"] == "available"
        c.put_object(Bucket=main, Key="k", Body=blob)
        assert c.get_object(Bucket=main, Key="k")["Body"].read() == blob


def test_start_with_kms_hanging_past_start_timeout(
    moto_server: MotoServer, aws_front: ErrorFront, tmp_path: Path
) -> None:
    """A KMS that accepts but never answers in time: start gives up after start_timeout."""
    uri = "aws-kms://" + moto_server.create_key()
    aws_front.inject_hang("Encrypt", 30.0, times=1)
    config = _config(moto_server.endpoint_url, uri, tmp_path, start_timeout=0.5)
    with ProxyThread(
        config, kms_clients=_with_local(aws_clients(moto_server, aws_front.endpoint_url))
    ) as p:
        status, body = _readyz(p)
        assert status == 503
        assert body["keys"][uri]["state"] == "pending"
        assert "0.5s" in body["keys"][uri]["reason"]
        wait_for(lambda: _readyz(p)[0] == 200, 30, "ready once the KMS answers")


async def test_unknown_key_still_stops_the_start(
    gcp_kms: FakeGcpKms, moto_server: MotoServer, tmp_path: Path
) -> None:
    uri = gcp_uri(gcp_name())  # never created: NOT_FOUND is definitive
    config = _config(moto_server.endpoint_url, uri, tmp_path)
    err = await _start_fails(config, [OwnedGcpClient(gcp_kms.target), LocalKmsClient()])
    assert uri in str(err) and "failed validation" in str(err)
    assert isinstance(err, KeyConfigError)


def test_backend_unreachable_at_start_then_started(tmp_path: Path) -> None:
    """Specs cannot be read: the proxy listens, is not ready, and answers 503 (never a
    guess without the API specs); when the backend comes up it becomes ready by itself."""
    port = free_port()
    keyfile = new_keyfile(tmp_path / "k.json")
    config = proxy_config(
        f"http://127.0.0.1:{port}",
        keyfile,
        specs={"control_bucket": "control", "poll_interval": 0.2},
        kms={"probe_interval": PROBE},
    )
    with ProxyThread(config) as p:
        status, body = _readyz(p)
        assert status == 503 and "specs" in body["not_ready"]
        assert "backend unreachable" in body["not_ready"]["specs"]
        c = no_retry_client(p)
        with pytest.raises(ClientError) as ei:
            c.put_object(Bucket="late", Key="k", Body=b"x")
        assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        backend = start_process(
            "moto-late",
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            f"http://127.0.0.1:{port}",
            tmp_path,
        )
        try:
            wait_for(lambda: _readyz(p)[0] == 200, 30, "ready once the backend is up")
            _bucket(c, "late")
            c.put_object(Bucket="late", Key="k", Body=b"x")
            assert c.get_object(Bucket="late", Key="k")["Body"].read() == b"x"
        finally:
            backend.stop()


def test_api_spec_key_failing_at_start_does_not_stop_it(
    moto: Any, keyfile: Path, tmp_path: Path
) -> None:
    """A key named only by an API spec is validated at start too; a definitive failure marks
    it revoked (readyz 503 naming it) instead of stopping the proxy whose admin API would fix
    the spec."""
    from tests.test_admin_api import admin_config, call, wait_op

    spec_key_file = new_keyfile(tmp_path / "spec-key.json")
    spec_key = f"local://{spec_key_file}"
    bucket = uniq("apikey-")
    config = admin_config(moto, keyfile, tmp_path)
    config = config.model_copy(
        update={"specs": config.specs.model_copy(update={"control_bucket": uniq("ctl-")})}
    )
    with ProxyThread(config) as p:
        p.client().create_bucket(Bucket=bucket)
        r = call(
            p,
            "POST",
            f"/v1/buckets/{bucket}/encryptionSpec:initialize",
            {"encryption_spec": {"kms_key": spec_key}},
        )
        assert "error" not in wait_op(p, r.json()["name"])
    spec_key_file.unlink()  # the spec's key is gone
    with ProxyThread(config) as p:
        status, body = _readyz(p)
        assert status == 503
        assert body["keys"][spec_key]["state"] == "revoked"
        assert "is gone" in body["keys"][spec_key]["reason"]
        c = no_retry_client(p)
        other = uniq("cfg-")
        c.create_bucket(Bucket=other)
        c.put_object(Bucket=other, Key="k", Body=b"config key still serves")
        with pytest.raises(ClientError):
            c.put_object(Bucket=bucket, Key="k", Body=b"x")
