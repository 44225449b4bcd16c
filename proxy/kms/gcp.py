"""``gcp-kms://`` provider: Google Cloud KMS through ``KeyManagementServiceAsyncClient``.

Key URI: ``gcp-kms://projects/<p>/locations/<l>/keyRings/<r>/cryptoKeys/<k>``; the
location is the Kek's ``location``.  The key must be a symmetric
``ENCRYPT_DECRYPT`` key.

* generate: 32 random bytes from ``os.urandom``, then Encrypt;
* wrap:     ``Encrypt(name, plaintext, additional_authenticated_data=context)``;
* unwrap:   ``Decrypt(name, ciphertext, additional_authenticated_data=context)``.

The binding context is the canonical JSON encoding of the context as additional
authenticated data, so a wrapped key only decrypts with the same context.  The key
version is ``EncryptResponse.name`` (``.../cryptoKeyVersions/<n>``); Cloud KMS
ciphertexts name their version, so after rotation old ones keep decrypting.

Integrity: as Google recommends, every request carries CRC32C checksums of its
plaintext/ciphertext and AAD, and every response is checked (``verified_*`` flags,
``ciphertext_crc32c``, ``plaintext_crc32c``, the key name).  A mismatch is treated as
corruption in transit: ``KmsUnreachableError`` (retried).

The SDK client is passed in (``client=``); without one, a default client using
Application Default Credentials is created on first use and closed by ``close()``.
An injected client stays the caller's to close.  The SDK's own retries are off
(``retry=None``): retrying is done once, here, by ``with_retries``.

IAM the customer must grant the proxy's service account on the key:
``roles/cloudkms.cryptoKeyEncrypterDecrypter`` (permissions
``cloudkms.cryptoKeyVersions.useToEncrypt`` and ``...useToDecrypt``).

Error mapping: ``FAILED_PRECONDITION`` -> ``DISABLED`` for a disabled version,
``INVALID_STATE`` otherwise (destroyed, destroy scheduled, no primary);
``PERMISSION_DENIED``/``UNAUTHENTICATED`` -> ``ACCESS_DENIED``; ``NOT_FOUND`` ->
``INVALID_STATE``; a Decrypt ``INVALID_ARGUMENT`` (the ciphertext does not open under
this key and context: one damaged or moved object) -> ``IntegrityError``, except a
checksum complaint (corruption in transit) -> unreachable; other ``INVALID_ARGUMENT``
-> ``KeyConfigError``; ``UNAVAILABLE``, ``DEADLINE_EXCEEDED``,
``RESOURCE_EXHAUSTED``, ``INTERNAL``, ``ABORTED``, ``UNKNOWN``, timeouts -> unreachable.
"""

from __future__ import annotations

import re
from typing import Any

from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth.exceptions import DefaultCredentialsError
from google.cloud import kms_v1

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

try:
    from google_crc32c import value as _crc32c_value  # type: ignore[import-not-found,unused-ignore]

    def crc32c(data: bytes) -> int:
        """CRC32C of ``data`` as an unsigned int (google-crc32c)."""
        return int(_crc32c_value(data))

except ImportError:  # google-crc32c is optional; awscrt is a dependency
    from awscrt.checksums import crc32c as _awscrt_crc32c

    def crc32c(data: bytes) -> int:
        """CRC32C of ``data`` as an unsigned int (awscrt)."""
        return int(_awscrt_crc32c(data))


PREFIX = "gcp-kms://"
PROVIDER = "gcp-kms"

_NAME_RE = re.compile(
    r"^projects/(?P<project>[a-z][a-z0-9\-]{4,28}[a-z0-9]|[A-Za-z0-9.:\-]+)"
    r"/locations/(?P<location>[A-Za-z0-9\-]+)"
    r"/keyRings/(?P<ring>[A-Za-z0-9_\-]{1,63})"
    r"/cryptoKeys/(?P<key>[A-Za-z0-9_\-]{1,63})$"
)

_TRANSIENT: tuple[type[gexc.GoogleAPICallError], ...] = (
    gexc.ServiceUnavailable,
    gexc.DeadlineExceeded,
    gexc.ResourceExhausted,
    gexc.InternalServerError,
    gexc.Aborted,
    gexc.Unknown,
    gexc.GatewayTimeout,
    gexc.BadGateway,
)


