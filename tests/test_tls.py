"""TLS on both listeners: real clients over https, certificate rotation, admin client certs."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig

from proxy.app import start
from proxy.errors import ConfigError
from proxy.wire.tls import write_self_signed
from tests.servers import (
    CLIENT_AK,
    CLIENT_SK,
    REGION,
    ProxyThread,
    Server,
    free_port,
    proxy_config,
    wait_until,
)
from tests.tlsutil import Ca

AWS = Path("/usr/bin/aws")
MiB = 1024 * 1024


def _tls(cert: Path, key: Path, **more: Any) -> dict[str, Any]:
    return {"cert_file": str(cert), "key_file": str(key), "reload_interval": 0.05, **more}


@pytest.fixture
def server_cert(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    write_self_signed(cert, key)
    return cert, key


@pytest.fixture
def tls_proxy(moto: Server, keyfile: Path, server_cert: tuple[Path, Path]) -> Iterator[ProxyThread]:
    cert, key = server_cert
    config = proxy_config(
        moto.url,
        keyfile,
        listen={"host": "127.0.0.1", "port": 0, "tls": _tls(cert, key)},
        admin={"host": "127.0.0.1", "port": 0, "tls": _tls(cert, key)},
    )
    with ProxyThread(config) as p:
        yield p


def _boto(endpoint: str, ca: Path) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=CLIENT_AK,
        aws_secret_access_key=CLIENT_SK,
        region_name=REGION,
        verify=str(ca),
        config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def _served_cert(port: int) -> bytes:
    """The DER certificate a new handshake presents (not verified: we compare it)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        ctx.wrap_socket(sock) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def _der(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


def test_boto3_over_https_aws_chunked_with_trailers(
    tls_proxy: ProxyThread, server_cert: tuple[Path, Path]
) -> None:
    cert, _ = server_cert
    assert tls_proxy.endpoint.startswith("https://")
    s3 = _boto(tls_proxy.endpoint, cert)
    sent: list[dict[str, str]] = []
    s3.meta.events.register(
        "before-send.s3.*",
        lambda request, **_: sent.append({k.lower(): v for k, v in request.headers.items()}),
    )
    s3.create_bucket(Bucket="tls-boto")
    body = os.urandom(3 * MiB + 5)
    s3.put_object(Bucket="tls-boto", Key="one", Body=body)
    put = sent[-1]
    # over https boto3 streams the body unsigned, aws-chunked, with the checksum in a trailer
    assert put["x-amz-content-sha256"] == b"STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    assert b"aws-chunked" in put["content-encoding"]
    assert put["x-amz-trailer"].startswith(b"x-amz-checksum-")
    assert s3.get_object(Bucket="tls-boto", Key="one")["Body"].read() == body
    big = os.urandom(11 * MiB)
    s3.upload_fileobj(
        io.BytesIO(big),
        "tls-boto",
        "multi",
        Config=TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB),
    )
    got = io.BytesIO()
    s3.download_fileobj("tls-boto", "multi", got)
    assert got.getvalue() == big
    # the admin listener is https too, with the same certificate
    assert requests.get(tls_proxy.admin + "/healthz", verify=str(cert), timeout=10).ok
    # plain HTTP to the TLS port gets nothing readable
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(tls_proxy.endpoint.replace("https://", "http://") + "/", timeout=10)


