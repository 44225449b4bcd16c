"""``vault-transit://`` provider: HashiCorp Vault / OpenBao Transit secrets engine.

Key URI: ``vault-transit://<host:port>/<mount>/keys/<name>``, e.g.
``vault-transit://vault.example.com:8200/transit/keys/cmek``.  The mount may contain
slashes (``team-a/transit``).  The API is small, so it is spoken directly over aiohttp:

* generate: ``POST /v1/<mount>/datakey/plaintext/<name>`` with ``bits=256`` and
  ``context`` = base64 of the canonical binding context;
* wrap: ``POST /v1/<mount>/encrypt/<name>`` with ``plaintext`` and ``context``;
* unwrap: ``POST /v1/<mount>/decrypt/<name>`` with ``ciphertext`` and ``context``.

The wrapped key is Transit's ciphertext string (``vault:vN:...``) as ASCII bytes; the
key version is ``vN`` from its prefix.

**The key must be created with** ``derived=true``: Transit then derives a per-context
key from the ``context`` (the binding context), so a wrapped key moved to another
bucket does not decrypt.  On a non-derived key Transit ignores ``context`` and the
binding is lost.  Create it with
``bao write -f transit/keys/<name> derived=true`` (``vault write`` likewise).

Transport: HTTPS by default (verify against the system store or ``ca_file``);
``tls=False`` on the client switches to plain ``http://`` for a local dev server.
TLS is a client option rather than a URI option because it describes how this
proxy reaches the server, not which key is meant.

Token: ``auth`` (``proxy.kms.vault_auth.VaultAuth``: token, AppRole or Kubernetes login);
by default the ``token`` constructor argument, else the file at ``token_file``, else the
``VAULT_TOKEN`` or ``BAO_TOKEN`` environment variable.  ``namespace`` (Vault Enterprise /
OpenBao namespaces) is sent as ``X-Vault-Namespace`` with every request, logins included.

Policy the customer must grant the proxy's token (mount ``transit``, key ``cmek``)::

    path "transit/datakey/plaintext/cmek" { capabilities = ["update"] }
    path "transit/encrypt/cmek"           { capabilities = ["update"] }
    path "transit/decrypt/cmek"           { capabilities = ["update"] }

Error mapping: 403 -> ``ACCESS_DENIED``; 400 "... disabled ..." or a ciphertext
version below ``min_decryption_version`` -> ``DISABLED``; 400 "encryption key not
found" -> ``INVALID_STATE``; a ciphertext that does not open (authentication failure:
wrong key or context; invalid ciphertext; not a ``vault:vN:`` string) ->
``IntegrityError`` (one damaged or moved object, not a denial of the key); 429, 5xx,
timeouts, refused connections -> unreachable (retried).
"""

from __future__ import annotations

import base64
import os
import re
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

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
from proxy.kms.local import context_aad
from proxy.kms.vault_auth import VaultAuth

PREFIX = "vault-transit://"
PROVIDER = "vault-transit"

_URI_RE = re.compile(
    r"^vault-transit://(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\])(?::(?P<port>\d{1,5}))?"
    r"/(?P<mount>[A-Za-z0-9_.\-]+(?:/[A-Za-z0-9_.\-]+)*)/keys/(?P<name>[A-Za-z0-9_.\-]+)$"
)
_VERSION_RE = re.compile(r"^vault:v(\d+):")


def _context_b64(context: Context) -> str:
    return base64.b64encode(context_aad(context)).decode()


