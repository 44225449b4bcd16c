"""A fake Cloud KMS ``KeyManagementService`` (Encrypt / Decrypt) over real gRPC.

It serves ``google.cloud.kms.v1.KeyManagementService`` with the client package's own
message types, so the real ``KeyManagementServiceAsyncClient`` talks to it unchanged,
and behaves like the service where cmek-proxy depends on it:

* a CryptoKey has numbered versions, each with its own AES-256 key; Encrypt uses the
  primary version and answers its name; ``rotate()`` adds a new primary and older
  versions keep decrypting (the ciphertext names the version that made it);
* ``additional_authenticated_data`` is authenticated (AES-GCM associated data);
  a wrong AAD or ciphertext fails with ``INVALID_ARGUMENT``;
* CRC32C: request checksums are verified (mismatch -> ``INVALID_ARGUMENT``), the
  ``verified_*`` flags and response checksums are set;
* failures: disable / destroy a version (``FAILED_PRECONDITION`` with the service's
  "is not enabled, current state is: X" message), remove permission
  (``PERMISSION_DENIED``), unknown key (``NOT_FOUND``), transient failures with a
  chosen status n times, and corrupting the next n response checksums.

``calls`` counts the RPCs received per method name (``"Encrypt"``, ``"Decrypt"``).
"""

from __future__ import annotations

import datetime
import os
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
from awscrt.checksums import crc32c
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.cloud import kms_v1

from tests.fakes import LoopThread

SERVICE = "google.cloud.kms.v1.KeyManagementService"
_MAGIC = b"FGK1"


@dataclass
class _Version:
    key: bytes
    state: str = "ENABLED"  # ENABLED, DISABLED, DESTROYED