@pytest.mark.skipif(not AWS.exists(), reason="AWS CLI v2 not installed at /usr/bin/aws")
def test_aws_cli_over_https_with_ca_bundle(
    tls_proxy: ProxyThread, server_cert: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, _ = server_cert
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "AWS_ACCESS_KEY_ID": CLIENT_AK,
        "AWS_SECRET_ACCESS_KEY": CLIENT_SK,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_PAGER": "",
        "AWS_CA_BUNDLE": str(cert),
    }

    def aws(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(AWS), "--endpoint-url", tls_proxy.endpoint, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    src = tmp_path / "src.bin"
    src.write_bytes(hashlib.shake_256(b"tls-cli").digest(9 * MiB))  # multipart in the CLI
    assert aws("s3", "mb", "s3://tls-cli").returncode == 0
    up = aws("s3", "cp", str(src), "s3://tls-cli/f.bin")
    assert up.returncode == 0, up.stderr
    down = aws("s3", "cp", "s3://tls-cli/f.bin", str(tmp_path / "back.bin"))
    assert down.returncode == 0, down.stderr
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    # without the CA bundle the CLI refuses the self-signed certificate
    del env["AWS_CA_BUNDLE"]
    refused = aws("s3", "ls", "s3://tls-cli")
    assert refused.returncode != 0 and "SSL" in refused.stderr


def test_certificate_rotation_without_restart(
    tls_proxy: ProxyThread, server_cert: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = server_cert
    assert tls_proxy.running is not None
    port = tls_proxy.running.s3_port
    assert _served_cert(port) == _der(cert)
    old_client = _boto(tls_proxy.endpoint, cert)
    old_client.create_bucket(Bucket="tls-rotate")
    # the operator writes the new pair next to the old one and renames it into place
    new_cert, new_key = tmp_path / "new.pem", tmp_path / "new.key"
    write_self_signed(new_cert, new_key)
    os.replace(new_key, key)
    os.replace(new_cert, cert)
    wait_until(lambda: _served_cert(port) == _der(cert), 30, "rotated certificate served")
    assert tls_proxy.running.tls[0] is not None and tls_proxy.running.tls[0].reloads >= 1
    s3 = _boto(tls_proxy.endpoint, cert)
    s3.put_object(Bucket="tls-rotate", Key="after", Body=b"new cert")
    assert s3.get_object(Bucket="tls-rotate", Key="after")["Body"].read() == b"new cert"
    # a broken pair (key of another certificate) is not loaded: the last good one serves
    served = _served_cert(port)
    other_cert, other_key = tmp_path / "other.pem", tmp_path / "other.key"
    write_self_signed(other_cert, other_key)
    shutil.copy(other_key, key)
    tls = tls_proxy.running.tls[0]
    assert tls is not None
    assert tls_proxy.call(asyncio.to_thread(tls.check)) is False
    assert _served_cert(port) == served
    assert s3.head_object(Bucket="tls-rotate", Key="after")["ContentLength"] == 8


def test_admin_client_certificates(moto: Server, keyfile: Path, tmp_path: Path) -> None:
    ca = Ca(tmp_path, "admin-ca")
    server = ca.issue("server")
    good = ca.issue("monitor", client=True)
    stranger = Ca(tmp_path, "other-ca").issue("stranger", client=True)
    config = proxy_config(
        moto.url,
        keyfile,
        admin={
            "host": "127.0.0.1",
            "port": 0,
            "tls": _tls(
                server.cert, server.key, client_ca_file=str(ca.path), require_client_cert=True
            ),
        },
    )
    with ProxyThread(config) as p:
        url = p.admin + "/healthz"
        ok = requests.get(url, verify=str(ca.path), cert=(str(good.cert), str(good.key)), timeout=9)
        assert ok.json() == {"status": "ok"}
        for cert in (None, (str(stranger.cert), str(stranger.key))):
            with pytest.raises(requests.exceptions.RequestException):
                requests.get(url, verify=str(ca.path), cert=cert, timeout=9).raise_for_status()
        # the S3 listener is untouched by the admin listener's settings
        assert p.endpoint.startswith("http://")


def test_bad_certificate_files_are_a_configuration_error(
    moto: Server, keyfile: Path, tmp_path: Path
) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    config = proxy_config(
        moto.url, keyfile, listen={"host": "127.0.0.1", "port": 0, "tls": _tls(cert, key)}
    )
    with pytest.raises(ConfigError, match=r"listen\.tls.*c\.pem"):
        asyncio.run(start(config))
    write_self_signed(cert, key)
    key.write_text("not a key")
    with pytest.raises(ConfigError, match=r"listen\.tls"):
        asyncio.run(start(config))
    with pytest.raises(ConfigError, match="admin listener"):
        proxy_config(
            moto.url,
            keyfile,
            listen={"port": 0, "tls": _tls(cert, key, client_ca_file=str(cert))},
        )
    with pytest.raises(ConfigError, match="require_client_cert needs client_ca_file"):
        proxy_config(
            moto.url, keyfile, admin={"port": 0, "tls": _tls(cert, key, require_client_cert=True)}
        )


def test_dev_mode_with_tls(tmp_path: Path) -> None:
    data_dir = tmp_path / "dev"
    port = free_port()
    argv = [sys.executable, "-m", "proxy", "dev", "--tls", "--port", str(port)]
    proc = subprocess.Popen(
        [*argv, "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: (data_dir / "dev.env").exists(), 60, "cmek-proxy dev --tls")
        env = dict(line.split("=", 1) for line in (data_dir / "dev.env").read_text().splitlines())
        assert env["AWS_ENDPOINT_URL"] == f"https://127.0.0.1:{port}"
        assert env["CMEK_ADMIN_URL"].startswith("https://")
        ca = Path(env["AWS_CA_BUNDLE"])
        assert ca.exists()
        s3 = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
            verify=str(ca),
            config=BotoConfig(s3={"addressing_style": "path"}),
        )
        s3.create_bucket(Bucket="demo")
        s3.put_object(Bucket="demo", Key="k", Body=b"over tls " * 100)
        assert s3.get_object(Bucket="demo", Key="k")["Body"].read() == b"over tls " * 100
        assert requests.get(env["CMEK_ADMIN_URL"] + "/healthz", verify=str(ca), timeout=10).ok
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out.decode(errors="replace")
    assert f"https://127.0.0.1:{port}" in out.decode()


def test_plain_http_beyond_loopback_is_warned_about(
    moto: Server, keyfile: Path, server_cert: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = server_cert
    plain = proxy_config(moto.url, keyfile, listen={"host": "0.0.0.0", "port": 0})
    with caplog.at_level(logging.WARNING, logger="proxy.app"), ProxyThread(plain):
        pass
    assert any("decrypted objects cross the network" in r.getMessage() for r in caplog.records)
    caplog.clear()
    tls = proxy_config(
        moto.url, keyfile, listen={"host": "0.0.0.0", "port": 0, "tls": _tls(cert, key)}
    )
    loopback = proxy_config(moto.url, keyfile)
    with caplog.at_level(logging.WARNING, logger="proxy.app"):
        with ProxyThread(tls):
            pass
        with ProxyThread(loopback):
            pass
    assert not any("cross the network" in r.getMessage() for r in caplog.records)
