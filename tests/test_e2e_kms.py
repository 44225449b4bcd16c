"""Each KMS provider end to end through the proxy, with moto as the S3 backend.

Providers: AWS KMS on moto, the Cloud KMS gRPC fake, the Key Vault HTTPS fake, OpenBao
Transit and ``local://``.  For each: PUT, GET, range GET and CopyObject through the proxy;
the backend holds ciphertext whose envelope names the key; the SSE headers name the key
URI.  Then validation at start (a key that fails stops the start with a message naming the
key, the provider and the provider's own error) and rotation inside the KMS (old objects
open, new objects record the new primary version).

The helpers here (``e2e_config``, ``gcp_clients``, ``vault_clients``, ...) are shared by the
other ``test_e2e_*`` KMS modules.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.loadgen import S3Client
from proxy import crypto
from proxy.app import build, start
from proxy.config import Config
from proxy.errors import KeyConfigError
from proxy.kms.aws import AwsKmsClient
from proxy.kms.azure import AzureKmsClient
from proxy.kms.base import KmsClient, RetryPolicy
from proxy.kms.gcp import GcpKmsClient
from proxy.kms.local import LocalKmsClient
from proxy.kms.vault import VaultTransitClient
from tests import kms_servers
from tests.fakes.azure_kv import FakeKeyVault, TlsMaterial
from tests.fakes.gcp_kms import FakeGcpKms
from tests.kms_servers import (
    ErrorFront,
    MotoServer,
    OpenBaoServer,
    StaticTokenCredential,
    azure_client_kwargs,
    gcp_async_client,
)
from tests.servers import (
    BACKEND_AK,
    BACKEND_SK,
    CLIENT_AK,
    CLIENT_SK,
    REGION,
    ProxyThread,
    new_keyfile,
    proxy_config,
    s3_client,
)

# fixtures from tests/kms_servers.py, bound here so pytest finds them in this module
moto_server = kms_servers.moto_server
aws_front = kms_servers.aws_front
openbao = kms_servers.openbao
gcp_kms = kms_servers.gcp_kms
azure_tls = kms_servers.azure_tls
azure_kv = kms_servers.azure_kv

FAST = RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.005, timeout=5.0)
PROVIDERS = ["aws-kms", "gcp-kms", "azure-kv", "vault-transit", "local"]
GCP_LOCATION = "europe-west1"
Factory = Callable[[], Sequence[KmsClient]]


def uniq(prefix: str) -> str:
    return f"{prefix}{os.urandom(5).hex()}"


def data(n: int, seed: int = 0) -> bytes:
    import hashlib

    return hashlib.shake_256(f"{n}-{seed}".encode()).digest(n) if n else b""


def error_code(exc: ClientError) -> str:
    return str(exc.response["Error"]["Code"])


def e2e_config(
    backend_url: str,
    key_uri: str,
    tmp_path: Path,
    *,
    location: str | None = None,
    **kms: Any,
) -> Config:
    """A proxy config whose default key is ``key_uri`` (``kms`` overrides the ``kms`` block)."""
    rule: dict[str, Any] = {"key": key_uri}
    if location is not None:
        rule["location"] = location
    return proxy_config(
        backend_url,
        tmp_path / "unused-keyfile.json",
        encryption={"default": rule},
        kms={"probe_interval": 3600, **kms},
    )


class OwnedGcpClient(GcpKmsClient):
    """A ``GcpKmsClient`` over a gRPC channel to the fake that it also closes."""

    def __init__(self, target: str, retry: RetryPolicy = FAST) -> None:
        self._sdk = gcp_async_client(target)
        super().__init__(client=self._sdk, retry=retry)

    async def close(self) -> None:
        await super().close()
        await self._sdk.transport.close()  # type: ignore[no-untyped-call]


def gcp_clients(fake: FakeGcpKms) -> Factory:
    return lambda: [OwnedGcpClient(fake.target)]


def gcp_uri(name: str) -> str:
    return f"gcp-kms://{name}"


def gcp_name(location: str = GCP_LOCATION) -> str:
    return f"projects/p/locations/{location}/keyRings/r/cryptoKeys/{uniq('k')}"


def aws_clients(moto: MotoServer, endpoint_url: str | None = None) -> Factory:
    url = endpoint_url or moto.endpoint_url
    return lambda: [AwsKmsClient(session=moto.session(), endpoint_url=url, retry=FAST)]


def azure_clients(tls: TlsMaterial, fake: FakeKeyVault) -> Factory:
    def make() -> list[KmsClient]:
        cred = StaticTokenCredential(fake.token)
        return [AzureKmsClient(cred, client_kwargs=azure_client_kwargs(tls), retry=FAST)]

    return make


def vault_clients(token: str, retry: RetryPolicy = FAST) -> Factory:
    return lambda: [VaultTransitClient(token=token, tls=False, retry=retry)]


def vault_uri(host: str, name: str) -> str:
    return f"vault-transit://{host}/transit/keys/{name}"


def local_clients() -> Factory:
    return lambda: [LocalKmsClient()]


@dataclass
class Target:
    """One provider set up for a test: its key URI and the KMS clients the proxy uses."""

    provider: str
    key_uri: str
    clients: Factory


@pytest.fixture(params=PROVIDERS)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    p = request.param
    if p == "aws-kms":
        moto: MotoServer = request.getfixturevalue("moto_server")
        return Target(p, "aws-kms://" + moto.create_key(), aws_clients(moto))
    if p == "gcp-kms":
        gcp: FakeGcpKms = request.getfixturevalue("gcp_kms")
        name = gcp_name()
        gcp.create_key(name)
        return Target(p, gcp_uri(name), gcp_clients(gcp))
    if p == "azure-kv":
        akv: FakeKeyVault = request.getfixturevalue("azure_kv")
        tls: TlsMaterial = request.getfixturevalue("azure_tls")
        name = uniq("k")
        akv.create_key(name)
        return Target(p, f"azure-kv://{akv.host}/keys/{name}", azure_clients(tls, akv))
    if p == "vault-transit":
        bao: OpenBaoServer = request.getfixturevalue("openbao")
        name = uniq("k")
        token = bao.create_key(name)
        return Target(p, vault_uri(bao.host, name), vault_clients(token))
    keyfile = new_keyfile(tmp_path / "keys.json")
    return Target(p, f"local://{keyfile}", local_clients())


@pytest.fixture
def proxy(moto_server: MotoServer, target: Target, tmp_path: Path) -> Iterator[ProxyThread]:
    config = e2e_config(moto_server.endpoint_url, target.key_uri, tmp_path)
    with ProxyThread(config, kms_clients=target.clients) as p:
        yield p


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(p: ProxyThread) -> Samples:
    """Every sample of the proxy's ``/metrics``, by (sample name, label set)."""
    text = requests.get(p.admin + "/metrics", timeout=5).text
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = float(s.value)
    return out


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for(check: Callable[[], bool], within: float, what: str) -> None:
    """Poll ``check`` every 20 ms; bounded in time and count."""
    deadline = time.monotonic() + within
    for _ in range(int(within / 0.02) + 1):
        if check():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    raise AssertionError(f"{what}: not within {within}s")


