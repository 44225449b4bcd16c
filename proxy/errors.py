"""The one exception tree of cmek-proxy.

Every error the proxy raises on purpose is a ``CmekError``::

    CmekError
    ├── ConfigError                 bad configuration (names the field)
    ├── FormatError                 stored object does not parse as format v1
    │   └── IntegrityError          authentication failed: tampered, truncated, wrong key
    ├── KmsError                    anything the key-management layer reports
    │   ├── KeyConfigError          key URI malformed, unsupported, or failed validation
    │   ├── KeyUnavailableError     the customer's KMS *denied* (revoked, disabled, destroyed)
    │   │                           - never retried; cached material is dropped
    │   └── KmsUnreachableError     timeouts, 5xx, throttling, connection refused
    │                               - transient; retried with backoff
    └── S3Error                     an error that goes to an S3 client as XML
                                    (code, HTTP status, message)

Only the S3 front end turns these into HTTP responses (see ``proxy.s3.errors``), so no
layer below it knows about HTTP.  Messages never contain key material, signatures,
credentials or object contents.
"""

from __future__ import annotations

from enum import Enum


class CmekError(Exception):
    """Base of every error cmek-proxy raises on purpose."""


class ConfigError(CmekError):
    """The configuration is invalid; the message names the field and the problem."""


class FormatError(CmekError):
    """A stored object's metadata or body does not follow the v1 format."""


class IntegrityError(FormatError):
    """An AEAD check failed: the stored data was changed, truncated or moved."""


class KmsError(CmekError):
    """Base of errors from the key-management layer."""

    def __init__(self, message: str, *, key_uri: str = "", provider: str = "") -> None:
        super().__init__(message)
        self.key_uri = key_uri
        self.provider = provider


class KeyConfigError(KmsError):
    """A key URI is malformed, has no provider, or failed validation."""


class DenialKind(Enum):
    """Why a KMS refused: maps to the S3 errors SSE-KMS clients know."""

    DISABLED = "disabled"  # KMS.DisabledException, 400
    # KMS.KMSInvalidStateException, 400 (destroyed, pending deletion)
    INVALID_STATE = "invalid_state"
    ACCESS_DENIED = "access_denied"  # AccessDenied, 403 (permission removed)


class KeyUnavailableError(KmsError):
    """The customer's KMS denied the operation. Never retried."""

    def __init__(
        self, message: str, *, kind: DenialKind, key_uri: str = "", provider: str = ""
    ) -> None:
        super().__init__(message, key_uri=key_uri, provider=provider)
        self.kind = kind


class KmsUnreachableError(KmsError):
    """The KMS could not be reached or failed transiently (timeout, 5xx, throttling)."""


class S3Error(CmekError):
    """An error that is sent to the S3 client as an XML error document."""

    def __init__(
        self,
        code: str,
        message: str,
        status: int,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.headers = headers or {}
        self.extra = extra or {}