@dataclass
class _CryptoKey:
    versions: dict[int, _Version] = field(default_factory=dict)
    primary: int = 0
    rotation_days: int = 0
    """Automatic rotation period (0: off), as GetCryptoKey reports it."""


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class FakeGcpKms:
    """The fake service; ``start()`` binds 127.0.0.1 on an ephemeral port."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, _CryptoKey] = {}
        self._denied: set[str] = set()
        self._failures: list[tuple[grpc.StatusCode, str]] = []
        self._corrupt = 0
        self.calls: Counter[str] = Counter()
        self.port = 0
        self._thread = LoopThread("fake-gcp-kms")
        self._server: grpc.aio.Server | None = None

    # ---- control -----------------------------------------------------------------

    def create_key(self, name: str) -> str:
        """Create ``projects/../cryptoKeys/<k>`` with version 1 as primary; returns its name."""
        with self._lock:
            self._keys[name] = _CryptoKey({1: _Version(AESGCM.generate_key(256))}, primary=1)
        return f"{name}/cryptoKeyVersions/1"

    def rotate(self, name: str) -> str:
        """Add a new version and make it primary; returns the new version's name."""
        with self._lock:
            ck = self._keys[name]
            n = max(ck.versions) + 1
            ck.versions[n] = _Version(AESGCM.generate_key(256))
            ck.primary = n
        return f"{name}/cryptoKeyVersions/{n}"

    def set_rotation(self, name: str, days: int) -> None:
        """Set the automatic rotation period GetCryptoKey reports (0: off)."""
        with self._lock:
            self._keys[name].rotation_days = days

    def get_crypto_key(self, req: kms_v1.GetCryptoKeyRequest) -> kms_v1.CryptoKey:
        with self._lock:
            self.calls["GetCryptoKey"] += 1
            ck = self._keys.get(req.name)
            if ck is None:
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"{req.name} not found")
            if req.name in self._denied:
                raise _Abort(grpc.StatusCode.PERMISSION_DENIED, "cloudkms.cryptoKeys.get denied")
            key = kms_v1.CryptoKey(
                name=req.name,
                purpose=kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT,
                primary=kms_v1.CryptoKeyVersion(name=f"{req.name}/cryptoKeyVersions/{ck.primary}"),
            )
            if ck.rotation_days:
                key.rotation_period = datetime.timedelta(days=ck.rotation_days)
                key.next_rotation_time = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
            return key

    def set_state(self, name: str, version: int, state: str) -> None:
        """Set a version's state: ``ENABLED``, ``DISABLED`` or ``DESTROYED``."""
        assert state in ("ENABLED", "DISABLED", "DESTROYED")
        with self._lock:
            v = self._keys[name].versions[version]
            if v.state == "DESTROYED" and state != "DESTROYED":
                raise ValueError("a destroyed version cannot come back")
            v.state = state

    def deny(self, name: str) -> None:
        """Remove the caller's permission on the key."""
        with self._lock:
            self._denied.add(name)

    def allow(self, name: str) -> None:
        with self._lock:
            self._denied.discard(name)

    def fail_next(self, n: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        """Answer the next ``n`` RPCs with ``code`` (transient failures)."""
        with self._lock:
            self._failures.extend([(code, f"fake transient failure ({code.name})")] * n)

    def corrupt_next(self, n: int) -> None:
        """Send a wrong response checksum in the next ``n`` successful RPCs."""
        with self._lock:
            self._corrupt += n

    # ---- service ------------------------------------------------------------------

    def _check_crc(self, field_name: str, data: bytes, crc: int | None) -> None:
        if crc is not None and crc != crc32c(data):
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"The checksum in field {field_name} did not match the data in field "
                f"{field_name.removesuffix('_crc32c')}.",
            )

    def _begin(self, method: str, name: str, permission: str) -> _CryptoKey:
        self.calls[method] += 1
        if self._failures:
            code, details = self._failures.pop(0)
            raise _Abort(code, details)
        if name in self._denied:
            raise _Abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"Permission '{permission}' denied on resource '{name}' (or it may not exist).",
            )
        ck = self._keys.get(name)
        if ck is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"{name} not found.")
        return ck

    @staticmethod
    def _require_enabled(name: str, n: int, v: _Version) -> None:
        if v.state != "ENABLED":
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{name}/cryptoKeyVersions/{n} is not enabled, current state is: {v.state}.",
            )

    def _corrupting(self) -> bool:
        if self._corrupt > 0:
            self._corrupt -= 1
            return True
        return False

    def encrypt(self, req: kms_v1.EncryptRequest) -> kms_v1.EncryptResponse:
        with self._lock:
            ck = self._begin("Encrypt", req.name, "cloudkms.cryptoKeyVersions.useToEncrypt")
            self._check_crc("plaintext_crc32c", req.plaintext, req.plaintext_crc32c)
            aad = req.additional_authenticated_data
            self._check_crc(
                "additional_authenticated_data_crc32c",
                aad,
                req.additional_authenticated_data_crc32c,
            )
            n = ck.primary
            v = ck.versions[n]
            self._require_enabled(req.name, n, v)
            nonce = os.urandom(12)
            ct = (
                _MAGIC
                + struct.pack(">I", n)
                + nonce
                + AESGCM(v.key).encrypt(nonce, req.plaintext, aad)
            )
            crc = crc32c(ct) ^ (1 if self._corrupting() else 0)
            return kms_v1.EncryptResponse(
                name=f"{req.name}/cryptoKeyVersions/{n}",
                ciphertext=ct,
                ciphertext_crc32c=crc,
                verified_plaintext_crc32c=req.plaintext_crc32c is not None,
                verified_additional_authenticated_data_crc32c=(
                    req.additional_authenticated_data_crc32c is not None
                ),
                protection_level=kms_v1.ProtectionLevel.SOFTWARE,
            )

    def decrypt(self, req: kms_v1.DecryptRequest) -> kms_v1.DecryptResponse:
        with self._lock:
            ck = self._begin("Decrypt", req.name, "cloudkms.cryptoKeyVersions.useToDecrypt")
            ct = req.ciphertext
            aad = req.additional_authenticated_data
            self._check_crc("ciphertext_crc32c", ct, req.ciphertext_crc32c)
            self._check_crc(
                "additional_authenticated_data_crc32c",
                aad,
                req.additional_authenticated_data_crc32c,
            )
            invalid = _Abort(
                grpc.StatusCode.INVALID_ARGUMENT, "Decryption failed: the ciphertext is invalid."
            )
            if not ct.startswith(_MAGIC) or len(ct) < 8 + 12 + 16:
                raise invalid
            (n,) = struct.unpack(">I", ct[4:8])
            v = ck.versions.get(n)
            if v is None:
                raise invalid
            self._require_enabled(req.name, n, v)
            try:
                pt = AESGCM(v.key).decrypt(ct[8:20], ct[20:], aad)
            except InvalidTag as exc:
                raise invalid from exc
            crc = crc32c(pt) ^ (1 if self._corrupting() else 0)
            return kms_v1.DecryptResponse(
                plaintext=pt,
                plaintext_crc32c=crc,
                used_primary=n == ck.primary,
                protection_level=kms_v1.ProtectionLevel.SOFTWARE,
            )

    def _handler(self) -> grpc.GenericRpcHandler:
        def unary(fn: Any, req_type: Any, resp_type: Any) -> grpc.RpcMethodHandler:
            async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                try:
                    return fn(request)
                except _Abort as exc:
                    await context.abort(exc.code, exc.details)

            return grpc.unary_unary_rpc_method_handler(
                handle,
                request_deserializer=req_type.deserialize,
                response_serializer=resp_type.serialize,
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Encrypt": unary(self.encrypt, kms_v1.EncryptRequest, kms_v1.EncryptResponse),
                "Decrypt": unary(self.decrypt, kms_v1.DecryptRequest, kms_v1.DecryptResponse),
                "GetCryptoKey": unary(
                    self.get_crypto_key, kms_v1.GetCryptoKeyRequest, kms_v1.CryptoKey
                ),
            },
        )

    # ---- lifecycle --------------------------------------------------------------------

    def start(self, port: int = 0) -> int:
        """Start serving on 127.0.0.1:<port> (0: ephemeral); returns the port.

        A stopped fake can be started again on its old port (``start(fake.port)``) with
        its keys: a KMS that was down and came back."""
        self._thread.start()

        async def up() -> int:
            server = grpc.aio.server()
            server.add_generic_rpc_handlers((self._handler(),))
            bound = int(server.add_insecure_port(f"127.0.0.1:{port}"))
            await server.start()
            self._server = server
            return bound

        self.port = self._thread.run(up())
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            server = self._server
            self._server = None
            self._thread.run(server.stop(grace=None))
        self._thread.stop()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"
