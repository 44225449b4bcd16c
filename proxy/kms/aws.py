"""``aws-kms://`` provider: AWS KMS through aiobotocore.

Key URI: ``aws-kms://arn:<partition>:kms:<region>:<account>:key/<key-id>`` or
``aws-kms://arn:<partition>:kms:<region>:<account>:alias/<name>``.  The region of
the ARN is the Kek's ``location``; one SDK client is made per region.

* generate: ``GenerateDataKey(KeyId=arn, KeySpec=AES_256, EncryptionContext=context)``
* wrap:     ``Encrypt(KeyId=arn, Plaintext, EncryptionContext=context)``
* unwrap:   ``Decrypt(KeyId=arn, CiphertextBlob, EncryptionContext=context)``

The binding context is the KMS *encryption context*, so a wrapped key only
decrypts with the same context, and CloudTrail records it.  The key version is the
key ARN KMS names in its response (KMS does not expose backing-key versions;
rotation is transparent and old ciphertexts keep decrypting).

Credentials and the endpoint come from the standard AWS chain (environment,
shared config, instance/container roles, ``AWS_ENDPOINT_URL_KMS``); tests pass
``endpoint_url`` and their own ``AioSession``.  The SDK's own retries are switched
off: retrying is done once, here, by ``with_retries``.

IAM the customer must grant the proxy's principal on the key (key policy or IAM)::

    "Action": ["kms:GenerateDataKey", "kms:Encrypt", "kms:Decrypt"],
    "Resource": "<key ARN>"

(plus ``kms:DescribeKey`` if an alias ARN is used and aliases are resolved by
policy).  Conditions on ``kms:EncryptionContext:bucket`` can pin buckets.

Error mapping: ``DisabledException`` -> ``DISABLED``; ``KMSInvalidStateException``,
``NotFoundException`` -> ``INVALID_STATE``; ``AccessDeniedException`` ->
``ACCESS_DENIED``; ``InvalidCiphertextException``, ``IncorrectKeyException`` (the
wrapped key does not open under this key and context: one damaged or moved object,
not a denial of the key) -> ``IntegrityError``; throttling,
``KMSInternalException``, ``KeyUnavailableException``, ``DependencyTimeoutException``,
any 5xx, timeouts, connection errors -> unreachable (retried).  Other client errors
-> ``KeyConfigError``.
"""

from __future__ import annotations

import asyncio
import re
from contextlib import AsyncExitStack
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

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
    with_retries,
)

PREFIX = "aws-kms://"
PROVIDER = "aws-kms"

_ARN_RE = re.compile(
    r"^arn:(?P<partition>aws[a-z\-]*):kms:(?P<region>[a-z]{2}(?:-[a-z]+)+-\d):(?P<account>\d{12}):"
    r"(?P<resource>key/[A-Za-z0-9\-]+|alias/[A-Za-z0-9/_\-]+)$"
)

_DENIALS: dict[str, DenialKind] = {
    "DisabledException": DenialKind.DISABLED,
    "KMSInvalidStateException": DenialKind.INVALID_STATE,
    "NotFoundException": DenialKind.INVALID_STATE,
    "AccessDeniedException": DenialKind.ACCESS_DENIED,
}
_INTEGRITY = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})
_TRANSIENT = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "LimitExceededException",
        "KMSInternalException",
        "KeyUnavailableException",
        "DependencyTimeoutException",
        "ServiceUnavailable",
        "InternalFailure",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)