def no_retry_client(p: ProxyThread) -> Any:
    """A boto3 client through the proxy that makes exactly one attempt per request."""
    return boto3.client(
        "s3",
        endpoint_url=p.endpoint,
        aws_access_key_id=CLIENT_AK,
        aws_secret_access_key=CLIENT_SK,
        region_name=REGION,
        config=BotoConfig(
            s3={"addressing_style": "path"}, retries={"mode": "standard", "total_max_attempts": 1}
        ),
    )


def backend_client(moto: MotoServer) -> Any:
    """A boto3 client straight to the backend, to look at what is really stored."""
    return s3_client(moto.endpoint_url, BACKEND_AK, BACKEND_SK)


def assert_stored_encrypted(direct: Any, bucket: str, key: str, plain: bytes, uri: str) -> None:
    stored = direct.get_object(Bucket=bucket, Key=key)
    body = stored["Body"].read()
    assert len(body) == crypto.ciphertext_size(len(plain))
    for off in range(0, max(1, len(plain) - 32), max(1, len(plain) // 7)):
        window = plain[off : off + 32]
        if len(window) == 32:
            assert window not in body
    meta = stored["Metadata"]
    assert meta["cmek-kek"] == uri
    assert meta["cmek-dk"]


def test_put_get_range_stored_encrypted(
    proxy: ProxyThread, moto_server: MotoServer, target: Target
) -> None:
    c = proxy.client()
    bucket = uniq("e2e-")
    c.create_bucket(Bucket=bucket)
    plain = data(300_000, 1)
    put = c.put_object(Bucket=bucket, Key="dir/obj", Body=plain)
    assert put["ServerSideEncryption"] == "aws:kms"
    assert put["SSEKMSKeyId"] == target.key_uri
    got = c.get_object(Bucket=bucket, Key="dir/obj")
    assert got["Body"].read() == plain
    assert got["ServerSideEncryption"] == "aws:kms"
    assert got["SSEKMSKeyId"] == target.key_uri
    head = c.head_object(Bucket=bucket, Key="dir/obj")
    assert head["SSEKMSKeyId"] == target.key_uri and head["ContentLength"] == len(plain)
    rng = c.get_object(Bucket=bucket, Key="dir/obj", Range="bytes=70000-200001")
    assert rng["Body"].read() == plain[70000:200002]
    assert rng["ContentRange"] == f"bytes 70000-200001/{len(plain)}"
    assert_stored_encrypted(backend_client(moto_server), bucket, "dir/obj", plain, target.key_uri)


def test_copy_object(proxy: ProxyThread, moto_server: MotoServer, target: Target) -> None:
    c = proxy.client()
    bucket = uniq("copy-")
    c.create_bucket(Bucket=bucket)
    plain = data(100_000, 2)
    c.put_object(Bucket=bucket, Key="src", Body=plain)
    out = c.copy_object(Bucket=bucket, Key="dst", CopySource={"Bucket": bucket, "Key": "src"})
    assert out["ServerSideEncryption"] == "aws:kms"
    got = c.get_object(Bucket=bucket, Key="dst")
    assert got["Body"].read() == plain and got["SSEKMSKeyId"] == target.key_uri
    assert_stored_encrypted(backend_client(moto_server), bucket, "dst", plain, target.key_uri)


# ---- validation at start ---------------------------------------------------------------


async def _start_fails(config: Config, clients: Sequence[KmsClient]) -> KeyConfigError:
    """Start must fail; it closes the backend session and KMS clients it was given."""
    proxy = build(config, kms_clients=clients)
    with pytest.raises(KeyConfigError) as ei:
        running = await start(config, proxy)
        await running.close()
    return ei.value


async def test_validation_wrong_gcp_location(
    gcp_kms: FakeGcpKms, moto_server: MotoServer, tmp_path: Path
) -> None:
    name = gcp_name("us-east1")
    gcp_kms.create_key(name)
    uri = gcp_uri(name)
    config = e2e_config(moto_server.endpoint_url, uri, tmp_path, location=GCP_LOCATION)
    err = await _start_fails(config, [OwnedGcpClient(gcp_kms.target)])
    msg = str(err)
    assert uri in msg and "gcp-kms" in msg
    assert "'us-east1'" in msg and f"'{GCP_LOCATION}'" in msg
    assert gcp_kms.calls["Encrypt"] == 0  # refused before any KMS call


async def test_validation_gcp_key_missing_in_location(
    gcp_kms: FakeGcpKms, moto_server: MotoServer, tmp_path: Path
) -> None:
    """The key exists in one location; the URI names another: Cloud KMS says NOT_FOUND."""
    real = gcp_name("us-east1")
    gcp_kms.create_key(real)
    wrong = real.replace("/locations/us-east1/", f"/locations/{GCP_LOCATION}/")
    uri = gcp_uri(wrong)
    config = e2e_config(moto_server.endpoint_url, uri, tmp_path, location=GCP_LOCATION)
    err = await _start_fails(config, [OwnedGcpClient(gcp_kms.target)])
    msg = str(err)
    assert uri in msg and "gcp-kms" in msg and "failed validation" in msg
    assert "NotFound" in msg and f"{wrong} not found" in msg  # the service's own words
    assert err.key_uri == uri and err.provider == "gcp-kms"


async def test_validation_openbao_token_without_permission(
    openbao: OpenBaoServer, moto_server: MotoServer, tmp_path: Path
) -> None:
    name = uniq("k")
    openbao.create_key(name)
    other = openbao.api("POST", "auth/token/create", {"policies": ["default"], "ttl": "1h"})
    uri = vault_uri(openbao.host, name)
    config = e2e_config(moto_server.endpoint_url, uri, tmp_path)
    err = await _start_fails(config, vault_clients(str(other["auth"]["client_token"]))())
    msg = str(err)
    assert uri in msg and "vault-transit" in msg and "failed validation" in msg
    assert "HTTP 403" in msg and "permission denied" in msg


async def test_validation_unknown_scheme(moto_server: MotoServer, tmp_path: Path) -> None:
    uri = "nosuch-kms://key/1"
    config = e2e_config(moto_server.endpoint_url, uri, tmp_path)
    err = await _start_fails(config, [LocalKmsClient()])
    assert uri in str(err) and "no KMS provider" in str(err)


# ---- rotation inside the KMS -----------------------------------------------------------

ROTATION_TTL = 1.0


def _check_rotation(
    p: ProxyThread, direct: Any, rotate: Callable[[], None], v1: str, v2: str
) -> None:
    c = p.client()
    bucket = uniq("rot-")
    c.create_bucket(Bucket=bucket)
    old = data(50_000, 3)
    c.put_object(Bucket=bucket, Key="old", Body=old)
    assert direct.head_object(Bucket=bucket, Key="old")["Metadata"]["cmek-kekv"] == v1
    rotate()
    # the write data key is reused for one cache period; after it, new objects use v2
    time.sleep(ROTATION_TTL + 0.3)
    new = data(50_000, 4)
    c.put_object(Bucket=bucket, Key="new", Body=new)
    assert direct.head_object(Bucket=bucket, Key="new")["Metadata"]["cmek-kekv"] == v2
    # both open; the old one through the KMS again (its read cache entry expired too)
    assert c.get_object(Bucket=bucket, Key="old")["Body"].read() == old
    assert c.get_object(Bucket=bucket, Key="new")["Body"].read() == new
    for key in ("old", "new"):
        assert c.head_object(Bucket=bucket, Key=key)["SSEKMSKeyId"] == p.config.key_uris()[0]


def test_rotation_openbao(openbao: OpenBaoServer, moto_server: MotoServer, tmp_path: Path) -> None:
    name = uniq("k")
    token = openbao.create_key(name)
    config = e2e_config(
        moto_server.endpoint_url, vault_uri(openbao.host, name), tmp_path, cache_ttl=ROTATION_TTL
    )
    with ProxyThread(config, kms_clients=vault_clients(token)) as p:
        _check_rotation(p, backend_client(moto_server), lambda: openbao.rotate(name), "v1", "v2")


def _discard(_: object) -> None:
    return None


def test_rotation_gcp(gcp_kms: FakeGcpKms, moto_server: MotoServer, tmp_path: Path) -> None:
    name = gcp_name()
    gcp_kms.create_key(name)
    config = e2e_config(moto_server.endpoint_url, gcp_uri(name), tmp_path, cache_ttl=ROTATION_TTL)
    with ProxyThread(config, kms_clients=gcp_clients(gcp_kms)) as p:
        _check_rotation(
            p,
            backend_client(moto_server),
            lambda: _discard(gcp_kms.rotate(name)),
            f"{name}/cryptoKeyVersions/1",
            f"{name}/cryptoKeyVersions/2",
        )


# ---- single-flight through the proxy ----------------------------------------------------

CONCURRENT = 200


def test_single_flight_cold_proxy(
    moto_server: MotoServer, aws_front: ErrorFront, tmp_path: Path
) -> None:
    """200 concurrent GETs of cold objects sharing one wrapped data key: one Decrypt.

    The objects are written by one proxy; a second, new proxy (empty caches) reads them
    through the counting front.  The first Decrypt is held for 0.5 s so that all GETs
    miss the cache while it is in flight.
    """
    uri = "aws-kms://" + moto_server.create_key()
    bucket = uniq("sf-")
    bodies = {f"o/{i}": data(2_000 + i, 20) for i in range(CONCURRENT)}
    writer_cfg = e2e_config(moto_server.endpoint_url, uri, tmp_path)
    with ProxyThread(writer_cfg, kms_clients=aws_clients(moto_server)) as w:
        w.client().create_bucket(Bucket=bucket)

        async def write_all() -> None:
            async with S3Client(w.endpoint, CLIENT_AK, CLIENT_SK, max_connections=32) as s3:
                sem = asyncio.Semaphore(32)

                async def put(key: str, body: bytes) -> None:
                    async with sem:
                        await s3.put_object(bucket, key, body)

                await asyncio.gather(*(put(k, b) for k, b in bodies.items()))

        asyncio.run(write_all())
    direct = backend_client(moto_server)
    wrapped = {
        direct.head_object(Bucket=bucket, Key=k)["Metadata"]["cmek-dk"] for k in list(bodies)[:5]
    }
    assert len(wrapped) == 1  # one data key for the bucket in one cache period

    reader_cfg = e2e_config(moto_server.endpoint_url, uri, tmp_path)
    with ProxyThread(reader_cfg, kms_clients=aws_clients(moto_server, aws_front.endpoint_url)) as r:
        # start-up: validation (Encrypt + Decrypt) and the first probe (GenerateDataKey +
        # Decrypt); the probe interval is an hour, so nothing else calls the KMS
        wait_for(
            lambda: aws_front.calls["Decrypt"] == 2 and aws_front.calls["GenerateDataKey"] == 1,
            10,
            "start-up KMS calls",
        )
        before = sample(scrape(r), "cmek_key_cache_misses_total", kind="read")
        aws_front.inject_hang("Decrypt", 0.5)

        async def read_all() -> dict[str, bytes]:
            async with S3Client(r.endpoint, CLIENT_AK, CLIENT_SK, max_connections=CONCURRENT) as s3:
                got = await asyncio.gather(
                    *(s3.get_object(bucket, k, keep_body=True) for k in bodies)
                )
            return {k: body for k, (_, body) in zip(bodies, got, strict=True)}

        assert asyncio.run(read_all()) == bodies
        assert aws_front.calls["Decrypt"] == 3  # exactly one unwrap for all 200 GETs
        assert aws_front.calls["Encrypt"] == 1 and aws_front.calls["GenerateDataKey"] == 1
        after = scrape(r)
        # the GETs did miss concurrently: single-flight, not the cache, saved the calls
        assert sample(after, "cmek_key_cache_misses_total", kind="read") - before > 1
        assert (
            sample(
                after,
                "cmek_kms_request_duration_seconds_count",
                provider="aws-kms",
                operation="unwrap",
                outcome="ok",
            )
            == 3
        )