class VaultTransitKek:
    """One Transit key. Created by ``VaultTransitClient.get_kek``."""

    provider = PROVIDER
    location: str | None = None

    def __init__(self, uri: str, base_url: str, mount: str, name: str, owner: VaultTransitClient):
        self._uri = uri
        self._base = base_url
        self._mount = mount
        self._name = name
        self._owner = owner

    @property
    def uri(self) -> str:
        return self._uri

    def _url(self, op: str) -> str:
        return f"{self._base}/v1/{self._mount}/{op}/{quote(self._name, safe='')}"

    def _deny(self, kind: DenialKind, msg: str) -> KeyUnavailableError:
        return KeyUnavailableError(
            f"{PROVIDER} key {self._uri}: {msg}", kind=kind, key_uri=self._uri, provider=PROVIDER
        )

    async def _post(self, op: str, body: dict[str, Any]) -> dict[str, Any]:
        owner = self._owner
        session = await owner.session()
        base_headers = owner.base_headers()
        url = self._url(op)
        for attempt in (0, 1):
            token = await self._token(session, base_headers)
            headers = {**base_headers, "X-Vault-Token": token}
            try:
                async with session.post(url, json=body, headers=headers) as resp:
                    status = resp.status
                    try:
                        payload = await resp.json(content_type=None)
                    except ValueError:
                        payload = None
            except aiohttp.ClientSSLError as exc:  # a wrong CA or name: not transient
                raise KeyConfigError(
                    f"{PROVIDER} key {self._uri}: {op}: TLS: {exc} (kms.vault.ca_file)",
                    key_uri=self._uri,
                    provider=PROVIDER,
                ) from exc
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                raise KmsUnreachableError(
                    f"{PROVIDER} key {self._uri}: {op}: {exc.__class__.__name__}: {exc}",
                    key_uri=self._uri,
                    provider=PROVIDER,
                ) from exc
            if status == 403 and attempt == 0 and owner.auth.renews:
                # a login token may have expired or been revoked: one fresh login, one retry
                owner.auth.invalidate(self._base, token)
                continue
            break
        if status == 200 and isinstance(payload, dict) and isinstance(payload.get("data"), dict):
            data: dict[str, Any] = payload["data"]
            return data
        raise self._error(op, status, payload)

    async def _token(self, session: aiohttp.ClientSession, headers: dict[str, str]) -> str:
        """The token for this key's server; login errors name the key."""
        try:
            return await self._owner.auth.get(session, self._base, headers)
        except KeyUnavailableError as exc:
            raise KeyUnavailableError(
                f"{PROVIDER} key {self._uri}: {exc}",
                kind=exc.kind,
                key_uri=self._uri,
                provider=PROVIDER,
            ) from exc
        except KmsUnreachableError as exc:
            raise KmsUnreachableError(
                f"{PROVIDER} key {self._uri}: {exc}", key_uri=self._uri, provider=PROVIDER
            ) from exc
        except KeyConfigError as exc:
            raise KeyConfigError(
                f"{PROVIDER} key {self._uri}: {exc}", key_uri=self._uri, provider=PROVIDER
            ) from exc

    def _error(self, op: str, status: int, payload: object) -> Exception:
        errors: list[str] = []
        if isinstance(payload, dict) and isinstance(payload.get("errors"), list):
            errors = [str(e) for e in payload["errors"]]
        msg = f"{op}: HTTP {status}: {'; '.join(errors) or 'no error message'}"
        low = msg.lower()
        if status == 429 or status >= 500:
            return KmsUnreachableError(
                f"{PROVIDER} key {self._uri}: {msg}", key_uri=self._uri, provider=PROVIDER
            )
        if status == 403:
            return self._deny(DenialKind.ACCESS_DENIED, msg)
        if "disabled" in low or "disallowed by policy" in low:
            return self._deny(DenialKind.DISABLED, msg)
        if status == 400 and (
            "message authentication failed" in low
            or "invalid ciphertext" in low
            or "unable to decrypt" in low
        ):
            return IntegrityError(f"{PROVIDER} key {self._uri}: {msg}")
        if status == 400 and "not found" in low:
            return self._deny(DenialKind.INVALID_STATE, msg)
        if status == 404:
            return self._deny(DenialKind.INVALID_STATE, msg)
        return KeyConfigError(
            f"{PROVIDER} key {self._uri}: {msg}", key_uri=self._uri, provider=PROVIDER
        )

    def _version(self, ciphertext: str) -> str:
        m = _VERSION_RE.match(ciphertext)
        if m is None:
            raise KmsUnreachableError(
                f"{PROVIDER} key {self._uri}: response ciphertext has no vault:vN: prefix",
                key_uri=self._uri,
                provider=PROVIDER,
            )
        return f"v{m.group(1)}"

    def _b64(self, value: object, what: str) -> bytes:
        if not isinstance(value, str):
            raise KmsUnreachableError(
                f"{PROVIDER} key {self._uri}: response has no {what}",
                key_uri=self._uri,
                provider=PROVIDER,
            )
        try:
            return base64.b64decode(value, validate=True)
        except ValueError as exc:
            raise KmsUnreachableError(
                f"{PROVIDER} key {self._uri}: response {what} is not base64",
                key_uri=self._uri,
                provider=PROVIDER,
            ) from exc

    async def generate_data_key(self, context: Context) -> DataKey:
        body = {"context": _context_b64(context), "bits": DATA_KEY_BYTES * 8}

        async def call() -> DataKey:
            data = await self._post("datakey/plaintext", body)
            ct = data.get("ciphertext")
            plaintext = self._b64(data.get("plaintext"), "plaintext")
            if not isinstance(ct, str) or len(plaintext) != DATA_KEY_BYTES:
                raise KmsUnreachableError(
                    f"{PROVIDER} key {self._uri}: malformed datakey response",
                    key_uri=self._uri,
                    provider=PROVIDER,
                )
            return DataKey(plaintext=plaintext, wrapped=ct.encode(), key_version=self._version(ct))

        return await with_retries(self._owner.retry, call, what=f"{PROVIDER} datakey {self._uri}")

    async def wrap(self, plaintext: bytes, context: Context) -> WrappedKey:
        body = {"plaintext": base64.b64encode(plaintext).decode(), "context": _context_b64(context)}

        async def call() -> WrappedKey:
            data = await self._post("encrypt", body)
            ct = data.get("ciphertext")
            if not isinstance(ct, str):
                raise KmsUnreachableError(
                    f"{PROVIDER} key {self._uri}: encrypt response has no ciphertext",
                    key_uri=self._uri,
                    provider=PROVIDER,
                )
            return WrappedKey(wrapped=ct.encode(), key_version=self._version(ct))

        return await with_retries(self._owner.retry, call, what=f"{PROVIDER} encrypt {self._uri}")

    async def unwrap(self, wrapped: bytes, context: Context) -> bytes:
        try:
            ct = wrapped.decode("ascii")
        except UnicodeDecodeError as exc:
            raise IntegrityError(
                f"{PROVIDER} key {self._uri}: wrapped key is not a Transit ciphertext"
            ) from exc
        if _VERSION_RE.match(ct) is None:
            raise IntegrityError(
                f"{PROVIDER} key {self._uri}: wrapped key is not a Transit ciphertext"
            )
        body = {"ciphertext": ct, "context": _context_b64(context)}

        async def call() -> bytes:
            data = await self._post("decrypt", body)
            return self._b64(data.get("plaintext"), "plaintext")

        return await with_retries(self._owner.retry, call, what=f"{PROVIDER} decrypt {self._uri}")


