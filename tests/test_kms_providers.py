"""The four cloud KMS providers against real servers (moto, OpenBao) and protocol fakes.

For each provider: generate -> unwrap round trip; a different context fails with
``IntegrityError`` (a moved or damaged object is not a denial of the key);
rotation keeps old wrapped keys opening; each denial maps to its ``DenialKind`` and
is not retried; transient failures are retried; a lasting outage raises
``KmsUnreachableError`` after the retry budget.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import grpc
import pytest

from proxy.errors import (
    DenialKind,
    IntegrityError,
    KeyConfigError,
    KeyUnavailableError,
    KmsUnreachableError,
)
from proxy.kms.aws import AwsKmsClient
from proxy.kms.azure import AzureKmsClient
from proxy.kms.base import DATA_KEY_BYTES, RetryPolicy
from proxy.kms.gcp import GcpKmsClient
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
    free_port,
    gcp_async_client,
)

# fixtures from tests/kms_servers.py, bound here so pytest finds them in this module
moto_server = kms_servers.moto_server
aws_front = kms_servers.aws_front
openbao = kms_servers.openbao
vault_front = kms_servers.vault_front
gcp_kms = kms_servers.gcp_kms
azure_tls = kms_servers.azure_tls
azure_kv = kms_servers.azure_kv

ATTEMPTS = 3
FAST = RetryPolicy(attempts=ATTEMPTS, base_delay=0.001, max_delay=0.005, timeout=10.0)
CTX = {"bucket": "b"}
OTHER_CTX = {"bucket": "other"}


def _name() -> str:
    return "k" + os.urandom(6).hex()


# ---- AWS KMS (moto) -------------------------------------------------------------------


@pytest.fixture
async def aws_direct(moto_server: MotoServer) -> AsyncIterator[AwsKmsClient]:
    client = AwsKmsClient(
        session=moto_server.session(), endpoint_url=moto_server.endpoint_url, retry=FAST
    )
    yield client
    await client.close()


@pytest.fixture
async def aws_fronted(
    moto_server: MotoServer, aws_front: ErrorFront
) -> AsyncIterator[AwsKmsClient]:
    client = AwsKmsClient(
        session=moto_server.session(), endpoint_url=aws_front.endpoint_url, retry=FAST
    )
    yield client
    await client.close()


async def test_aws_round_trip(moto_server: MotoServer, aws_direct: AwsKmsClient) -> None:
    arn = moto_server.create_key()
    kek = aws_direct.get_kek("aws-kms://" + arn)
    assert kek.provider == "aws-kms"
    assert kek.location == moto_server.region
    dk = await kek.generate_data_key(CTX)
    assert len(dk.plaintext) == DATA_KEY_BYTES
    assert dk.key_version == arn
    assert await kek.unwrap(dk.wrapped, CTX) == dk.plaintext
    w = await kek.wrap(b"x" * 32, CTX)
    assert await kek.unwrap(w.wrapped, CTX) == b"x" * 32


async def test_aws_alias_round_trip(moto_server: MotoServer, aws_direct: AwsKmsClient) -> None:
    arn = moto_server.create_key()
    alias_arn = moto_server.create_alias(_name(), arn)
    kek = aws_direct.get_kek("aws-kms://" + alias_arn)
    dk = await kek.generate_data_key(CTX)
    assert dk.key_version == arn  # the key the alias named
    assert await kek.unwrap(dk.wrapped, CTX) == dk.plaintext


async def test_aws_other_context_fails(moto_server: MotoServer, aws_direct: AwsKmsClient) -> None:
    kek = aws_direct.get_kek("aws-kms://" + moto_server.create_key())
    dk = await kek.generate_data_key(CTX)
    with pytest.raises(IntegrityError) as ei:
        await kek.unwrap(dk.wrapped, OTHER_CTX)
    assert kek.uri in str(ei.value) and "InvalidCiphertextException" in str(ei.value)


async def test_aws_rotation_keeps_old_blobs(
    moto_server: MotoServer, aws_direct: AwsKmsClient
) -> None:
    arn = moto_server.create_key()
    kek = aws_direct.get_kek("aws-kms://" + arn)
    old = await kek.generate_data_key(CTX)
    moto_server.boto3().rotate_key_on_demand(KeyId=arn)
    new = await kek.generate_data_key(CTX)
    assert await kek.unwrap(old.wrapped, CTX) == old.plaintext
    assert await kek.unwrap(new.wrapped, CTX) == new.plaintext
    assert new.key_version == arn  # AWS rotation is transparent: the version is the key


async def test_aws_missing_key_is_invalid_state(
    moto_server: MotoServer, aws_direct: AwsKmsClient
) -> None:
    arn = moto_server.create_key().rsplit("/", 1)[0] + "/00000000-0000-0000-0000-000000000000"
    with pytest.raises(KeyUnavailableError) as ei:
        await aws_direct.get_kek("aws-kms://" + arn).generate_data_key(CTX)
    assert ei.value.kind is DenialKind.INVALID_STATE


@pytest.mark.parametrize(
    ("error_type", "kind"),
    [
        ("DisabledException", DenialKind.DISABLED),
        ("KMSInvalidStateException", DenialKind.INVALID_STATE),
        ("NotFoundException", DenialKind.INVALID_STATE),
        ("AccessDeniedException", DenialKind.ACCESS_DENIED),
    ],
)
async def test_aws_denials_not_retried(
    moto_server: MotoServer,
    aws_front: ErrorFront,
    aws_fronted: AwsKmsClient,
    error_type: str,
    kind: DenialKind,
) -> None:
    kek = aws_fronted.get_kek("aws-kms://" + moto_server.create_key())
    dk = await kek.generate_data_key(CTX)
    aws_front.inject("Decrypt", error_type, times=5)
    with pytest.raises(KeyUnavailableError) as ei:
        await kek.unwrap(dk.wrapped, CTX)
    assert ei.value.kind is kind
    assert error_type in str(ei.value) and kek.uri in str(ei.value)
    assert ei.value.key_uri == kek.uri and ei.value.provider == "aws-kms"
    assert aws_front.calls["Decrypt"] == 1


async def test_aws_invalid_ciphertext_not_retried(
    moto_server: MotoServer, aws_front: ErrorFront, aws_fronted: AwsKmsClient
) -> None:
    kek = aws_fronted.get_kek("aws-kms://" + moto_server.create_key())
    dk = await kek.generate_data_key(CTX)
    aws_front.inject("Decrypt", "InvalidCiphertextException", times=5)
    with pytest.raises(IntegrityError):
        await kek.unwrap(dk.wrapped, CTX)
    assert aws_front.calls["Decrypt"] == 1


async def test_aws_throttling_retried(
    moto_server: MotoServer, aws_front: ErrorFront, aws_fronted: AwsKmsClient
) -> None:
    kek = aws_fronted.get_kek("aws-kms://" + moto_server.create_key())
    aws_front.inject("GenerateDataKey", "ThrottlingException", times=2)
    dk = await kek.generate_data_key(CTX)
    assert aws_front.calls["GenerateDataKey"] == 3
    assert await kek.unwrap(dk.wrapped, CTX) == dk.plaintext


async def test_aws_outage_exhausts_retries(
    moto_server: MotoServer, aws_front: ErrorFront, aws_fronted: AwsKmsClient
) -> None:
    kek = aws_fronted.get_kek("aws-kms://" + moto_server.create_key())
    aws_front.inject("GenerateDataKey", "KMSInternalException", status=500, times=10)
    with pytest.raises(KmsUnreachableError):
        await kek.generate_data_key(CTX)
    assert aws_front.calls["GenerateDataKey"] == ATTEMPTS


async def test_aws_hung_kms_times_out(moto_server: MotoServer, aws_front: ErrorFront) -> None:
    policy = RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.005, timeout=0.3)
    client = AwsKmsClient(
        session=moto_server.session(), endpoint_url=aws_front.endpoint_url, retry=policy
    )
    try:
        kek = client.get_kek("aws-kms://" + moto_server.create_key())
        aws_front.inject_hang("GenerateDataKey", 5.0, times=2)
        with pytest.raises(KmsUnreachableError):
            await kek.generate_data_key(CTX)
        assert aws_front.calls["GenerateDataKey"] == 2
    finally:
        await client.close()


async def test_aws_connection_refused_is_unreachable(moto_server: MotoServer) -> None:
    client = AwsKmsClient(
        session=moto_server.session(),
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        retry=FAST,
    )
    try:
        kek = client.get_kek("aws-kms://arn:aws:kms:eu-west-1:123456789012:key/abc")
        with pytest.raises(KmsUnreachableError):
            await kek.generate_data_key(CTX)
    finally:
        await client.close()


@pytest.mark.parametrize(
    "uri",
    [
        "aws-kms://arn:aws:kms:eu-west-1:123456789012:bucket/x",
        "aws-kms://arn:aws:s3:eu-west-1:123456789012:key/x",
        "aws-kms://arn:aws:kms:eu-west-1:12345:key/x",
        "gcp-kms://projects/p/locations/l/keyRings/r/cryptoKeys/k",
    ],
)
def test_aws_bad_uris(uri: str) -> None:
    client = AwsKmsClient(retry=FAST)
    assert client.does_support(uri) is uri.startswith("aws-kms://")
    with pytest.raises(KeyConfigError):
        client.get_kek(uri)


# ---- Google Cloud KMS (gRPC fake) -------------------------------------------------------

GCP_KEY = "projects/proj-1234/locations/europe-west4/keyRings/ring/cryptoKeys/key"


@pytest.fixture
async def gcp(gcp_kms: FakeGcpKms) -> AsyncIterator[GcpKmsClient]:
    sdk = gcp_async_client(gcp_kms.target)
    gcp_kms.create_key(GCP_KEY)
    client = GcpKmsClient(client=sdk, retry=FAST)
    yield client
    await client.close()
    await sdk.transport.close()  # type: ignore[no-untyped-call]


async def test_gcp_round_trip(gcp_kms: FakeGcpKms, gcp: GcpKmsClient) -> None:
    kek = gcp.get_kek("gcp-kms://" + GCP_KEY)
    assert kek.provider == "gcp-kms" and kek.location == "europe-west4"
    dk = await kek.generate_data_key(CTX)
    assert len(dk.plaintext) == DATA_KEY_BYTES
    assert dk.key_version == GCP_KEY + "/cryptoKeyVersions/1"
    assert await kek.unwrap(dk.wrapped, CTX) == dk.plaintext
    assert gcp_kms.calls == {"Encrypt": 1, "Decrypt": 1}


async def test_gcp_other_context_fails(gcp: GcpKmsClient) -> None:
    kek = gcp.get_kek("gcp-kms://" + GCP_KEY)
    dk = await kek.generate_data_key(CTX)
    with pytest.raises(IntegrityError):
        await kek.unwrap(dk.wrapped, OTHER_CTX)
    with pytest.raises(IntegrityError):
        await kek.unwrap(dk.wrapped[:-1] + bytes([dk.wrapped[-1] ^ 1]), CTX)


async def test_gcp_rotation(gcp_kms: FakeGcpKms, gcp: GcpKmsClient) -> None:
    kek = gcp.get_kek("gcp-kms://" + GCP_KEY)
    old = await kek.generate_data_key(CTX)
    v2 = gcp_kms.rotate(GCP_KEY)
    new = await kek.generate_data_key(CTX)
    assert new.key_version == v2 != old.key_version
    assert await kek.unwrap(old.wrapped, CTX) == old.plaintext
    assert await kek.unwrap(new.wrapped, CTX) == new.plaintext


@pytest.mark.parametrize(
    ("action", "kind"),
    [
        ("disable", DenialKind.DISABLED),
        ("destroy", DenialKind.INVALID_STATE),
        ("deny", DenialKind.ACCESS_DENIED),
    ],
)
async def test_gcp_denials_not_retried(
    gcp_kms: FakeGcpKms, gcp: GcpKmsClient, action: str, kind: DenialKind
) -> None:
    kek = gcp.get_kek("gcp-kms://" + GCP_KEY)
    dk = await kek.generate_data_key(CTX)
    if action == "disable":
        gcp_kms.set_state(GCP_KEY, 1, "DISABLED")
    elif action == "destroy":
        gcp_kms.set_state(GCP_KEY, 1, "DESTROYED")
    else:
        gcp_kms.deny(GCP_KEY)
    with pytest.raises(KeyUnavailableError) as ei:
        await kek.unwrap(dk.wrapped, CTX)
    assert ei.value.kind is kind and kek.uri in str(ei.value)
    assert gcp_kms.calls["Decrypt"] == 1
    with pytest.raises(KeyUnavailableError) as ei2:
        await kek.generate_data_key(CTX)
    assert ei2.value.kind is kind
    assert gcp_kms.calls["Encrypt"] == 2


async def test_gcp_disable_then_enable(gcp_kms: FakeGcpKms, gcp: GcpKmsClient) -> None:
    kek = gcp.get_kek("gcp-kms://" + GCP_KEY)
    dk = await kek.generate_data_key(CTX)
    gcp_kms.set_state(GCP_KEY, 1, "DISABLED")
    with pytest.raises(KeyUnavailableError):
        await kek.unwrap(dk.wrapped, CTX)
    gcp_kms.set_state(GCP_KEY, 1, "ENABLED")
    assert await kek.unwrap(dk.wrapped, CTX) == dk.plaintext


async def test_gcp_missing_key(gcp_kms: FakeGcpKms, gcp: GcpKmsClient) -> None:
    kek = gcp.get_kek("gcp-kms://" + GCP_KEY.rsplit("/", 1)[0] + "/nokey")
    with pytest.raises(KeyUnavailableError) as ei:
        await kek.generate_data_key(CTX)
    assert ei.value.kind is DenialKind.INVALID_STATE


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
    ],
)
async def test_gcp_transient_retried(
    gcp_kms: FakeGcpKms, gcp: GcpKmsClient, code: grpc.StatusCode
) -> None:
    kek = gcp.get_kek("gcp-kms://" + GCP_KEY)
    gcp_kms.fail_next(2, code)
    dk = await kek.generate_data_key(CTX)
    assert gcp_kms.calls["Encrypt"] == 3
    assert await kek.unwrap(dk.wrapped, CTX) == dk.plaintext


async def test_gcp_outage_exhausts_retries(gcp_kms: FakeGcpKms, gcp: GcpKmsClient) -> None:
    kek = gcp.get_kek("gcp-kms://" + GCP_KEY)
    gcp_kms.fail_next(10)
    with pytest.raises(KmsUnreachableError):
        await kek.generate_data_key(CTX)
    assert gcp_kms.calls["Encrypt"] == ATTEMPTS


async def test_gcp_checksum_mismatch_retried(gcp_kms: FakeGcpKms, gcp: GcpKmsClient) -> None:
    kek = gcp.get_kek("gcp-kms://" + GCP_KEY)
    gcp_kms.corrupt_next(1)
    dk = await kek.generate_data_key(CTX)
    assert gcp_kms.calls["Encrypt"] == 2
    gcp_kms.corrupt_next(1)
    assert await kek.unwrap(dk.wrapped, CTX) == dk.plaintext
    assert gcp_kms.calls["Decrypt"] == 2
    gcp_kms.corrupt_next(10)
    with pytest.raises(KmsUnreachableError):
        await kek.unwrap(dk.wrapped, CTX)


@pytest.mark.parametrize(
    "uri",
    [
        "gcp-kms://projects/p/locations/l/keyRings/r",
        "gcp-kms://projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1",
        "gcp-kms://",
    ],
)
def test_gcp_bad_uris(uri: str) -> None:
    client = GcpKmsClient(retry=FAST)
    assert client.does_support(uri)
    with pytest.raises(KeyConfigError):
        client.get_kek(uri)


# ---- Azure Key Vault (HTTPS fake) --------------------------------------------------------


@pytest.fixture
async def azure(azure_kv: FakeKeyVault, azure_tls: TlsMaterial) -> AsyncIterator[AzureKmsClient]:
    client = AzureKmsClient(
        StaticTokenCredential(azure_kv.token),
        client_kwargs=azure_client_kwargs(azure_tls),
        key_refresh=0.0,
        retry=FAST,
    )
    yield client
    await client.close()


async def test_azure_round_trip(azure_kv: FakeKeyVault, azure: AzureKmsClient) -> None:
    v1 = azure_kv.create_key("cmek")
    kek = azure.get_kek(f"azure-kv://{azure_kv.host}/keys/cmek")
    assert kek.provider == "azure-kv" and kek.location is None
    dk = await kek.generate_data_key(CTX)
    assert len(dk.plaintext) == DATA_KEY_BYTES
    assert dk.key_version == f"{azure_kv.vault_url}/keys/cmek/{v1}"
    assert await kek.unwrap(dk.wrapped, CTX) == dk.plaintext
    assert azure_kv.calls["wrapkey"] == 0  # wrapped locally with the public key
    assert azure_kv.calls["unwrapkey"] == 1


async def test_azure_pinned_version(azure_kv: FakeKeyVault, azure: AzureKmsClient) -> None:
    v1 = azure_kv.create_key("cmek")
    azure_kv.rotate("cmek")
    kek = azure.get_kek(f"azure-kv://{azure_kv.host}/keys/cmek/{v1}")
    dk = await kek.generate_data_key(CTX)
    assert dk.key_version.endswith("/" + v1)
    assert await kek.unwrap(dk.wrapped, CTX) == dk.plaintext


async def test_azure_other_context_fails(azure_kv: FakeKeyVault, azure: AzureKmsClient) -> None:
    azure_kv.create_key("cmek")
    kek = azure.get_kek(f"azure-kv://{azure_kv.host}/keys/cmek")
    dk = await kek.generate_data_key(CTX)
    with pytest.raises(IntegrityError):
        await kek.unwrap(dk.wrapped, OTHER_CTX)
    tampered = dk.wrapped[:-1] + bytes([dk.wrapped[-1] ^ 1])
    with pytest.raises(IntegrityError):
        await kek.unwrap(tampered, CTX)
    with pytest.raises(IntegrityError):
        await kek.unwrap(b"AKV1" + b"\x00" * 10, CTX)


async def test_azure_rotation(azure_kv: FakeKeyVault, azure: AzureKmsClient) -> None:
    v1 = azure_kv.create_key("cmek")
    kek = azure.get_kek(f"azure-kv://{azure_kv.host}/keys/cmek")
    old = await kek.generate_data_key(CTX)
    v2 = azure_kv.rotate("cmek")
    new = await kek.generate_data_key(CTX)
    assert old.key_version.endswith(v1) and new.key_version.endswith(v2)
    assert await kek.unwrap(old.wrapped, CTX) == old.plaintext
    assert await kek.unwrap(new.wrapped, CTX) == new.plaintext


async def test_azure_disabled(azure_kv: FakeKeyVault, azure: AzureKmsClient) -> None:
    azure_kv.create_key("cmek")
    kek = azure.get_kek(f"azure-kv://{azure_kv.host}/keys/cmek")
    dk = await kek.generate_data_key(CTX)
    azure_kv.set_enabled("cmek", False)
    with pytest.raises(KeyUnavailableError) as ei:
        await kek.unwrap(dk.wrapped, CTX)
    assert ei.value.kind is DenialKind.DISABLED
    assert azure_kv.calls["unwrapkey"] == 1
    with pytest.raises(KeyUnavailableError) as ei2:
        await kek.generate_data_key(CTX)
    assert ei2.value.kind is DenialKind.DISABLED
    azure_kv.set_enabled("cmek", True)
    assert await kek.unwrap(dk.wrapped, CTX) == dk.plaintext


async def test_azure_access_denied(azure_kv: FakeKeyVault, azure: AzureKmsClient) -> None:
    azure_kv.create_key("cmek")
    kek = azure.get_kek(f"azure-kv://{azure_kv.host}/keys/cmek")
    dk = await kek.generate_data_key(CTX)
    azure_kv.deny("cmek")
    with pytest.raises(KeyUnavailableError) as ei:
        await kek.unwrap(dk.wrapped, CTX)
    assert ei.value.kind is DenialKind.ACCESS_DENIED
    assert azure_kv.calls["unwrapkey"] == 1
    azure_kv.allow("cmek")
    assert await kek.unwrap(dk.wrapped, CTX) == dk.plaintext


async def test_azure_deleted_key(azure_kv: FakeKeyVault, azure: AzureKmsClient) -> None:
    azure_kv.create_key("cmek")
    kek = azure.get_kek(f"azure-kv://{azure_kv.host}/keys/cmek")
    dk = await kek.generate_data_key(CTX)
    azure_kv.delete_key("cmek")
    with pytest.raises(KeyUnavailableError) as ei:
        await kek.unwrap(dk.wrapped, CTX)
    assert ei.value.kind is DenialKind.INVALID_STATE
    with pytest.raises(KeyUnavailableError) as ei2:
        await kek.generate_data_key(CTX)
    assert ei2.value.kind is DenialKind.INVALID_STATE


@pytest.mark.parametrize("status", [503, 429])
async def test_azure_transient_retried(
    azure_kv: FakeKeyVault, azure: AzureKmsClient, status: int
) -> None:
    azure_kv.create_key("cmek")
    kek = azure.get_kek(f"azure-kv://{azure_kv.host}/keys/cmek")
    dk = await kek.generate_data_key(CTX)
    await kek.unwrap(dk.wrapped, CTX)  # the unwrap client has fetched its key
    before = azure_kv.calls["unwrapkey"]
    azure_kv.fail_next(2, status)
    assert await kek.unwrap(dk.wrapped, CTX) == dk.plaintext
    assert azure_kv.calls["unwrapkey"] - before == 3
    azure_kv.fail_next(1, status)
    assert len((await kek.generate_data_key(CTX)).plaintext) == DATA_KEY_BYTES  # key re-fetch


async def test_azure_outage_exhausts_retries(azure_kv: FakeKeyVault, azure: AzureKmsClient) -> None:
    azure_kv.create_key("cmek")
    kek = azure.get_kek(f"azure-kv://{azure_kv.host}/keys/cmek")
    dk = await kek.generate_data_key(CTX)
    await kek.unwrap(dk.wrapped, CTX)  # the unwrap client has fetched its key
    before = azure_kv.calls["unwrapkey"]
    azure_kv.fail_next(50, 503)
    with pytest.raises(KmsUnreachableError):
        await kek.unwrap(dk.wrapped, CTX)
    assert azure_kv.calls["unwrapkey"] - before == ATTEMPTS


@pytest.mark.parametrize(
    "uri",
    ["azure-kv://vault.example.net/secrets/x", "azure-kv://vault.example.net/keys/", "azure-kv://"],
)
def test_azure_bad_uris(uri: str) -> None:
    client = AzureKmsClient(StaticTokenCredential("t"), retry=FAST)
    with pytest.raises(KeyConfigError):
        client.get_kek(uri)


# ---- Vault / OpenBao Transit (real dev server) ---------------------------------------------


@pytest.fixture
async def bao_key(openbao: OpenBaoServer) -> tuple[str, str]:
    """(key name, token allowed to use it)."""
    name = _name()
    return name, openbao.create_key(name)


async def test_vault_round_trip(openbao: OpenBaoServer, bao_key: tuple[str, str]) -> None:
    name, token = bao_key
    client = VaultTransitClient(token=token, tls=False, retry=FAST)
    try:
        kek = client.get_kek(f"vault-transit://{openbao.host}/transit/keys/{name}")
        assert kek.provider == "vault-transit" and kek.location is None
        dk = await kek.generate_data_key(CTX)
        assert len(dk.plaintext) == DATA_KEY_BYTES and dk.key_version == "v1"
        assert dk.wrapped.startswith(b"vault:v1:")
        assert await kek.unwrap(dk.wrapped, CTX) == dk.plaintext
        w = await kek.wrap(b"y" * 32, CTX)
        assert await kek.unwrap(w.wrapped, CTX) == b"y" * 32
        with pytest.raises(IntegrityError):
            await kek.unwrap(dk.wrapped, OTHER_CTX)
        with pytest.raises(IntegrityError):
            await kek.unwrap(b"not-a-transit-ciphertext", CTX)
    finally:
        await client.close()


async def test_vault_rotation(openbao: OpenBaoServer, bao_key: tuple[str, str]) -> None:
    name, token = bao_key
    client = VaultTransitClient(token=token, tls=False, retry=FAST)
    try:
        kek = client.get_kek(f"vault-transit://{openbao.host}/transit/keys/{name}")
        old = await kek.generate_data_key(CTX)
        openbao.rotate(name)
        new = await kek.generate_data_key(CTX)
        assert (old.key_version, new.key_version) == ("v1", "v2")
        assert await kek.unwrap(old.wrapped, CTX) == old.plaintext
        assert await kek.unwrap(new.wrapped, CTX) == new.plaintext
        openbao.set_min_decryption_version(name, 2)
        with pytest.raises(KeyUnavailableError) as ei:
            await kek.unwrap(old.wrapped, CTX)
        assert ei.value.kind is DenialKind.DISABLED
    finally:
        await client.close()


async def test_vault_policy_revoked_then_restored(
    openbao: OpenBaoServer, bao_key: tuple[str, str], vault_front: ErrorFront
) -> None:
    name, token = bao_key
    client = VaultTransitClient(token=token, tls=False, retry=FAST)
    try:
        kek = client.get_kek(f"vault-transit://{vault_front.host}/transit/keys/{name}")
        dk = await kek.generate_data_key(CTX)
        openbao.deny(name)
        with pytest.raises(KeyUnavailableError) as ei:
            await kek.unwrap(dk.wrapped, CTX)
        assert ei.value.kind is DenialKind.ACCESS_DENIED
        assert vault_front.calls[f"/v1/transit/decrypt/{name}"] == 1
        openbao.allow(name)
        assert await kek.unwrap(dk.wrapped, CTX) == dk.plaintext
    finally:
        await client.close()


async def test_vault_deleted_key(openbao: OpenBaoServer, bao_key: tuple[str, str]) -> None:
    name, token = bao_key
    client = VaultTransitClient(token=token, tls=False, retry=FAST)
    try:
        kek = client.get_kek(f"vault-transit://{openbao.host}/transit/keys/{name}")
        dk = await kek.generate_data_key(CTX)
        openbao.delete_key(name)
        with pytest.raises(KeyUnavailableError) as ei:
            await kek.unwrap(dk.wrapped, CTX)
        assert ei.value.kind is DenialKind.INVALID_STATE
    finally:
        await client.close()


@pytest.mark.parametrize("status", [503, 429, 500])
async def test_vault_transient_retried(
    openbao: OpenBaoServer, bao_key: tuple[str, str], vault_front: ErrorFront, status: int
) -> None:
    name, token = bao_key
    client = VaultTransitClient(token=token, tls=False, retry=FAST)
    op = f"/v1/transit/datakey/plaintext/{name}"
    try:
        kek = client.get_kek(f"vault-transit://{vault_front.host}/transit/keys/{name}")
        vault_front.inject_json(op, status, {"errors": ["Vault is sealed"]}, times=2)
        dk = await kek.generate_data_key(CTX)
        assert vault_front.calls[op] == 3
        assert await kek.unwrap(dk.wrapped, CTX) == dk.plaintext
        vault_front.inject_json(op, 503, {"errors": ["Vault is sealed"]}, times=10)
        with pytest.raises(KmsUnreachableError):
            await kek.generate_data_key(CTX)
        assert vault_front.calls[op] == 3 + 1 + ATTEMPTS - 1
    finally:
        await client.close()


async def test_vault_connection_refused() -> None:
    client = VaultTransitClient(token="t", tls=False, retry=FAST)
    try:
        kek = client.get_kek(f"vault-transit://127.0.0.1:{free_port()}/transit/keys/k")
        with pytest.raises(KmsUnreachableError):
            await kek.generate_data_key(CTX)
    finally:
        await client.close()


async def test_vault_token_sources(
    openbao: OpenBaoServer,
    bao_key: tuple[str, str],
    tmp_path: os.PathLike[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name, token = bao_key
    uri = f"vault-transit://{openbao.host}/transit/keys/{name}"
    token_file = os.path.join(tmp_path, "token")
    with open(token_file, "w") as fh:
        fh.write(token + "\n")
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    monkeypatch.setenv("BAO_TOKEN", token)
    for client in (
        VaultTransitClient(token_file=token_file, tls=False, retry=FAST),
        VaultTransitClient(tls=False, retry=FAST),
    ):
        try:
            dk = await client.get_kek(uri).generate_data_key(CTX)
            assert len(dk.plaintext) == DATA_KEY_BYTES
        finally:
            await client.close()
    monkeypatch.delenv("BAO_TOKEN")
    client = VaultTransitClient(tls=False, retry=FAST)
    with pytest.raises(KeyConfigError):
        await client.get_kek(uri).generate_data_key(CTX)
    await client.close()


@pytest.mark.parametrize(
    "uri",
    [
        "vault-transit://host:8200/transit/key/x",
        "vault-transit://host:8200/keys/x",
        "vault-transit:///transit/keys/x",
    ],
)
def test_vault_bad_uris(uri: str) -> None:
    with pytest.raises(KeyConfigError):
        VaultTransitClient(token="t").get_kek(uri)
