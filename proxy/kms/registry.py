"""Which provider serves a key URI: one client per provider prefix a configuration needs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from proxy.config import Config
from proxy.errors import KeyConfigError
from proxy.kms.base import Kek, KmsClient, RetryPolicy


def make_kms_clients(config: Config) -> list[KmsClient]:
    """One client per provider that a configured key URI needs (and local:// always)."""
    from proxy.kms.local import LocalKmsClient

    retry = RetryPolicy(attempts=config.kms.retries + 1, timeout=config.kms.timeout)
    clients: list[KmsClient] = [LocalKmsClient()]
    schemes = {uri.split("://", 1)[0] for uri in config.key_uris()} | set(config.kms.providers)
    if "aws-kms" in schemes:
        from proxy.kms.aws import AwsKmsClient

        clients.append(AwsKmsClient(retry=retry))
    if "gcp-kms" in schemes:
        from proxy.kms.gcp import GcpKmsClient

        clients.append(GcpKmsClient(retry=retry))
    if "azure-kv" in schemes:
        from azure.identity.aio import DefaultAzureCredential

        from proxy.kms.azure import AzureKmsClient

        clients.append(AzureKmsClient(DefaultAzureCredential(), retry=retry))
    if "vault-transit" in schemes:
        clients.append(vault_client(config, retry))
    return clients


def resolver(clients: Sequence[KmsClient]) -> KmsResolver:
    return KmsResolver(tuple(clients))


@dataclass(frozen=True)
class KmsResolver:
    """Key URI -> Kek, by the first client that supports the URI's prefix."""

    clients: tuple[KmsClient, ...]

    def __call__(self, uri: str) -> Kek:
        for client in self.clients:
            if client.does_support(uri):
                return client.get_kek(uri)
        raise KeyConfigError(f"no KMS provider supports key URI {uri!r}", key_uri=uri)


def vault_client(config: Config, retry: RetryPolicy) -> KmsClient:
    """The Transit client of ``kms.vault``: TLS with an optional CA file, namespace, login."""
    from proxy.kms.vault import VaultTransitClient
    from proxy.kms.vault_auth import VaultAuth

    v = config.kms.vault
    a = v.auth
    auth = VaultAuth(
        a.method,
        token=a.token,
        token_file=a.token_file,
        mount=a.mount,
        role_id=a.role_id,
        role_id_file=a.role_id_file,
        secret_id=a.secret_id,
        secret_id_file=a.secret_id_file,
        role=a.role,
        jwt_file=a.jwt_file,
    )
    return VaultTransitClient(
        tls=v.tls, ca_file=v.ca_file, namespace=v.namespace, auth=auth, retry=retry
    )
