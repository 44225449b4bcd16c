"""``azure-kv://`` provider: Azure Key Vault (or Managed HSM) RSA keys.

Key URI: ``azure-kv://<vault-host[:port]>/keys/<name>[/<version>]``, e.g.
``azure-kv://contoso.vault.azure.net/keys/cmek``.  Without a version the current
version is used for new wraps (re-read every ``key_refresh`` seconds, so a rotation
is picked up); unwraps always use the version recorded in the wrapped blob.

Wrapping uses ``azure-keyvault-keys``' aio ``CryptographyClient`` with RSA-OAEP-256.
Wrap is done locally by the SDK with the key's public part (fetched with ``keys/get``,
whose ``enabled`` attribute is checked first, so a disabled key stops new wraps);
unwrap always asks the vault, which enforces disable and permissions.

Context binding.  RSA-OAEP has no associated data, so the context is bound by key
derivation: to wrap ``plaintext`` under context ``c``,

1. draw a fresh 32-byte secret ``s`` and have Key Vault wrap it: ``W = RSA-OAEP-256(s)``;
2. derive ``K = HKDF-SHA256(s, salt=none, info="cmek-proxy/azure-kv/v1" || canon(c))``;
3. seal ``E = AES-256-GCM(K, nonce, plaintext, aad=canon(c))``.

The wrapped blob is ``"AKV1" | len(version) | version | len(W) (2 bytes) | W | nonce | E``.
Unwrap asks the vault for ``s``, re-derives ``K`` from the context it is given and
opens ``E``: a blob moved to another bucket derives another ``K`` and fails with
``IntegrityError`` (one damaged or moved object, not a denial of the key).
``canon`` is ``proxy.kms.local.context_aad``.
The key version reported is the full key id (``https://<vault>/keys/<name>/<version>``).

Credentials: an ``azure.core.credentials_async.AsyncTokenCredential`` passed in
(e.g. ``azure.identity.aio.DefaultAzureCredential``); the caller closes it.  Extra
SDK client options (``connection_verify``, ``verify_challenge_resource``, ...) are
passed through ``client_kwargs``.  The SDK's own retries are off (``retry_total=0``):
retrying is done once, here, by ``with_retries``.

Permissions the customer must grant the proxy's identity on the key: ``get``,
``wrapKey`` and ``unwrapKey`` (access policy), or the RBAC role *Key Vault Crypto
Service Encryption User* (``keys/read``, ``keys/wrap/action``, ``keys/unwrap/action``).
The key must be RSA (2048 bits or more) with ``wrapKey``/``unwrapKey`` operations.

Error mapping: 403 with inner code ``KeyDisabled`` / "disabled key", or a key whose
``enabled`` is false -> ``DISABLED``; other 403 and 401 -> ``ACCESS_DENIED``;
404 (``KeyNotFound``) -> ``INVALID_STATE``; a blob that does not parse or open, or
an RSA unwrap the vault rejects as undecryptable (400) -> ``IntegrityError``; 408, 429,
5xx, timeouts and connection errors -> unreachable (retried); other 4xx ->
``KeyConfigError``.
"""

from __future__ import annotations

import os
import re
import struct
import time
from typing import Any

from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import (
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.keyvault.keys import KeyVaultKey
from azure.keyvault.keys.aio import KeyClient
from azure.keyvault.keys.crypto import KeyWrapAlgorithm
from azure.keyvault.keys.crypto.aio import CryptographyClient
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.errors import (
    DenialKind,
    IntegrityError,
    KeyConfigError,
    KeyUnavailableError,
    KmsUnreachableError,
)
from proxy.kms.base import (
    DATA_KEY_BYTES,
    Context,
    DataKey,
    Kek,
    RetryPolicy,
    WrappedKey,
    generate_by_wrapping,
    with_retries,
)
from proxy.kms.local import context_aad

PREFIX = "azure-kv://"
PROVIDER = "azure-kv"
ALGORITHM = KeyWrapAlgorithm.rsa_oaep_256

_MAGIC = b"AKV1"
_HKDF_INFO = b"cmek-proxy/azure-kv/v1"
_URI_RE = re.compile(
    r"^azure-kv://(?P<host>[A-Za-z0-9.\-]+(?::\d{1,5})?)"
    r"/keys/(?P<name>[A-Za-z0-9\-]{1,127})(?:/(?P<version>[A-Za-z0-9]{1,64}))?$"
)
_KID_VERSION_RE = re.compile(r"/keys/[^/]+/(?P<version>[A-Za-z0-9]+)$")


def _derive(secret: bytes, context: Context) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO + context_aad(context)
    ).derive(secret)


