"""Who the proxy is to each KMS, the grant to give that identity, and a key's rotation status.

For ``cmek-proxy whoami`` and ``cmek-proxy doctor``. The identity is asked of the provider
the way its own tools do, with the credentials the proxy itself would use:

* AWS: STS ``GetCallerIdentity`` (same session and credential chain as KMS);
* GCP: the service account of Application Default Credentials (``google.auth.default``);
* Azure: the object id / app id claims of an access token for Key Vault, when it is a JWT;
* Vault/OpenBao: ``auth/token/lookup-self``;
* local: the operating-system user that must be able to read the key file.

Nothing here logs or returns a secret: tokens are used for the call and dropped.
"""

from __future__ import annotations

import base64
import getpass
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.errors import KmsError
from proxy.kms.base import KmsClient


@dataclass(frozen=True)
class Identity:
    provider: str
    principal: str | None
    """The identity to grant (ARN, service account, object id, token name); None: unknown."""
    detail: str
    """How it was found, or why it could not be."""
    grant: str
    """The exact grant for the given keys: policy JSON, a command, or HCL."""


def _jwt_claims(token: str) -> dict[str, Any]:
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        raw = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(raw)
    except ValueError:
        return {}
    return claims if isinstance(claims, dict) else {}


def _aws_principal(arn: str) -> str:
    """An assumed-role session ARN names the role to grant, not the session."""
    m = re.match(r"^arn:(aws[a-z\-]*):sts::(\d{12}):assumed-role/([^/]+)/.+$", arn)
    if m:
        return f"arn:{m.group(1)}:iam::{m.group(2)}:role/{m.group(3)}"
    return arn


def aws_grant(principal: str, uris: Sequence[str]) -> str:
    statement = {
        "Sid": "AllowCmekProxy",
        "Effect": "Allow",
        "Principal": {"AWS": principal},
        "Action": ["kms:GenerateDataKey", "kms:Encrypt", "kms:Decrypt", "kms:DescribeKey"],
        "Resource": "*",
    }
    keys = ", ".join(u.removeprefix("aws-kms://") for u in uris) or "the key"
    return (
        f'add this statement to the key policy of {keys} (in a key policy, Resource "*" '
        "is the key itself):\n" + json.dumps(statement, indent=2)
    )


def gcp_grant(member: str, uris: Sequence[str]) -> str:
    lines = []
    for uri in uris or ["gcp-kms://projects/P/locations/L/keyRings/R/cryptoKeys/K"]:
        m = re.match(
            r"^gcp-kms://projects/([^/]+)/locations/([^/]+)/keyRings/([^/]+)/cryptoKeys/([^/]+)$",
            uri,
        )
        if m is None:
            continue
        project, location, ring, key = m.groups()
        lines.append(
            f"gcloud kms keys add-iam-policy-binding {key} --project {project} "
            f"--location {location} --keyring {ring} --member {member} "
            "--role roles/cloudkms.cryptoKeyEncrypterDecrypter"
        )
    return "\n".join(lines)


def azure_grant(object_id: str, uris: Sequence[str]) -> str:
    lines = []
    for uri in uris or ["azure-kv://VAULT.vault.azure.net/keys/KEY"]:
        m = re.match(r"^azure-kv://([^./:]+)[^/]*/keys/([^/]+)", uri)
        if m is None:
            continue
        vault, key = m.groups()
        lines.append(
            'az role assignment create --role "Key Vault Crypto Service Encryption User" '
            f"--assignee-object-id {object_id} --assignee-principal-type ServicePrincipal "
            f'--scope "$(az keyvault show --name {vault} --query id -o tsv)/keys/{key}"'
        )
    return "\n".join(lines)


def vault_grant(uris: Sequence[str]) -> str:
    blocks = []
    for uri in uris or ["vault-transit://HOST:8200/transit/keys/KEY"]:
        m = re.match(r"^vault-transit://[^/]+/(.+)/keys/([^/]+)$", uri)
        if m is None:
            continue
        mount, name = m.groups()
        blocks.append(
            f'path "{mount}/datakey/plaintext/{name}" {{ capabilities = ["update"] }}\n'
            f'path "{mount}/encrypt/{name}"           {{ capabilities = ["update"] }}\n'
            f'path "{mount}/decrypt/{name}"           {{ capabilities = ["update"] }}\n'
            f'path "{mount}/keys/{name}"              {{ capabilities = ["read"] }}'
            "   # optional: lets doctor show rotation"
        )
    return "\n".join(blocks)


def local_grant(user: str, uris: Sequence[str]) -> str:
    paths = [u.removeprefix("local://").partition("#")[0] for u in uris]
    return "\n".join(f"chown {user} {p} && chmod 600 {p}" for p in paths)


