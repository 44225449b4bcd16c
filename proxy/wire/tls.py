"""TLS for the listeners: server contexts whose certificate is reloaded when its files change.

``ReloadingTls`` owns one ``ssl.SSLContext`` handed to the listener once. ``check()``
compares the certificate and key files' modification times (and sizes) with those of the
last load and, when they changed, calls ``load_cert_chain`` again on the *same* context:
OpenSSL copies the certificate into each new connection, so new handshakes present the new
certificate while open connections keep theirs; nothing restarts. A pair that does not load
(half-written, key not matching the certificate) leaves the previous one in service and is
tried again at the next check. The client-CA file (admin listener) is read at start.

``write_self_signed`` makes the certificate ``cmek-proxy dev --tls`` serves.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import os
import ssl
import stat
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.config import Tls
from proxy.errors import ConfigError

log = logging.getLogger(__name__)

_Stamp = tuple[tuple[int, int], tuple[int, int]]


def _stamp(cfg: Tls) -> _Stamp:
    c, k = os.stat(cfg.cert_file), os.stat(cfg.key_file)
    return (c.st_mtime_ns, c.st_size), (k.st_mtime_ns, k.st_size)


class ReloadingTls:
    """A server ``SSLContext`` for one listener, reloaded from its files when they change."""

    def __init__(self, cfg: Tls, *, name: str) -> None:
        self.cfg = cfg
        self.name = name
        self.reloads = 0
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if cfg.client_ca_file is not None:
            try:
                ctx.load_verify_locations(cafile=str(cfg.client_ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"{name}.tls.client_ca_file {cfg.client_ca_file}: {_why(exc)}"
                ) from None
            ctx.verify_mode = ssl.CERT_REQUIRED if cfg.require_client_cert else ssl.CERT_OPTIONAL
        self.context = ctx
        try:
            self._stamp = _stamp(cfg)
            self._load()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"{name}.tls: cannot load {cfg.cert_file} / {cfg.key_file}: {_why(exc)}"
            ) from None

    def _load(self) -> None:
        self.context.load_cert_chain(str(self.cfg.cert_file), str(self.cfg.key_file))

    def check(self) -> bool:
        """Reload if the files changed since the last load; True if a new pair is in use."""
        try:
            stamp = _stamp(self.cfg)
            if stamp == self._stamp:
                return False
            self._load()
        except (OSError, ssl.SSLError) as exc:
            log.warning(
                "%s TLS certificate not reloaded, the previous one stays in use: %s",
                self.name,
                _why(exc),
            )
            return False
        self._stamp = stamp
        self.reloads += 1
        log.info("%s TLS certificate reloaded from %s", self.name, self.cfg.cert_file)
        return True

    async def run(self) -> None:
        """Check every ``reload_interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.cfg.reload_interval)
            self.check()


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    return str(exc) or type(exc).__name__


def write_self_signed(
    cert_path: Path,
    key_path: Path,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    *,
    days: int = 365,
) -> None:
    """A self-signed server certificate (ECDSA P-256) for ``hosts``; the key file is 0600."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cmek-proxy dev")])
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