class AwsKek:
    """One AWS KMS key (by key or alias ARN). Created by ``AwsKmsClient.get_kek``."""

    provider = PROVIDER

    def __init__(self, uri: str, arn: str, region: str, owner: AwsKmsClient) -> None:
        self._uri = uri
        self._arn = arn
        self._region = region
        self._owner = owner

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def location(self) -> str | None:
        return self._region

    def _map(self, op: str, exc: Exception) -> Exception:
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            message = str(err.get("Message", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            text = f"{PROVIDER} key {self._uri}: {op}: {code}: {message}"
            kind = _DENIALS.get(code)
            if kind is not None:
                return KeyUnavailableError(text, kind=kind, key_uri=self._uri, provider=PROVIDER)
            if code in _INTEGRITY:
                return IntegrityError(text)
            if code in _TRANSIENT or status >= 500 or status == 429:
                return KmsUnreachableError(text, key_uri=self._uri, provider=PROVIDER)
            return KeyConfigError(text, key_uri=self._uri, provider=PROVIDER)
        if isinstance(exc, HTTPClientError | BotoConnectionError):
            return KmsUnreachableError(
                f"{PROVIDER} key {self._uri}: {op}: {exc}", key_uri=self._uri, provider=PROVIDER
            )
        return KeyConfigError(
            f"{PROVIDER} key {self._uri}: {op}: {exc}", key_uri=self._uri, provider=PROVIDER
        )

    async def _call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        # made before the retry loop: building the SDK client is local work that should
        # not eat into (or be cancelled by) the per-attempt timeout
        client = await self._owner.client_for(self._region)

        async def once() -> dict[str, Any]:
            try:
                resp: dict[str, Any] = await getattr(client, op)(**kwargs)
            except (
                ClientError,
                HTTPClientError,
                BotoConnectionError,
                NoCredentialsError,
                PartialCredentialsError,
                ParamValidationError,
            ) as exc:
                raise self._map(op, exc) from exc
            return resp

        return await with_retries(self._owner.retry, once, what=f"{PROVIDER} {op} {self._uri}")

    def _key_id(self, resp: dict[str, Any]) -> str:
        kid = resp.get("KeyId")
        return str(kid) if kid else self._arn

    async def generate_data_key(self, context: Context) -> DataKey:
        resp = await self._call(
            "generate_data_key",
            KeyId=self._arn,
            KeySpec="AES_256",
            EncryptionContext=dict(context),
        )
        plaintext = bytes(resp["Plaintext"])
        if len(plaintext) != DATA_KEY_BYTES:
            raise KmsUnreachableError(
                f"{PROVIDER} key {self._uri}: GenerateDataKey returned a malformed key",
                key_uri=self._uri,
                provider=PROVIDER,
            )
        return DataKey(
            plaintext=plaintext,
            wrapped=bytes(resp["CiphertextBlob"]),
            key_version=self._key_id(resp),
        )

    async def wrap(self, plaintext: bytes, context: Context) -> WrappedKey:
        resp = await self._call(
            "encrypt", KeyId=self._arn, Plaintext=plaintext, EncryptionContext=dict(context)
        )
        return WrappedKey(wrapped=bytes(resp["CiphertextBlob"]), key_version=self._key_id(resp))

    async def unwrap(self, wrapped: bytes, context: Context) -> bytes:
        resp = await self._call(
            "decrypt",
            KeyId=self._arn,
            CiphertextBlob=wrapped,
            EncryptionContext=dict(context),
        )
        return bytes(resp["Plaintext"])


class AwsKmsClient:
    """Tink-style client for ``aws-kms://`` URIs.

    ``session``: the aiobotocore session to create clients from (default: a new one,
    reading the standard credential chain).  ``endpoint_url`` overrides the KMS
    endpoint (tests, VPC endpoints).  ``config`` is passed to ``create_client``;
    by default SDK retries are off and timeouts are those of ``retry``.
    """

    prefix = PREFIX

    def __init__(
        self,
        *,
        session: AioSession | None = None,
        endpoint_url: str | None = None,
        config: AioConfig | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._session = session or get_session()
        self._endpoint_url = endpoint_url
        self.retry = retry or RetryPolicy()
        self._config = config or AioConfig(
            retries={"total_max_attempts": 1},
            connect_timeout=self.retry.timeout,
            read_timeout=self.retry.timeout,
        )
        self._stack = AsyncExitStack()
        self._clients: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    @property
    def session(self) -> AioSession:
        """The aiobotocore session (its credential chain is the proxy's AWS identity)."""
        return self._session

    async def client_for(self, region: str) -> Any:
        """The SDK client for ``region``, created on first use and kept until ``close``."""
        client = self._clients.get(region)
        if client is not None:
            return client
        async with self._lock:
            client = self._clients.get(region)
            if client is None:
                client = await self._stack.enter_async_context(
                    self._session.create_client(
                        "kms",
                        region_name=region,
                        endpoint_url=self._endpoint_url,
                        config=self._config,
                    )
                )
                self._clients[region] = client
        return client

    def does_support(self, key_uri: str) -> bool:
        return key_uri.startswith(PREFIX)

    def get_kek(self, key_uri: str) -> Kek:
        arn = key_uri[len(PREFIX) :] if key_uri.startswith(PREFIX) else ""
        m = _ARN_RE.match(arn)
        if m is None:
            raise KeyConfigError(
                f"{key_uri!r} is not an aws-kms://arn:aws:kms:<region>:<account>:key/<id> "
                "or .../alias/<name> URI",
                key_uri=key_uri,
                provider=PROVIDER,
            )
        return AwsKek(key_uri, arn, m.group("region"), self)

    async def close(self) -> None:
        self._clients.clear()
        await self._stack.aclose()