class VaultTransitClient:
    """Tink-style client for ``vault-transit://`` URIs.

    ``session``: an aiohttp session to use (the caller keeps ownership); otherwise one
    is created on first use with the TLS options and closed by ``close()``.
    """

    prefix = PREFIX

    def __init__(
        self,
        *,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        tls: bool = True,
        ca_file: str | os.PathLike[str] | None = None,
        verify: bool = True,
        session: aiohttp.ClientSession | None = None,
        retry: RetryPolicy | None = None,
        namespace: str | None = None,
        auth: VaultAuth | None = None,
    ) -> None:
        self.auth = auth or VaultAuth(
            "token", token=token, token_file=Path(token_file) if token_file is not None else None
        )
        self._tls = tls
        self._ca_file = ca_file
        self._verify = verify
        self._namespace = namespace.strip("/") if namespace else None
        self._session = session
        self._own_session = session is None
        self.retry = retry or RetryPolicy()

    @property
    def tls(self) -> bool:
        """Whether the server is reached over https (else plain http, dev servers)."""
        return self._tls

    def base_headers(self) -> dict[str, str]:
        """Headers of every request: ``X-Vault-Request`` and the namespace, if any."""
        headers = {"X-Vault-Request": "true"}
        if self._namespace:
            headers["X-Vault-Namespace"] = self._namespace
        return headers

    def token(self) -> str:
        """The fixed token of the ``token`` method (constructor, token file, env)."""
        return self.auth.static_token()

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            ssl_opt: ssl.SSLContext | bool = True
            if self._tls:
                if not self._verify:
                    ssl_opt = False
                elif self._ca_file is not None:
                    ssl_opt = ssl.create_default_context(cafile=str(self._ca_file))
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ssl_opt),
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    def does_support(self, key_uri: str) -> bool:
        return key_uri.startswith(PREFIX)

    def get_kek(self, key_uri: str) -> Kek:
        m = _URI_RE.match(key_uri)
        if m is None:
            raise KeyConfigError(
                f"{key_uri!r} is not a vault-transit://<host:port>/<mount>/keys/<name> URI",
                key_uri=key_uri,
                provider=PROVIDER,
            )
        hostport = m.group("host") + (f":{m.group('port')}" if m.group("port") else "")
        base = f"{'https' if self._tls else 'http'}://{hostport}"
        return VaultTransitKek(key_uri, base, m.group("mount"), m.group("name"), self)

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None
