"""``local://`` provider: key-encryption keys kept in a local key file (development).

Key URI: ``local://<path-to-keyfile>#<key-id>`` or ``local://<path>`` (the file's
primary key).  The key file is JSON, mode 0600::

    {"primary": "k2", "keys": {"k1": "<base64 32 bytes>", "k2": "<base64 32 bytes>"}}

Several keys with ids let a new key take over (``primary``) while objects sealed
under older ids still open: the wrapped blob names the id that sealed it, and that
id is reported as the key version.  Wrapping is AES-256-GCM with the binding
context as associated data.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy.errors import DenialKind, IntegrityError, KeyConfigError, KeyUnavailableError
from proxy.kms.base import Context, DataKey, Kek, WrappedKey, generate_by_wrapping

PREFIX = "local://"
_BLOB_MAGIC = b"LK1"


def context_aad(context: Context) -> bytes:
    """Canonical, unambiguous encoding of a binding context."""
    return json.dumps(dict(sorted(context.items())), separators=(",", ":")).encode()


@dataclass(frozen=True)
class KeyFile:
    primary: str
    keys: dict[str, bytes]

    @classmethod
    def load(cls, path: Path) -> KeyFile:
        try:
            raw = json.loads(path.read_text())
            keys = {str(k): base64.b64decode(v, validate=True) for k, v in raw["keys"].items()}
            primary = str(raw["primary"])
        except FileNotFoundError as exc:
            raise KeyConfigError(f"local key file {path} does not exist") from exc
        except PermissionError as exc:
            raise KeyConfigError(
                f"local key file {path} is not readable by this user (permission denied)"
            ) from exc
        except OSError as exc:
            raise KeyConfigError(f"local key file {path} cannot be read: {exc.strerror}") from exc
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise KeyConfigError(f"local key file {path} is not a valid key file: {exc}") from exc
        if primary not in keys:
            raise KeyConfigError(f"local key file {path}: primary {primary!r} is not in keys")
        for kid, key in keys.items():
            if len(key) != 32:
                raise KeyConfigError(f"local key file {path}: key {kid!r} is not 32 bytes")
        return cls(primary=primary, keys=keys)

    def save(self, path: Path) -> None:
        """Write atomically with mode 0600."""
        data = json.dumps(
            {
                "primary": self.primary,
                "keys": {k: base64.b64encode(v).decode() for k, v in self.keys.items()},
            },
            indent=2,
        )
        tmp = path.with_suffix(path.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
        with os.fdopen(fd, "w") as fh:
            fh.write(data)
        os.replace(tmp, path)


def create_key_file(path: Path, key_id: str = "k1") -> KeyFile:
    """Create a key file with one fresh key (mode 0600); refuse to overwrite."""
    if path.exists():
        raise KeyConfigError(f"local key file {path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    kf = KeyFile(primary=key_id, keys={key_id: AESGCM.generate_key(bit_length=256)})
    kf.save(path)
    return kf


def rotate_key_file(path: Path) -> KeyFile:
    """Add a fresh key to an existing key file and make it the primary (mode 0600).

    Older keys stay, so objects sealed under them keep opening; new writes use the new one.
    """
    kf = KeyFile.load(path)
    n = len(kf.keys) + 1
    while f"k{n}" in kf.keys:
        n += 1
    new_id = f"k{n}"
    rotated = KeyFile(primary=new_id, keys={**kf.keys, new_id: AESGCM.generate_key(bit_length=256)})
    rotated.save(path)
    return rotated


class LocalKek:
    """A key from a local key file. The file is re-read when it changes on disk."""

    provider = "local"
    location = None

    def __init__(self, uri: str, path: Path, key_id: str | None) -> None:
        self._uri = uri
        self._path = path
        self._key_id = key_id
        self._mtime: float = -1.0
        self._file: KeyFile | None = None

    @property
    def uri(self) -> str:
        return self._uri

    def _load(self) -> KeyFile:
        try:
            mtime = self._path.stat().st_mtime
        except FileNotFoundError as exc:
            raise KeyUnavailableError(
                f"local key file {self._path} is gone",
                kind=DenialKind.INVALID_STATE,
                key_uri=self._uri,
                provider=self.provider,
            ) from exc
        if self._file is None or mtime != self._mtime:
            self._file = KeyFile.load(self._path)
            self._mtime = mtime
        return self._file

    def _wrapping_id(self, kf: KeyFile) -> str:
        kid = self._key_id or kf.primary
        if kid not in kf.keys:
            raise KeyUnavailableError(
                f"key id {kid!r} is not in {self._path}",
                kind=DenialKind.INVALID_STATE,
                key_uri=self._uri,
                provider=self.provider,
            )
        return kid

    async def wrap(self, plaintext: bytes, context: Context) -> WrappedKey:
        kf = self._load()
        kid = self._wrapping_id(kf)
        nonce = os.urandom(12)
        kid_b = kid.encode()
        ct = AESGCM(kf.keys[kid]).encrypt(nonce, plaintext, context_aad(context))
        blob = _BLOB_MAGIC + bytes([len(kid_b)]) + kid_b + nonce + ct
        return WrappedKey(wrapped=blob, key_version=kid)

    async def unwrap(self, wrapped: bytes, context: Context) -> bytes:
        kf = self._load()
        if not wrapped.startswith(_BLOB_MAGIC) or len(wrapped) < 4:
            # The stored envelope is damaged: an integrity failure of one object, not a
            # denial of the key (which would drop every cached key and mark it revoked).
            raise IntegrityError("wrapped data key is not a local:// blob")
        n = wrapped[3]
        kid = wrapped[4 : 4 + n].decode(errors="replace")
        nonce = wrapped[4 + n : 16 + n]
        ct = wrapped[16 + n :]
        key = kf.keys.get(kid)
        if key is None:
            raise KeyUnavailableError(
                f"key id {kid!r} is no longer in {self._path}",
                kind=DenialKind.INVALID_STATE,
                key_uri=self._uri,
                provider=self.provider,
            )
        try:
            return AESGCM(key).decrypt(nonce, ct, context_aad(context))
        except InvalidTag as exc:
            raise IntegrityError(
                "wrapped data key does not open under this key and context"
            ) from exc

    async def generate_data_key(self, context: Context) -> DataKey:
        return await generate_by_wrapping(self, context)


class LocalKmsClient:
    """Tink-style client for ``local://`` URIs."""

    prefix = PREFIX

    def does_support(self, key_uri: str) -> bool:
        return key_uri.startswith(PREFIX)

    def get_kek(self, key_uri: str) -> Kek:
        if not self.does_support(key_uri):
            raise KeyConfigError(f"{key_uri!r} is not a local:// key URI", key_uri=key_uri)
        rest = key_uri[len(PREFIX) :]
        path_s, _, key_id = rest.partition("#")
        if not path_s:
            raise KeyConfigError("local:// key URI has no path", key_uri=key_uri)
        return LocalKek(key_uri, Path(path_s), key_id or None)

    async def close(self) -> None:
        return None
