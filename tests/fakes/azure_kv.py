"""A fake Azure Key Vault (keys: get, wrapKey, unwrapKey) over HTTPS.

Speaks the Key Vault REST protocol closely enough for the real
``azure-keyvault-keys`` aio clients:

* TLS with a certificate issued at start by a throwaway CA (``tls_material``); the
  client trusts it through ``connection_verify=<ca_path>``;
* a request without ``Authorization`` gets ``401`` with the challenge
  ``WWW-Authenticate: Bearer authorization="https://login.microsoftonline.com/<tenant>",
  resource="https://vault.azure.net"``; a bearer token other than ``token`` gets 401;
* every request must carry ``api-version``;
* ``GET /keys/{name}[/{version}]`` answers the key bundle (JSON Web Key with ``kid``,
  ``kty``, ``key_ops``, ``n``, ``e``; ``attributes.enabled``);
* ``POST /keys/{name}/{version}/wrapkey`` and ``/unwrapkey`` do RSA-OAEP-256 (also
  RSA-OAEP) with real 2048-bit RSA keys; the response names the key id;
* ``rotate()`` adds a version; ``set_enabled(False)`` disables it, and unwrap answers
  the service's ``403 Forbidden`` "Operation unwrapKey is not allowed on a disabled
  key." with inner code ``KeyDisabled``; ``deny()`` removes permission (403, inner
  code ``AccessDenied``); unknown keys are ``404 KeyNotFound``; ``fail_next(n, 503)``
  injects transient failures.

``calls`` counts authenticated requests per operation (``"get"``, ``"wrapkey"``,
``"unwrapkey"``).
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import ssl
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.fakes import LoopThread

TENANT = "00000000-0000-0000-0000-00000000cafe"


@dataclass(frozen=True)
class TlsMaterial:
    """Paths of a CA certificate and a server certificate/key it issued (PEM)."""

    ca_path: Path
    cert_path: Path
    key_path: Path


def tls_material(directory: Path, host: str = "127.0.0.1") -> TlsMaterial:
    """Create a CA and a server certificate for ``host`` (IP and localhost) in ``directory``."""
    now = dt.datetime.now(dt.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cmek-proxy test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    out = TlsMaterial(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    out.ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    out.key_path.chmod(0o600)
    return out


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64u(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_bytes(n: int) -> bytes:
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


_OAEP = {
    "RSA-OAEP-256": lambda: padding.OAEP(
        mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None
    ),
    "RSA-OAEP": lambda: padding.OAEP(
        mgf=padding.MGF1(hashes.SHA1()),
        algorithm=hashes.SHA1(),
        label=None,
    ),
}


@dataclass
class _Key:
    versions: dict[str, rsa.RSAPrivateKey] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    enabled: dict[str, bool] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))


class FakeKeyVault:
    """The fake vault; ``start(tls)`` binds 127.0.0.1 on an ephemeral port."""

    def __init__(self, token: str = "fake-token") -> None:
        self.token = token
        self._lock = threading.Lock()
        self._keys: dict[str, _Key] = {}
        self._denied: set[str] = set()
        self._failures: list[int] = []
        self.calls: Counter[str] = Counter()
        self.port = 0
        self._thread = LoopThread("fake-azure-kv")
        self._runner: web.AppRunner | None = None

    # ---- control -----------------------------------------------------------------

    @property
    def vault_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        """``host:port`` as used in ``azure-kv://`` URIs."""
        return f"127.0.0.1:{self.port}"

    def create_key(self, name: str) -> str:
        """Create an RSA-2048 key with one enabled version; returns the version."""
        with self._lock:
            self._keys[name] = _Key()
        return self.rotate(name)

    def rotate(self, name: str) -> str:
        """Add a new current version; returns it."""
        priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        version = uuid.uuid4().hex
        with self._lock:
            k = self._keys[name]
            k.versions[version] = priv
            k.order.append(version)
            k.enabled[version] = True
        return version

    def set_enabled(self, name: str, enabled: bool, version: str | None = None) -> None:
        """Enable or disable one version (default: every version, like disabling the key)."""
        with self._lock:
            k = self._keys[name]
            for v in [version] if version else list(k.versions):
                k.enabled[v] = enabled

    def delete_key(self, name: str) -> None:
        with self._lock:
            self._keys.pop(name, None)

    def deny(self, name: str) -> None:
        with self._lock:
            self._denied.add(name)

    def allow(self, name: str) -> None:
        with self._lock:
            self._denied.discard(name)

    def fail_next(self, n: int, status: int = 503) -> None:
        """Answer the next ``n`` authenticated requests with ``status`` (503 or 429)."""
        with self._lock:
            self._failures.extend([status] * n)

    # ---- protocol -------------------------------------------------------------------

    def _kid(self, name: str, version: str) -> str:
        return f"{self.vault_url}/keys/{name}/{version}"

    @staticmethod
    def _error(status: int, code: str, message: str, inner: str | None = None) -> web.Response:
        err: dict[str, object] = {"code": code, "message": message}
        if inner:
            err["innererror"] = {"code": inner}
        return web.json_response({"error": err}, status=status)

    def _bundle(self, name: str, version: str) -> dict[str, object]:
        k = self._keys[name]
        pub = k.versions[version].public_key().public_numbers()
        return {
            "key": {
                "kid": self._kid(name, version),
                "kty": "RSA",
                "key_ops": ["encrypt", "decrypt", "wrapKey", "unwrapKey"],
                "n": _b64u(_int_bytes(pub.n)),
                "e": _b64u(_int_bytes(pub.e)),
            },
            "attributes": {
                "enabled": k.enabled[version],
                "created": k.created,
                "updated": k.created,
                "recoveryLevel": "Recoverable+Purgeable",
                "recoverableDays": 90,
            },
        }

    def _challenge(self) -> web.Response:
        return web.json_response(
            {"error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer"}},
            status=401,
            headers={
                "WWW-Authenticate": (
                    f'Bearer authorization="https://login.microsoftonline.com/{TENANT}", '
                    'resource="https://vault.azure.net"'
                )
            },
        )

    async def _handle(self, request: web.Request) -> web.Response:
        if "api-version" not in request.query:
            return self._error(400, "BadParameter", "The 'api-version' query parameter is missing.")
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return self._challenge()
        if auth.removeprefix("Bearer ") != self.token:
            return self._error(401, "Unauthorized", "AKV10032: Invalid issuer.")
        parts = [p for p in request.path.split("/") if p]
        if len(parts) < 2 or parts[0] != "keys":
            return self._error(404, "NotFound", "unknown path")
        name = parts[1]
        version = parts[2] if len(parts) >= 3 else ""
        op = parts[3].lower() if len(parts) >= 4 else ("get" if request.method == "GET" else "")
        if op not in ("get", "wrapkey", "unwrapkey") or len(parts) > 4:
            return self._error(405, "MethodNotAllowed", "unsupported operation")
        body = await request.read() if request.method == "POST" else b""
        with self._lock:
            self.calls[op] += 1
            if self._failures:
                status = self._failures.pop(0)
                return self._error(status, "ServiceUnavailable", "fake transient failure")
            k = self._keys.get(name)
            if k is None or (version and version not in k.versions):
                return self._error(
                    404,
                    "KeyNotFound",
                    f"A key with (name/id) {name} was not found in this key vault.",
                )
            version = version or k.order[-1]
            if name in self._denied:
                perm = {"get": "get", "wrapkey": "wrapKey", "unwrapkey": "unwrapKey"}[op]
                return self._error(
                    403,
                    "Forbidden",
                    f"The user, group or application 'appid=fake' does not have keys {perm} "
                    f"permission on key vault 'fake;location=local'.",
                    "AccessDenied",
                )
            if op == "get":
                return web.json_response(self._bundle(name, version))
            if op == "unwrapkey" and not k.enabled[version]:
                return self._error(
                    403,
                    "Forbidden",
                    "Operation unwrapKey is not allowed on a disabled key.",
                    "KeyDisabled",
                )
            try:
                params = json.loads(body)
                alg = str(params["alg"])
                value = _unb64u(str(params["value"]))
            except (ValueError, KeyError, TypeError):
                return self._error(400, "BadParameter", "Invalid request body.")
            pad = _OAEP.get(alg)
            if pad is None:
                return self._error(400, "BadParameter", f"Unsupported algorithm {alg}.")
            priv = k.versions[version]
            if op == "wrapkey":
                result = priv.public_key().encrypt(value, pad())
            else:
                try:
                    result = priv.decrypt(value, pad())
                except ValueError:
                    return self._error(400, "BadParameter", "Unable to decrypt the input.")
            return web.json_response({"kid": self._kid(name, version), "value": _b64u(result)})

    # ---- lifecycle --------------------------------------------------------------------

    def start(self, tls: TlsMaterial, port: int = 0) -> int:
        """Serve HTTPS on 127.0.0.1:<port> (0: ephemeral); returns the port. A stopped
        fake can be started again on its old port with its keys."""
        self._thread.start()

        async def up() -> int:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(tls.cert_path, tls.key_path)
            site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx)
            await site.start()
            self._runner = runner
            server = site._server
            assert server is not None
            sockets = getattr(server, "sockets", None)
            assert sockets
            return int(sockets[0].getsockname()[1])

        self.port = self._thread.run(up())
        return self.port

    def stop(self) -> None:
        if self._runner is not None:
            runner = self._runner
            self._runner = None
            self._thread.run(runner.cleanup())
        self._thread.stop()
