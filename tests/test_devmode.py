"""`cmek-proxy dev` from a clean directory: nothing to configure, restartable, ciphertext stored."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
from botocore.config import Config as BotoConfig

from proxy.cli import build_parser
from proxy.config import load_config
from tests.servers import free_port, http_ok, wait_until


def _start(data_dir: Path, port: int, admin_port: int | None = None) -> subprocess.Popen[bytes]:
    admin = str(admin_port or free_port())  # the default 8081 may be taken on a shared machine
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy",
            "dev",
            "--port",
            str(port),
            "--admin-port",
            admin,
            "--data-dir",
            str(data_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    wait_until(
        lambda: (data_dir / "dev.env").exists() and http_ok(f"http://127.0.0.1:{port}/"),
        60,
        "cmek-proxy dev",
    )
    return proc


def _env(data_dir: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (data_dir / "dev.env").read_text().splitlines())
    return {k: v for k, v in pairs}


def _client(env: dict[str, str]) -> object:
    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
        config=BotoConfig(s3={"addressing_style": "path"}),
    )


def _stop(proc: subprocess.Popen[bytes]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


def _rclone_pids(data_dir: Path) -> list[str]:
    res = subprocess.run(["pgrep", "-f", f"serve s3 .*{data_dir}"], capture_output=True, text=True)
    return res.stdout.split()


def test_dev_mode_round_trip_restart_and_cleanup(tmp_path: Path) -> None:
    data_dir = tmp_path / "dev"
    port = free_port()
    proc = _start(data_dir, port)
    try:
        env = _env(data_dir)
        assert set(env) >= {
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            "CMEK_ADMIN_URL",
        }
        assert env["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{port}"
        assert stat.S_IMODE(os.stat(data_dir / "keys.json").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(data_dir / "dev.env").st_mode) == 0o600
        health = urllib.request.urlopen(env["CMEK_ADMIN_URL"] + "/healthz").read()
        assert b"ok" in health
        ready = urllib.request.urlopen(env["CMEK_ADMIN_URL"] + "/readyz")
        assert ready.status == 200
        s3 = _client(env)
        secret = b"patient record 42 " * 1000
        s3.create_bucket(Bucket="demo")  # type: ignore[attr-defined]
        s3.put_object(Bucket="demo", Key="records/note.txt", Body=secret)  # type: ignore[attr-defined]
        on_disk = (data_dir / "backend" / "demo" / "records" / "note.txt").read_bytes()
        assert b"patient record" not in on_disk and len(on_disk) > len(secret)
        assert _rclone_pids(data_dir)
    finally:
        out = _stop(proc)
    assert "S3 endpoint" in out and "AWS_SECRET_ACCESS_KEY" in out
    wait_until(lambda: not _rclone_pids(data_dir), 10, "backend exit")

    proc = _start(data_dir, port, int(env["CMEK_ADMIN_URL"].rsplit(":", 1)[1]))
    try:
        s3 = _client(_env(data_dir))
        got = s3.get_object(Bucket="demo", Key="records/note.txt")  # type: ignore[attr-defined]
        assert got["Body"].read() == secret
        assert _env(data_dir)["CMEK_ADMIN_TOKEN"] == env["CMEK_ADMIN_TOKEN"], "token kept"
    finally:
        _stop(proc)
    time.sleep(0.2)
    assert not _rclone_pids(data_dir)


def _admin(env: dict[str, str], path: str, token: str | None) -> tuple[int, bytes]:
    req = urllib.request.Request(env["CMEK_ADMIN_URL"] + path)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_dev_mode_has_the_admin_api_and_a_config_for_jobs(tmp_path: Path) -> None:
    data_dir = tmp_path / "dev"
    data_dir.mkdir()
    # a data directory made by an older version: secrets without an admin token
    (data_dir / "dev-secrets.json").write_text(
        json.dumps(
            {
                "client_access_key": "CMEKDEVOLD",
                "client_secret_key": "old-secret-key-123",
                "backend_access_key": "BACKENDOLD",
                "backend_secret_key": "old-backend-secret",
            }
        )
    )
    port = free_port()
    proc = _start(data_dir, port)
    try:
        env = _env(data_dir)
        token = env["CMEK_ADMIN_TOKEN"]
        assert len(token) >= 32 and env["AWS_ACCESS_KEY_ID"] == "CMEKDEVOLD"
        assert _admin(env, "/v1/encryptionSpecs", None)[0] == 401
        status, body = _admin(env, "/v1/encryptionSpecs", token)
        assert status == 200, body
        assert json.loads(body) == {"encryption_specs": []}  # the config's default only
        assert stat.S_IMODE(os.stat(data_dir / "dev-secrets.json").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(data_dir / "config.yaml").st_mode) == 0o600
        config = load_config(data_dir / "config.yaml", environ={})
        assert config.admin.token == token and config.specs.control_bucket == "cmek-control"
        s3 = _client(env)
        s3.create_bucket(Bucket="jobs")  # type: ignore[attr-defined]
        s3.put_object(Bucket="jobs", Key="a", Body=b"x" * 1000)  # type: ignore[attr-defined]
        job = subprocess.run(
            [
                sys.executable,
                "-m",
                "proxy.cli",
                "job",
                "verify",
                "--config",
                str(data_dir / "config.yaml"),
                "--bucket",
                "jobs",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert json.loads(job.stdout)["outcomes"] == {"ok": 1}, job.stderr
    finally:
        _stop(proc)


def test_dev_defaults_are_the_documented_ports() -> None:
    args = build_parser().parse_args(["dev"])
    assert (args.port, args.admin_port, args.data_dir) == (8080, 8081, ".cmek-dev")
