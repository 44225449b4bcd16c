"""How the ``vault-transit://`` provider gets its Vault / OpenBao token.

Methods (``kms.vault.auth.method``):

* ``token`` - a fixed token: ``token``, else the file ``token_file`` (re-read on every
  call, so a sidecar such as Vault Agent can rotate it), else ``VAULT_TOKEN`` /
  ``BAO_TOKEN``;
* ``approle`` - ``POST /v1/auth/<mount>/login`` with ``role_id`` and ``secret_id``
  (each given inline or read from a file) - default mount ``approle``;
* ``kubernetes`` - ``POST /v1/auth/<mount>/login`` with ``role`` and the pod's service
  account JWT, read from ``jwt_file`` at every login (projected tokens rotate) - default
  mount ``kubernetes``.

A login token is cached per Vault server and renewed by a new login once two thirds of
its lease have passed (or when it is older than ``MAX_LOGIN_AGE``); a 403 answered to a
login token makes one fresh login and one retry before it counts as a denial (the token
may have been revoked or expired early).  A login refused with 400/403 is a denial of the
proxy's access (``KeyUnavailableError`` ``ACCESS_DENIED``); 429, 5xx and connection errors
are unreachable.  Tokens and secret ids are never logged.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import aiohttp

from proxy.errors import DenialKind, KeyConfigError, KeyUnavailableError, KmsUnreachableError

PROVIDER: Final = "vault-transit"
DEFAULT_JWT_FILE: Final = "/var/run/secrets/kubernetes.io/serviceaccount/token"
MAX_LOGIN_AGE: Final = 3600.0

Method = Literal["token", "approle", "kubernetes"]


def _read(path: Path, what: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise KeyConfigError(
            f"{PROVIDER}: cannot read {what} file {path}: {exc.strerror}", provider=PROVIDER
        ) from exc
    if not value:
        raise KeyConfigError(f"{PROVIDER}: {what} file {path} is empty", provider=PROVIDER)
    return value


@dataclass
class _Login:
    token: str
    renew_at: float


@dataclass
class VaultAuth:
    """Token source for one provider client (see the module docstring)."""

    method: Method = "token"
    token: str | None = None
    token_file: Path | None = None
    mount: str | None = None
    role_id: str | None = None
    role_id_file: Path | None = None
    secret_id: str | None = None
    secret_id_file: Path | None = None
    role: str | None = None
    jwt_file: Path = Path(DEFAULT_JWT_FILE)
    clock: Callable[[], float] = time.monotonic
    _logins: dict[str, _Login] = field(default_factory=dict, repr=False)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:  # never show the token or secret id
        return f"VaultAuth(method={self.method!r}, mount={self.login_mount!r})"

    @property
    def login_mount(self) -> str | None:
        if self.method == "token":
            return None
        return (self.mount or self.method).strip("/")

    @property
    def renews(self) -> bool:
        """Whether a 403 may be a stale login token (worth one fresh login)."""
        return self.method != "token"

    def static_token(self) -> str:
        if self.token:
            return self.token
        if self.token_file is not None:
            return _read(self.token_file, "token")
        for var in ("VAULT_TOKEN", "BAO_TOKEN"):
            tok = os.environ.get(var, "").strip()
            if tok:
                return tok
        raise KeyConfigError(
            f"{PROVIDER}: no token (set kms.vault.auth.token / token_file, or "
            "VAULT_TOKEN / BAO_TOKEN, or use the approle or kubernetes method)",
            provider=PROVIDER,
        )

    async def get(
        self, session: aiohttp.ClientSession, base_url: str, headers: dict[str, str]
    ) -> str:
        """The token to send to ``base_url`` (logging in when needed)."""
        if self.method == "token":
            return self.static_token()
        login = self._logins.get(base_url)
        if login is not None and self.clock() < login.renew_at:
            return login.token
        lock = self._locks.setdefault(base_url, asyncio.Lock())
        async with lock:  # one login at a time per server
            login = self._logins.get(base_url)
            if login is not None and self.clock() < login.renew_at:
                return login.token
            login = await self._login(session, base_url, headers)
            self._logins[base_url] = login
            return login.token

    def invalidate(self, base_url: str, token: str) -> None:
        login = self._logins.get(base_url)
        if login is not None and login.token == token:
            del self._logins[base_url]

    def _body(self) -> dict[str, str]:
        if self.method == "approle":
            role_id = self.role_id or (
                _read(self.role_id_file, "role_id") if self.role_id_file else None
            )
            secret_id = self.secret_id or (
                _read(self.secret_id_file, "secret_id") if self.secret_id_file else None
            )
            if not role_id:
                raise KeyConfigError(
                    f"{PROVIDER}: approle needs kms.vault.auth.role_id or role_id_file",
                    provider=PROVIDER,
                )
            body = {"role_id": role_id}
            if secret_id:
                body["secret_id"] = secret_id
            return body
        if not self.role:
            raise KeyConfigError(
                f"{PROVIDER}: kubernetes auth needs kms.vault.auth.role", provider=PROVIDER
            )
        return {"role": self.role, "jwt": _read(self.jwt_file, "service account token")}

    async def _login(
        self, session: aiohttp.ClientSession, base_url: str, headers: dict[str, str]
    ) -> _Login:
        url = f"{base_url}/v1/auth/{self.login_mount}/login"
        what = f"{PROVIDER} {self.method} login at {base_url}"
        started = self.clock()
        try:
            async with session.post(url, json=self._body(), headers=headers) as resp:
                status = resp.status
                try:
                    payload: Any = await resp.json(content_type=None)
                except ValueError:
                    payload = None
        except aiohttp.ClientSSLError as exc:  # a wrong CA or name: not transient
            raise KeyConfigError(
                f"{what}: TLS: {exc} (kms.vault.ca_file)", provider=PROVIDER
            ) from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise KmsUnreachableError(
                f"{what}: {exc.__class__.__name__}: {exc}", provider=PROVIDER
            ) from exc
        auth = payload.get("auth") if isinstance(payload, dict) else None
        if status == 200 and isinstance(auth, dict) and isinstance(auth.get("client_token"), str):
            lease = auth.get("lease_duration")
            ttl = float(lease) if isinstance(lease, int | float) and lease > 0 else MAX_LOGIN_AGE
            return _Login(auth["client_token"], started + min(ttl, MAX_LOGIN_AGE) * 2 / 3)
        errors = payload.get("errors") if isinstance(payload, dict) else None
        msg = f"{what}: HTTP {status}: {'; '.join(map(str, errors or [])) or 'no error message'}"
        if status == 429 or status >= 500:
            raise KmsUnreachableError(msg, provider=PROVIDER)
        if status in (400, 401, 403):
            raise KeyUnavailableError(msg, kind=DenialKind.ACCESS_DENIED, provider=PROVIDER)
        raise KeyConfigError(msg, provider=PROVIDER)