def _error_codes(exc: HttpResponseError) -> set[str]:
    """The error code and inner error codes Key Vault sent, as far as the SDK parsed them."""
    codes: set[str] = set()
    err: Any = getattr(exc, "error", None)
    depth = 0
    while err is not None and depth < 4:
        code = getattr(err, "code", None)
        if code:
            codes.add(str(code))
        err = getattr(err, "innererror", None) or getattr(err, "inner_error", None)
        if isinstance(err, dict):
            inner = err.get("code")
            if inner:
                codes.add(str(inner))
            err = None
        depth += 1
    model: Any = getattr(exc, "model", None)
    merr: Any = getattr(model, "error", None)
    depth = 0
    while merr is not None and depth < 4:
        code = getattr(merr, "code", None)
        if code:
            codes.add(str(code))
        merr = getattr(merr, "inner_error", None)
        depth += 1
    return codes


class AzureKek:
    """One Key Vault key. Created by ``AzureKmsClient.get_kek``."""

    provider = PROVIDER
    location: str | None = None

    def __init__(
        self, uri: str, vault_url: str, name: str, version: str | None, owner: AzureKmsClient
    ) -> None:
        self._uri = uri
        self._vault_url = vault_url
        self._name = name
        self._version = version
        self._owner = owner
        self._wrapper: tuple[float, str, CryptographyClient] | None = None
        self._unwrappers: dict[str, CryptographyClient] = {}

    @property
    def uri(self) -> str:
        return self._uri

    def _deny(self, kind: DenialKind, msg: str) -> KeyUnavailableError:
        return KeyUnavailableError(
            f"{PROVIDER} key {self._uri}: {msg}", kind=kind, key_uri=self._uri, provider=PROVIDER
        )

    def _map(self, op: str, exc: Exception) -> Exception:
        if isinstance(exc, ServiceRequestError | ServiceResponseError):
            return KmsUnreachableError(
                f"{PROVIDER} key {self._uri}: {op}: {exc.__class__.__name__}: {exc}",
                key_uri=self._uri,
                provider=PROVIDER,
            )
        assert isinstance(exc, HttpResponseError)
        status = int(exc.status_code or 0)
        codes = _error_codes(exc)
        first = str(exc.message or "").strip().splitlines()
        msg = f"{op}: HTTP {status} {'/'.join(sorted(codes))}: {first[0] if first else ''}"
        if status in (408, 429) or status >= 500:
            return KmsUnreachableError(
                f"{PROVIDER} key {self._uri}: {msg}", key_uri=self._uri, provider=PROVIDER
            )
        if "KeyDisabled" in codes or "disabled key" in str(exc.message):
            return self._deny(DenialKind.DISABLED, msg)
        if status in (401, 403):
            return self._deny(DenialKind.ACCESS_DENIED, msg)
        if status == 404:
            return self._deny(DenialKind.INVALID_STATE, msg)
        if status == 400 and op == "unwrapKey":
            return IntegrityError(f"{PROVIDER} key {self._uri}: {msg}")
        return KeyConfigError(
            f"{PROVIDER} key {self._uri}: {msg}", key_uri=self._uri, provider=PROVIDER
        )

    async def _wrapping_client(self) -> tuple[str, CryptographyClient]:
        """The (key id, client) used for wraps, re-fetched after ``key_refresh`` seconds."""
        now = time.monotonic()
        if self._wrapper is not None and now - self._wrapper[0] < self._owner.key_refresh:
            return self._wrapper[1], self._wrapper[2]
        key_client = self._owner.key_client(self._vault_url)
        try:
            key: KeyVaultKey = await key_client.get_key(self._name, self._version)
        except (HttpResponseError, ServiceRequestError, ServiceResponseError) as exc:
            raise self._map("get key", exc) from exc
        if not key.properties.enabled:
            raise self._deny(DenialKind.DISABLED, "key is disabled (attributes.enabled=false)")
        if key.id is None or _KID_VERSION_RE.search(key.id) is None:
            raise self._deny(
                DenialKind.INVALID_STATE, "Key Vault returned a key id without version"
            )
        crypto = CryptographyClient(key, self._owner.credential, **self._owner.client_kwargs)
        old = self._wrapper
        self._wrapper = (now, key.id, crypto)
        if old is not None:
            await old[2].close()
        return key.id, crypto

    def _unwrapping_client(self, version: str) -> CryptographyClient:
        crypto = self._unwrappers.get(version)
        if crypto is None:
            crypto = CryptographyClient(
                f"{self._vault_url}/keys/{self._name}/{version}",
                self._owner.credential,
                **self._owner.client_kwargs,
            )
            self._unwrappers[version] = crypto
        return crypto

    async def wrap(self, plaintext: bytes, context: Context) -> WrappedKey:
        secret = os.urandom(DATA_KEY_BYTES)

        async def once() -> tuple[str, bytes]:
            kid, crypto = await self._wrapping_client()
            try:
                result = await crypto.wrap_key(ALGORITHM, secret)
            except (HttpResponseError, ServiceRequestError, ServiceResponseError) as exc:
                raise self._map("wrapKey", exc) from exc
            return kid, bytes(result.encrypted_key)

        kid, wrapped_secret = await with_retries(
            self._owner.retry, once, what=f"{PROVIDER} wrapKey {self._uri}"
        )
        m = _KID_VERSION_RE.search(kid)
        assert m is not None
        version = m.group("version").encode()
        nonce = os.urandom(12)
        sealed = AESGCM(_derive(secret, context)).encrypt(nonce, plaintext, context_aad(context))
        blob = (
            _MAGIC
            + bytes([len(version)])
            + version
            + struct.pack(">H", len(wrapped_secret))
            + wrapped_secret
            + nonce
            + sealed
        )
        return WrappedKey(wrapped=blob, key_version=kid)

    def _parse(self, blob: bytes) -> tuple[str, bytes, bytes, bytes]:
        bad = IntegrityError(f"{PROVIDER} key {self._uri}: wrapped key is not an azure-kv blob")
        if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + 1:
            raise bad
        pos = len(_MAGIC)
        vlen = blob[pos]
        pos += 1
        version = blob[pos : pos + vlen].decode("ascii", errors="replace")
        pos += vlen
        if not version.isalnum() or len(blob) < pos + 2:
            raise bad
        (wlen,) = struct.unpack(">H", blob[pos : pos + 2])
        pos += 2
        wrapped_secret = blob[pos : pos + wlen]
        pos += wlen
        nonce = blob[pos : pos + 12]
        sealed = blob[pos + 12 :]
        if len(wrapped_secret) != wlen or len(nonce) != 12 or len(sealed) < 16:
            raise bad
        return version, wrapped_secret, nonce, sealed

    async def unwrap(self, wrapped: bytes, context: Context) -> bytes:
        version, wrapped_secret, nonce, sealed = self._parse(wrapped)
        crypto = self._unwrapping_client(version)

        async def once() -> bytes:
            try:
                result = await crypto.unwrap_key(ALGORITHM, wrapped_secret)
            except (HttpResponseError, ServiceRequestError, ServiceResponseError) as exc:
                raise self._map("unwrapKey", exc) from exc
            return bytes(result.key)

        secret = await with_retries(
            self._owner.retry, once, what=f"{PROVIDER} unwrapKey {self._uri}"
        )
        try:
            return AESGCM(_derive(secret, context)).decrypt(nonce, sealed, context_aad(context))
        except InvalidTag as exc:
            raise IntegrityError(
                f"{PROVIDER} key {self._uri}: wrapped key does not open under this context "
                "(moved or altered)"
            ) from exc

    async def generate_data_key(self, context: Context) -> DataKey:
        return await generate_by_wrapping(self, context)

    async def close(self) -> None:
        clients = list(self._unwrappers.values())
        if self._wrapper is not None:
            clients.append(self._wrapper[2])
        self._wrapper = None
        self._unwrappers.clear()
        for c in clients:
            await c.close()


