"""Vault / OpenBao Transit over TLS with a CA file, AppRole login, namespaces, Kubernetes.

Against a real ``bao server -dev -dev-tls`` (its own CA): the proxy is configured only
through ``kms.vault`` (no token in the environment), logs in with AppRole, verifies the
server with ``ca_file``, and serves; without the CA file the start stops with a TLS error
naming ``kms.vault.ca_file``; a wrong secret id stops it as a denial; a login token revoked
behind the proxy's back is replaced by one fresh login; a key in a namespace is reached with
``kms.vault.namespace``.  Kubernetes auth is exercised up to OpenBao's login endpoint (no
Kubernetes API here to review the token): the request carries the role and the JWT read
from ``jwt_file`` and OpenBao's refusal is reported naming the login.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.app import build, start
from proxy.config import Config
from proxy.errors import KeyConfigError
from tests import kms_servers
from tests.kms_servers import OpenBaoServer
from tests.servers import ProxyThread, proxy_config
from tests.test_e2e_kms import data, uniq

openbao_tls = kms_servers.openbao_tls


@pytest.fixture(autouse=True)
def no_env_token(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in ("VAULT_TOKEN", "BAO_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    yield


def _key(bao: OpenBaoServer, name: str, namespace: str | None = None) -> None:
    bao.api("POST", f"transit/keys/{name}", {"derived": True}, namespace=namespace)
    policy = "".join(
        f'path "transit/{op}/{name}" {{ capabilities = ["update"] }}\n'
        for op in ("datakey/plaintext", "encrypt", "decrypt")
    )
    bao.api("PUT", f"sys/policies/acl/{name}", {"policy": policy}, namespace=namespace)


def _approle(
    bao: OpenBaoServer, role: str, policy: str, namespace: str | None = None, **opts: Any
) -> tuple[str, str]:
    bao.api(
        "POST",
        f"auth/approle/role/{role}",
        {"token_policies": [policy], **opts},
        namespace=namespace,
    )
    role_id = bao.api("GET", f"auth/approle/role/{role}/role-id", namespace=namespace)["data"][
        "role_id"
    ]
    secret = bao.api("POST", f"auth/approle/role/{role}/secret-id", namespace=namespace)
    return str(role_id), str(secret["data"]["secret_id"])


def _config(
    bao: OpenBaoServer,
    name: str,
    tmp_path: Path,
    vault: dict[str, Any],
    backend: str = "http://127.0.0.1:1",  # tests that only start need no backend
) -> Config:
    return proxy_config(
        backend,
        tmp_path / "unused",
        encryption={"default": {"key": f"vault-transit://{bao.host}/transit/keys/{name}"}},
        kms={"probe_interval": 3600, "retries": 1, "timeout": 5, "vault": vault},
    )


def _secret_file(tmp_path: Path, secret: str) -> Path:
    path = tmp_path / "secret-id"
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


def _approle_vault(bao: OpenBaoServer, name: str, tmp_path: Path) -> dict[str, Any]:
    role_id, secret = _approle(bao, uniq("r"), name)
    return {
        "ca_file": bao.ca_file,
        "auth": {
            "method": "approle",
            "role_id": role_id,
            "secret_id_file": str(_secret_file(tmp_path, secret)),
        },
    }


def test_tls_with_ca_file_and_approle_serve(
    openbao_tls: OpenBaoServer, moto: Any, tmp_path: Path
) -> None:
    name = uniq("k")
    _key(openbao_tls, name)
    config = _config(
        openbao_tls, name, tmp_path, _approle_vault(openbao_tls, name, tmp_path), moto.url
    )
    with ProxyThread(config) as p:  # KMS clients from the config: make_kms_clients
        c = p.client()
        bucket = uniq("vtls-")
        c.create_bucket(Bucket=bucket)
        blob = data(4000, 7)
        c.put_object(Bucket=bucket, Key="k", Body=blob)
        assert c.get_object(Bucket=bucket, Key="k")["Body"].read() == blob
        assert c.head_object(Bucket=bucket, Key="k")["SSEKMSKeyId"].startswith("vault-transit://")

        # every token the proxy holds is revoked: one fresh login, and the call succeeds
        accessors = openbao_tls.api("LIST", "auth/token/accessors")["data"]["keys"]
        root = openbao_tls.api("GET", "auth/token/lookup-self")["data"]["accessor"]
        for acc in accessors:
            if acc != root:
                openbao_tls.api("POST", "auth/token/revoke-accessor", {"accessor": acc})
        assert p.proxy is not None
        p.call(p.proxy.keys.validate(config.key_uris()[0], None))


async def _start_fails(config: Config) -> KeyConfigError:
    proxy = build(config)
    with pytest.raises(KeyConfigError) as ei:
        running = await start(config, proxy)
        await running.close()
    return ei.value


async def test_tls_without_the_ca_file_stops_the_start(
    openbao_tls: OpenBaoServer, tmp_path: Path
) -> None:
    name = uniq("k")
    _key(openbao_tls, name)
    vault = _approle_vault(openbao_tls, name, tmp_path)
    del vault["ca_file"]
    err = await _start_fails(_config(openbao_tls, name, tmp_path, vault))
    assert "TLS" in str(err) and "kms.vault.ca_file" in str(err)
    assert "certificate" in str(err).lower()


async def test_wrong_secret_id_stops_the_start_as_a_denial(
    openbao_tls: OpenBaoServer, tmp_path: Path
) -> None:
    name = uniq("k")
    _key(openbao_tls, name)
    vault = _approle_vault(openbao_tls, name, tmp_path)
    Path(vault["auth"]["secret_id_file"]).write_text("00000000-0000-0000-0000-000000000000")
    err = await _start_fails(_config(openbao_tls, name, tmp_path, vault))
    msg = str(err)
    assert "approle login" in msg and "failed validation" in msg and "HTTP 400" in msg
    assert "00000000-0000" not in msg  # the secret id is never in a message


def test_key_in_a_namespace(openbao_tls: OpenBaoServer, moto: Any, tmp_path: Path) -> None:
    ns = uniq("team")
    openbao_tls.api("POST", f"sys/namespaces/{ns}")
    openbao_tls.api("POST", "sys/mounts/transit", {"type": "transit"}, namespace=ns)
    openbao_tls.api("POST", "sys/auth/approle", {"type": "approle"}, namespace=ns)
    name = uniq("k")
    _key(openbao_tls, name, namespace=ns)
    role_id, secret = _approle(openbao_tls, uniq("r"), name, namespace=ns)
    vault = {
        "ca_file": openbao_tls.ca_file,
        "namespace": ns,
        "auth": {"method": "approle", "role_id": role_id, "secret_id": secret},
    }
    config = _config(openbao_tls, name, tmp_path, vault, moto.url)
    with ProxyThread(config) as p:
        c = p.client()
        bucket = uniq("vns-")
        c.create_bucket(Bucket=bucket)
        c.put_object(Bucket=bucket, Key="k", Body=b"in a namespace")
        assert c.get_object(Bucket=bucket, Key="k")["Body"].read() == b"in a namespace"


async def test_kubernetes_login_request_reaches_openbao(
    openbao_tls: OpenBaoServer, tmp_path: Path
) -> None:
    mount = uniq("k8s")
    openbao_tls.api("POST", f"sys/auth/{mount}", {"type": "kubernetes"})
    assert openbao_tls.ca_file is not None
    openbao_tls.api(
        "POST",
        f"auth/{mount}/config",
        {
            "kubernetes_host": "https://127.0.0.1:1",  # no Kubernetes API to review the JWT
            "kubernetes_ca_cert": Path(openbao_tls.ca_file).read_text(),
            "disable_local_ca_jwt": True,
        },
    )
    openbao_tls.api(
        "POST",
        f"auth/{mount}/role/cmek",
        {
            "bound_service_account_names": ["app"],
            "bound_service_account_namespaces": ["default"],
            "token_policies": ["default"],
        },
    )
    name = uniq("k")
    _key(openbao_tls, name)
    jwt = tmp_path / "token"
    jwt.write_text("not-a-real.service-account.jwt")
    vault = {
        "ca_file": openbao_tls.ca_file,
        "auth": {"method": "kubernetes", "mount": mount, "role": "cmek", "jwt_file": str(jwt)},
    }
    err = await _start_fails(_config(openbao_tls, name, tmp_path, vault))
    msg = str(err)
    assert f"kubernetes login at https://{openbao_tls.host}" in msg
    assert "HTTP 400" in msg or "HTTP 403" in msg
    assert "not-a-real" not in msg