async def identity_of(client: KmsClient, uris: Sequence[str]) -> Identity:
    """The identity ``client`` presents, and the grant for ``uris`` (keys of its provider)."""
    from proxy.kms.local import LocalKmsClient

    if isinstance(client, LocalKmsClient):
        user = getpass.getuser()
        return Identity("local", user, f"uid {os.getuid()}", local_grant(user, uris))
    name = type(client).__name__
    if name == "AwsKmsClient":
        return await _aws_identity(client, uris)
    if name == "GcpKmsClient":
        return _gcp_identity(uris)
    if name == "AzureKmsClient":
        return await _azure_identity(client, uris)
    if name == "VaultTransitClient":
        return await _vault_identity(client, uris)
    return Identity(client.prefix, None, "provider not known to whoami", "")


async def _aws_identity(client: Any, uris: Sequence[str]) -> Identity:
    from botocore.exceptions import BotoCoreError, ClientError

    region = next(
        (m.group(1) for u in uris if (m := re.search(r":kms:([^:]+):", u))),
        os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    )
    endpoint = os.environ.get("AWS_ENDPOINT_URL_STS")
    try:
        async with client.session.create_client(
            "sts", region_name=region, endpoint_url=endpoint
        ) as sts:
            resp = await sts.get_caller_identity()
    except (ClientError, BotoCoreError) as exc:
        return Identity(
            "aws-kms",
            None,
            f"STS GetCallerIdentity failed: {exc}",
            aws_grant("<principal ARN>", uris),
        )
    arn = str(resp["Arn"])
    principal = _aws_principal(arn)
    detail = f"STS GetCallerIdentity: {arn} (account {resp['Account']})"
    return Identity("aws-kms", principal, detail, aws_grant(principal, uris))


def _gcp_identity(uris: Sequence[str]) -> Identity:
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        creds, project = google.auth.default(scopes=["https://www.googleapis.com/auth/cloudkms"])
    except DefaultCredentialsError as exc:
        return Identity(
            "gcp-kms",
            None,
            f"no Application Default Credentials: {exc}",
            gcp_grant("serviceAccount:<service account email>", uris),
        )
    email = getattr(creds, "service_account_email", None)
    if email == "default":
        detail = "the default service account of this VM / node (metadata server)"
        return Identity("gcp-kms", None, detail, gcp_grant("serviceAccount:<its email>", uris))
    if email:
        detail = f"Application Default Credentials, project {project or '(none)'}"
        return Identity("gcp-kms", str(email), detail, gcp_grant(f"serviceAccount:{email}", uris))
    account = getattr(creds, "account", "") or None
    detail = f"user credentials ({type(creds).__name__}); production should use a service account"
    member = f"user:{account}" if account else "user:<your account>"
    return Identity("gcp-kms", account, detail, gcp_grant(member, uris))


async def _azure_identity(client: Any, uris: Sequence[str]) -> Identity:
    from azure.core.exceptions import AzureError

    try:
        token = await client.credential.get_token("https://vault.azure.net/.default")
    except (AzureError, OSError, ValueError) as exc:
        return Identity(
            "azure-kv", None, f"no Azure token: {exc}", azure_grant("<object id>", uris)
        )
    claims = _jwt_claims(token.token)
    oid = claims.get("oid")
    if not oid:
        return Identity(
            "azure-kv",
            None,
            "the credential's token names no principal (not a JWT with an oid claim)",
            azure_grant("<object id>", uris),
        )
    detail = f"token for Key Vault: object id {oid}, app id {claims.get('appid', '-')}"
    if claims.get("upn"):
        detail += f", user {claims['upn']}"
    return Identity("azure-kv", str(oid), detail, azure_grant(str(oid), uris))


async def _vault_identity(client: Any, uris: Sequence[str]) -> Identity:
    import aiohttp

    hosts = sorted({u.removeprefix("vault-transit://").split("/", 1)[0] for u in uris})
    if not hosts:
        return Identity("vault-transit", None, "no vault-transit:// key configured", "")
    scheme = "https" if client.tls else "http"
    try:
        token = client.token()
        session = await client.session()
        url = f"{scheme}://{hosts[0]}/v1/auth/token/lookup-self"
        async with session.get(
            url, headers={"X-Vault-Token": token}, timeout=aiohttp.ClientTimeout(total=10)
        ) as resp:
            body = await resp.json(content_type=None)
            status = resp.status
    except KmsError as exc:
        return Identity("vault-transit", None, str(exc), vault_grant(uris))
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return Identity(
            "vault-transit",
            None,
            f"token lookup-self at {hosts[0]} failed: {exc}",
            vault_grant(uris),
        )
    if status != 200 or not isinstance(body, dict):
        return Identity(
            "vault-transit", None, f"token lookup-self: HTTP {status}", vault_grant(uris)
        )
    data = body.get("data") or {}
    name = data.get("display_name") or data.get("entity_id") or data.get("accessor")
    detail = (
        f"token lookup-self at {hosts[0]}: display name {data.get('display_name')!r}, "
        f"policies {data.get('policies')}, entity {data.get('entity_id') or '-'}"
    )
    return Identity("vault-transit", str(name) if name else None, detail, vault_grant(uris))