class AzureKmsClient:
    """Tink-style client for ``azure-kv://`` URIs.

    ``credential``: an async token credential (caller-owned).  ``client_kwargs`` go to
    every SDK client (e.g. ``connection_verify="/path/ca.pem"``,
    ``verify_challenge_resource=False``).  ``key_refresh``: seconds a fetched key
    (public part, version, enabled flag) is used for wraps before it is re-read.
    """

    prefix = PREFIX

    def __init__(
        self,
        credential: AsyncTokenCredential,
        *,
        client_kwargs: dict[str, Any] | None = None,
        key_refresh: float = 300.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.credential = credential
        self.client_kwargs: dict[str, Any] = {"retry_total": 0, **(client_kwargs or {})}
        self.key_refresh = key_refresh
        self.retry = retry or RetryPolicy()
        self._key_clients: dict[str, KeyClient] = {}
        self._keks: dict[str, AzureKek] = {}

    def key_client(self, vault_url: str) -> KeyClient:
        client = self._key_clients.get(vault_url)
        if client is None:
            client = KeyClient(vault_url, self.credential, **self.client_kwargs)
            self._key_clients[vault_url] = client
        return client

    def does_support(self, key_uri: str) -> bool:
        return key_uri.startswith(PREFIX)

    def get_kek(self, key_uri: str) -> Kek:
        m = _URI_RE.match(key_uri)
        if m is None:
            raise KeyConfigError(
                f"{key_uri!r} is not an azure-kv://<vault-host>/keys/<name>[/<version>] URI",
                key_uri=key_uri,
                provider=PROVIDER,
            )
        kek = self._keks.get(key_uri)
        if kek is None:
            kek = AzureKek(
                key_uri, f"https://{m.group('host')}", m.group("name"), m.group("version"), self
            )
            self._keks[key_uri] = kek
        return kek

    async def close(self) -> None:
        keks = list(self._keks.values())
        self._keks.clear()
        for kek in keks:
            await kek.close()
        clients = list(self._key_clients.values())
        self._key_clients.clear()
        for c in clients:
            await c.close()
