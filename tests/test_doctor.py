"""``cmek-proxy doctor``, ``whoami`` and ``keygen`` against real servers and the KMS fakes."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.cli.doctor import Report, diagnose, identities
from proxy.config import Config
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
    AWS_ACCESS_KEY,
    AWS_SECRET_KEY,
    MotoServer,
    OpenBaoServer,
    StaticTokenCredential,
    azure_client_kwargs,
    gcp_async_client,
)
from tests.servers import Server, free_port, new_keyfile, proxy_config

moto_server = kms_servers.moto_server
openbao = kms_servers.openbao
gcp_kms = kms_servers.gcp_kms
azure_tls = kms_servers.azure_tls
azure_kv = kms_servers.azure_kv

FAST = RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.005, timeout=10.0)


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    res = subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    assert "Traceback" not in res.stderr, res.stderr
    return res.returncode, res.stdout, res.stderr


def write(config: Config, path: Path) -> str:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
    return str(path)


def with_keys(config: Config, *uris: str) -> Config:
    tree = config.model_dump(mode="json", exclude_none=True)
    tree["encryption"]["buckets"] = {f"b{i}": {"key": u} for i, u in enumerate(uris)}
    return Config.model_validate(tree)


def check(report: Report, name: str) -> dict[str, Any]:
    found = [c for c in report.checks if c["check"] == name]
    assert found, [c["check"] for c in report.checks]
    return found[0]


# ---- local keys, the backend, the CLI ---------------------------------------------------


def test_doctor_all_ok(moto: Server, tmp_path: Path) -> None:
    keyfile = new_keyfile(tmp_path / "k.json")
    cfg = proxy_config(moto.url, keyfile, specs={"control_bucket": "doctor-control"})
    code, out, _ = cli("doctor", "--config", write(cfg, tmp_path / "c.yaml"))
    assert code == 0, out
    uri = f"local://{keyfile}"
    assert f"ok   backend {moto.url}: reachable, credentials accepted" in out
    assert f"ok   key {uri} round trip: wrap and unwrap agree" in out
    assert f"key {uri} provider: local" in out
    assert f"key {uri} rotation: 1 key(s), primary 'k1'" in out
    assert "cache: unwrapped keys kept 300s" in out
    assert out.rstrip().endswith("doctor: all checks passed")

    code, out, _ = cli("doctor", "--config", str(tmp_path / "c.yaml"), "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] is True
    assert {c["check"] for c in report["checks"]} >= {"config", f"key {uri} round trip"}


def test_doctor_reports_each_failure(tmp_path: Path) -> None:
    keyfile = new_keyfile(tmp_path / "k.json")
    url = f"http://127.0.0.1:{free_port()}"
    cfg = write(proxy_config(url, keyfile), tmp_path / "c.yaml")
    keyfile.unlink()
    code, out, _ = cli("doctor", "--config", cfg)
    assert code == 1
    assert f"FAIL backend {url}: " in out and "unreachable" in out
    assert f"FAIL key local://{keyfile} round trip: " in out
    assert out.rstrip().endswith("doctor: 2 failed")


def test_doctor_key_without_provider(moto: Server, tmp_path: Path) -> None:
    keyfile = new_keyfile(tmp_path / "k.json")
    cfg = proxy_config(moto.url, keyfile, encryption={"default": {"key": "nope://x"}})
    code, out, _ = cli("doctor", "--config", write(cfg, tmp_path / "c.yaml"))
    assert code == 1
    assert "FAIL key nope://x: no provider supports this key URI" in out


# ---- keygen ------------------------------------------------------------------------------


def test_keygen_creates_then_rotates(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "keys.json"
    code, out, _ = cli("keygen", str(path))
    assert code == 0 and f"key URI: local://{path}" in out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    code, _, err = cli("keygen", str(path))
    assert code == 4 and "already exists; use --rotate" in err

    kek = LocalKmsClient().get_kek(f"local://{path}")
    old = asyncio.run(kek.wrap(b"k" * 32, {"bucket": "b"}))
    code, out, _ = cli("keygen", "--rotate", str(path))
    assert code == 0 and "new primary key 'k2' (2 keys)" in out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    kek = LocalKmsClient().get_kek(f"local://{path}")
    assert asyncio.run(kek.unwrap(old.wrapped, {"bucket": "b"})) == b"k" * 32
    assert asyncio.run(kek.wrap(b"k" * 32, {"bucket": "b"})).key_version == "k2"

    code, _, err = cli("keygen", "--rotate", str(tmp_path / "none.json"))
    assert code == 4 and "does not exist" in err


# ---- AWS: STS GetCallerIdentity and rotation status from moto ----------------------------


def _aws(moto_server: MotoServer) -> AwsKmsClient:
    return AwsKmsClient(session=moto_server.session(), endpoint_url=moto_server.endpoint_url)


def test_aws_identity_grant_and_rotation(
    moto: Server, moto_server: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arn = moto_server.create_key()
    uri = f"aws-kms://{arn}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", moto_server.endpoint_url)
    config = with_keys(proxy_config(moto.url, new_keyfile(tmp_path / "k.json")), uri)

    def clients() -> list[KmsClient]:
        return [LocalKmsClient(), _aws(moto_server)]

    report = asyncio.run(diagnose(config, "c.yaml", kms_clients=clients()))
    assert report.ok, report.lines()
    assert check(report, f"key {uri} rotation")["text"] == "automatic rotation off"
    assert check(report, f"key {uri} location")["text"] == moto_server.region
    assert "123456789012" in check(report, f"key {uri} identity")["text"]

    moto_server.boto3().enable_key_rotation(KeyId=arn)
    report = asyncio.run(diagnose(config, "c.yaml", kms_clients=clients()))
    assert check(report, f"key {uri} rotation")["text"].startswith("automatic rotation on")

    (aws,) = [
        i
        for i in asyncio.run(identities(config, kms_clients=clients()))
        if i["provider"] == "aws-kms"
    ]
    assert aws["keys"] == [uri]
    statement = json.loads(aws["grant"].split("\n", 1)[1])
    assert statement["Principal"] == {"AWS": aws["principal"]}
    assert aws["principal"].startswith("arn:aws:")
    assert set(statement["Action"]) >= {"kms:GenerateDataKey", "kms:Encrypt", "kms:Decrypt"}


def test_whoami_cli_against_moto_sts(moto: Server, moto_server: MotoServer, tmp_path: Path) -> None:
    """The CLI with the standard AWS environment, as an operator would run it."""
    uri = f"aws-kms://{moto_server.create_key()}"
    cfg = write(
        with_keys(proxy_config(moto.url, new_keyfile(tmp_path / "k.json")), uri),
        tmp_path / "c.yaml",
    )
    env = {
        "AWS_ENDPOINT_URL": moto_server.endpoint_url,
        "AWS_ACCESS_KEY_ID": AWS_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET_KEY,
        "AWS_DEFAULT_REGION": moto_server.region,
    }
    code, out, _ = cli("whoami", "--config", cfg, "--json", env=env)
    assert code == 0
    (aws,) = [i for i in json.loads(out) if i["provider"] == "aws-kms"]
    assert aws["principal"].startswith("arn:aws:") and "GetCallerIdentity" in aws["detail"]
    code, out, _ = cli("whoami", "--config", cfg, env=env)
    assert f"aws-kms: {aws['principal']}" in out and '"Principal"' in out
    code, out, _ = cli("doctor", "--config", cfg, env=env)
    assert code == 0, out
    assert f"ok   key {uri} round trip" in out


# ---- Vault / OpenBao: token lookup-self, the policy, the key's versions -----------------


def test_vault_identity_policy_and_rotation(
    moto: Server, openbao: OpenBaoServer, tmp_path: Path
) -> None:
    name = "doc" + os.urandom(4).hex()
    token = openbao.create_key(name)
    openbao.rotate(name)
    uri = f"vault-transit://{openbao.host}/transit/keys/{name}"
    config = with_keys(proxy_config(moto.url, new_keyfile(tmp_path / "k.json")), uri)

    def clients(tok: str) -> Sequence[KmsClient]:
        return [LocalKmsClient(), VaultTransitClient(token=tok, tls=False, retry=FAST)]

    report = asyncio.run(diagnose(config, "c", kms_clients=clients(token)))
    assert report.ok, report.lines()
    rotation = check(report, f"key {uri} rotation")["text"]
    assert rotation.startswith("unknown:") and "403" in rotation  # the app token may not read
    assert check(report, f"key {uri} identity")["text"] == "token"

    report = asyncio.run(diagnose(config, "c", kms_clients=clients(openbao.root_token)))
    rotation = check(report, f"key {uri} rotation")["text"]
    assert rotation.startswith("latest version v2, min decryption version v1"), rotation

    (vault,) = [
        i
        for i in asyncio.run(identities(config, kms_clients=clients(token)))
        if i["provider"] == "vault-transit"
    ]
    assert f"[{name!r}" in vault["detail"] or name in vault["detail"]
    assert f'path "transit/encrypt/{name}"' in vault["grant"]
    assert f'path "transit/decrypt/{name}"' in vault["grant"]


# ---- GCP: the service account of ADC, the key's rotation period -------------------------


def _service_account_file(path: Path, email: str) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "acme",
                "private_key_id": "1",
                "private_key": pem,
                "client_email": email,
                "client_id": "1",
                "token_uri": "https://oauth2.googleapis.com/token",
            }
        )
    )
    return path


def test_gcp_identity_grant_and_rotation(
    moto: Server, gcp_kms: FakeGcpKms, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    email = "cmek-proxy@acme.iam.gserviceaccount.com"
    monkeypatch.setenv(
        "GOOGLE_APPLICATION_CREDENTIALS", str(_service_account_file(tmp_path / "sa.json", email))
    )
    name = "projects/acme/locations/europe-west1/keyRings/data/cryptoKeys/records"
    gcp_kms.create_key(name)
    gcp_kms.set_rotation(name, 90)
    uri = f"gcp-kms://{name}"
    config = with_keys(proxy_config(moto.url, new_keyfile(tmp_path / "k.json")), uri)

    async def run() -> tuple[Report, list[dict[str, Any]]]:
        def clients() -> list[KmsClient]:
            return [
                LocalKmsClient(),
                GcpKmsClient(client=gcp_async_client(gcp_kms.target), retry=FAST),
            ]

        return await diagnose(config, "c", kms_clients=clients()), await identities(
            config, kms_clients=clients()
        )

    report, idents = asyncio.run(run())
    assert report.ok, report.lines()
    assert check(report, f"key {uri} rotation")["text"] == (
        "automatic rotation every 90 days, primary version 1, next 2030-01-01T00:00:00+00:00"
    )
    assert check(report, f"key {uri} location")["text"] == "europe-west1"
    (gcp,) = [i for i in idents if i["provider"] == "gcp-kms"]
    assert gcp["principal"] == email
    assert gcp["grant"] == (
        "gcloud kms keys add-iam-policy-binding records --project acme --location europe-west1 "
        f"--keyring data --member serviceAccount:{email} "
        "--role roles/cloudkms.cryptoKeyEncrypterDecrypter"
    )


# ---- Azure: the principal in the credential's token --------------------------------------


def _jwt(claims: dict[str, str]) -> str:
    def part(d: dict[str, str]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2ln"


def test_azure_identity_and_grant(
    moto: Server, azure_kv: FakeKeyVault, azure_tls: TlsMaterial, tmp_path: Path
) -> None:
    azure_kv.create_key("cmek")
    uri = f"azure-kv://{azure_kv.host}/keys/cmek"
    config = with_keys(proxy_config(moto.url, new_keyfile(tmp_path / "k.json")), uri)

    async def run(token: str) -> tuple[Report, list[dict[str, Any]]]:
        def clients() -> list[KmsClient]:
            return [
                LocalKmsClient(),
                AzureKmsClient(
                    StaticTokenCredential(token),
                    client_kwargs=azure_client_kwargs(azure_tls),
                    retry=FAST,
                ),
            ]

        return await diagnose(config, "c", kms_clients=clients()), await identities(
            config, kms_clients=clients()
        )

    report, idents = asyncio.run(run(azure_kv.token))  # the fake's token is opaque
    assert report.ok, report.lines()
    (az,) = [i for i in idents if i["provider"] == "azure-kv"]
    assert az["principal"] is None and "names no principal" in az["detail"]
    assert "<object id>" in az["grant"]
    assert check(report, f"key {uri} rotation")["text"].startswith("unknown:")

    oid = "11111111-2222-3333-4444-555555555555"
    _, idents = asyncio.run(run(_jwt({"oid": oid, "appid": "app-1"})))
    (az,) = [i for i in idents if i["provider"] == "azure-kv"]
    assert az["principal"] == oid
    vault = azure_kv.host.split(".")[0].split(":")[0]
    assert az["grant"] == (
        'az role assignment create --role "Key Vault Crypto Service Encryption User" '
        f"--assignee-object-id {oid} --assignee-principal-type ServicePrincipal "
        f'--scope "$(az keyvault show --name {vault} --query id -o tsv)/keys/cmek"'
    )