async def rotation_of(client: KmsClient, uri: str) -> str:
    """What the provider says of the key's rotation, or why it cannot be told."""
    from proxy.kms.local import KeyFile, LocalKmsClient

    if isinstance(client, LocalKmsClient):
        try:
            kf = KeyFile.load(Path(uri.removeprefix("local://").partition("#")[0]))
        except KmsError as exc:
            return f"unknown: {exc}"
        return (
            f"{len(kf.keys)} key(s), primary {kf.primary!r} "
            "(rotate: cmek-proxy keygen --rotate FILE)"
        )
    name = type(client).__name__
    try:
        if name == "AwsKmsClient":
            return await _aws_rotation(client, uri)
        if name == "GcpKmsClient":
            return await _gcp_rotation(client, uri)
        if name == "AzureKmsClient":
            return await _azure_rotation(client, uri)
        if name == "VaultTransitClient":
            return await _vault_rotation(client, uri)
    except KmsError as exc:
        return f"unknown: {exc}"
    return "unknown: provider not known to doctor"


async def _aws_rotation(client: Any, uri: str) -> str:
    from botocore.exceptions import BotoCoreError, ClientError

    arn = uri.removeprefix("aws-kms://")
    region = arn.split(":")[3]
    kms = await client.client_for(region)
    try:
        resp = await kms.get_key_rotation_status(KeyId=arn)
    except (ClientError, BotoCoreError) as exc:
        return f"unknown: GetKeyRotationStatus: {exc}"
    if not resp.get("KeyRotationEnabled"):
        return "automatic rotation off"
    period = resp.get("RotationPeriodInDays")
    nxt = resp.get("NextRotationDate")
    return (
        "automatic rotation on"
        + (f", every {period} days" if period else "")
        + (f", next {nxt}" if nxt else "")
    )


async def _gcp_rotation(client: Any, uri: str) -> str:
    from google.api_core import exceptions as gexc

    sdk = await client.sdk_client()
    try:
        key = await sdk.get_crypto_key(
            name=uri.removeprefix("gcp-kms://"), retry=None, timeout=client.retry.timeout
        )
    except gexc.GoogleAPICallError as exc:
        return f"unknown: GetCryptoKey: {type(exc).__name__}: {exc.message}"
    period = key.rotation_period.total_seconds() if key.rotation_period else 0
    primary = key.primary.name.rsplit("/", 1)[-1] if key.primary and key.primary.name else "?"
    if not period:
        return f"automatic rotation off, primary version {primary}"
    nxt = key.next_rotation_time
    return f"automatic rotation every {period / 86400:g} days, primary version {primary}" + (
        f", next {nxt.isoformat()}" if nxt else ""
    )


async def _azure_rotation(client: Any, uri: str) -> str:
    from azure.core.exceptions import AzureError

    m = re.match(r"^azure-kv://([^/]+)/keys/([^/]+)", uri)
    if m is None:
        return "unknown: not an azure-kv:// key URI"
    kc = client.key_client(f"https://{m.group(1)}")
    try:
        policy = await kc.get_key_rotation_policy(m.group(2))
    except AzureError as exc:
        return f"unknown: get rotation policy: {type(exc).__name__}: {exc.message}"
    rotate = [a for a in policy.lifetime_actions or [] if str(a.action).lower().endswith("rotate")]
    if not rotate:
        return "automatic rotation off"
    a = rotate[0]
    when = a.time_after_create or a.time_before_expiry or "?"
    return f"automatic rotation on ({when})"


async def _vault_rotation(client: Any, uri: str) -> str:
    import aiohttp

    m = re.match(r"^vault-transit://([^/]+)/(.+)/keys/([^/]+)$", uri)
    if m is None:
        return "unknown: not a vault-transit:// key URI"
    host, mount, name = m.groups()
    url = f"{'https' if client.tls else 'http'}://{host}/v1/{mount}/keys/{name}"
    try:
        session = await client.session()
        async with session.get(
            url, headers={"X-Vault-Token": client.token()}, timeout=aiohttp.ClientTimeout(total=10)
        ) as resp:
            body = await resp.json(content_type=None)
            status = resp.status
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return f"unknown: read {mount}/keys/{name}: {exc}"
    if status != 200 or not isinstance(body, dict):
        return f"unknown: read {mount}/keys/{name}: HTTP {status} (grant read on it to see)"
    data = body.get("data") or {}
    period = data.get("auto_rotate_period") or 0
    text = f"latest version v{data.get('latest_version')}"
    text += f", min decryption version v{data.get('min_decryption_version')}"
    text += f", auto-rotate every {period}s" if period else ", automatic rotation off"
    if data.get("derived") is False:
        text += "; WARNING: not derived=true, bucket binding is lost"
    return text