class GcpKek:
    """One Cloud KMS CryptoKey. Created by ``GcpKmsClient.get_kek``."""

    provider = PROVIDER

    def __init__(self, uri: str, name: str, location: str, owner: GcpKmsClient) -> None:
        self._uri = uri
        self._name = name
        self._location = location
        self._owner = owner

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def location(self) -> str | None:
        return self._location

    def _corrupt(self, what: str) -> KmsUnreachableError:
        return KmsUnreachableError(
            f"{PROVIDER} key {self._uri}: {what} (data corrupted in transit)",
            key_uri=self._uri,
            provider=PROVIDER,
        )

    def _map(self, op: str, exc: gexc.GoogleAPICallError) -> Exception:
        text = f"{PROVIDER} key {self._uri}: {op}: {exc.__class__.__name__}: {exc.message}"
        if isinstance(exc, _TRANSIENT):
            return KmsUnreachableError(text, key_uri=self._uri, provider=PROVIDER)
        if isinstance(exc, gexc.FailedPrecondition):
            msg = str(exc.message)
            kind = DenialKind.DISABLED if "DISABLED" in msg else DenialKind.INVALID_STATE
            return KeyUnavailableError(text, kind=kind, key_uri=self._uri, provider=PROVIDER)
        if isinstance(exc, gexc.PermissionDenied | gexc.Unauthenticated):
            return KeyUnavailableError(
                text, kind=DenialKind.ACCESS_DENIED, key_uri=self._uri, provider=PROVIDER
            )
        if isinstance(exc, gexc.InvalidArgument) and "checksum" in str(exc.message):
            return KmsUnreachableError(text, key_uri=self._uri, provider=PROVIDER)
        if isinstance(exc, gexc.InvalidArgument) and op == "Decrypt":
            return IntegrityError(text)
        if isinstance(exc, gexc.NotFound):
            return KeyUnavailableError(
                text, kind=DenialKind.INVALID_STATE, key_uri=self._uri, provider=PROVIDER
            )
        return KeyConfigError(text, key_uri=self._uri, provider=PROVIDER)

    async def _rpc(self, op: str, request: Any) -> Any:
        """One attempt of ``op``; the callers wrap it in ``with_retries``."""
        client = await self._owner.sdk_client()
        method = client.encrypt if op == "Encrypt" else client.decrypt
        try:
            return await method(request=request, retry=None, timeout=self._owner.retry.timeout)
        except gexc.GoogleAPICallError as exc:
            raise self._map(op, exc) from exc

    async def wrap(self, plaintext: bytes, context: Context) -> WrappedKey:
        aad = context_aad(context)
        request = kms_v1.EncryptRequest(
            name=self._name,
            plaintext=plaintext,
            plaintext_crc32c=crc32c(plaintext),
            additional_authenticated_data=aad,
            additional_authenticated_data_crc32c=crc32c(aad),
        )

        async def call() -> WrappedKey:
            resp = await self._rpc("Encrypt", request)
            if not resp.verified_plaintext_crc32c:
                raise self._corrupt("Encrypt request plaintext checksum not verified")
            if not resp.verified_additional_authenticated_data_crc32c:
                raise self._corrupt("Encrypt request AAD checksum not verified")
            if resp.ciphertext_crc32c != crc32c(resp.ciphertext):
                raise self._corrupt("Encrypt response ciphertext checksum mismatch")
            version = str(resp.name)
            if not version.startswith(self._name + "/cryptoKeyVersions/"):
                raise self._corrupt("Encrypt response names another key")
            return WrappedKey(wrapped=bytes(resp.ciphertext), key_version=version)

        # checksum failures are retried as transient, like transport errors
        return await with_retries(self._owner.retry, call, what=f"{PROVIDER} wrap {self._uri}")

    async def unwrap(self, wrapped: bytes, context: Context) -> bytes:
        aad = context_aad(context)
        request = kms_v1.DecryptRequest(
            name=self._name,
            ciphertext=wrapped,
            ciphertext_crc32c=crc32c(wrapped),
            additional_authenticated_data=aad,
            additional_authenticated_data_crc32c=crc32c(aad),
        )

        async def call() -> bytes:
            resp = await self._rpc("Decrypt", request)
            plaintext = bytes(resp.plaintext)
            if resp.plaintext_crc32c != crc32c(plaintext):
                raise self._corrupt("Decrypt response plaintext checksum mismatch")
            return plaintext

        return await with_retries(self._owner.retry, call, what=f"{PROVIDER} unwrap {self._uri}")

    async def generate_data_key(self, context: Context) -> DataKey:
        dk = await generate_by_wrapping(self, context)
        assert len(dk.plaintext) == DATA_KEY_BYTES
        return dk


class GcpKmsClient:
    """Tink-style client for ``gcp-kms://`` URIs.

    ``client``: a ``KeyManagementServiceAsyncClient`` (caller-owned).  Without one,
    a default client (ADC credentials, ``client_options``) is made on first use, in
    the running event loop, and closed by ``close()``.
    """

    prefix = PREFIX

    def __init__(
        self,
        *,
        client: kms_v1.KeyManagementServiceAsyncClient | None = None,
        client_options: ClientOptions | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._client = client
        self._own = client is None
        self._client_options = client_options
        self.retry = retry or RetryPolicy()

    async def sdk_client(self) -> kms_v1.KeyManagementServiceAsyncClient:
        if self._client is None:
            try:
                self._client = kms_v1.KeyManagementServiceAsyncClient(
                    client_options=self._client_options
                )
            except DefaultCredentialsError as exc:
                raise KeyConfigError(
                    f"{PROVIDER}: no Google credentials (Application Default Credentials): {exc}",
                    provider=PROVIDER,
                ) from exc
        return self._client

    def does_support(self, key_uri: str) -> bool:
        return key_uri.startswith(PREFIX)

    def get_kek(self, key_uri: str) -> Kek:
        name = key_uri[len(PREFIX) :] if key_uri.startswith(PREFIX) else ""
        m = _NAME_RE.match(name)
        if m is None:
            raise KeyConfigError(
                f"{key_uri!r} is not a gcp-kms://projects/<p>/locations/<l>/keyRings/<r>/"
                "cryptoKeys/<k> URI",
                key_uri=key_uri,
                provider=PROVIDER,
            )
        return GcpKek(key_uri, name, m.group("location"), self)

    async def close(self) -> None:
        if self._own and self._client is not None:
            await self._client.transport.close()  # type: ignore[no-untyped-call]
        self._client = None if self._own else self._client
