"""The AWS JS SDK v3 (``@aws-sdk/client-s3`` from npm) through the proxy.

The SDK's default checksums: a buffer body carries ``x-amz-checksum-crc32`` as a header, a
stream body is sent aws-chunked with the CRC32 in a trailer (even over plain http).
``npm ci`` installs the locked SDK (tests/js/package-lock.json) once into pytest's cache
directory (a session temp directory under ``-p no:cacheprovider``); without node/npm or
without a reachable npm registry the test is skipped.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import zlib
from pathlib import Path
from typing import Any

import pytest

from proxy import crypto
from tests.servers import CLIENT_AK, CLIENT_SK, REGION, ProxyThread

JS_DIR = Path(__file__).parent / "js"
FILES = ("package.json", "package-lock.json", "roundtrip.mjs")


@pytest.fixture(scope="session")
def js_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the AWS JS SDK test")
    lock = (JS_DIR / "package-lock.json").read_bytes()
    name = "js-client-" + hashlib.sha256(lock).hexdigest()[:12]
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    target = Path(cache.mkdir(name)) if cache is not None else tmp_path_factory.mktemp(name)
    for name in FILES:
        shutil.copyfile(JS_DIR / name, target / name)
    if not (target / "node_modules" / "@aws-sdk" / "client-s3" / "package.json").exists():
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=target,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"npm ci failed (no npm registry?): {done.stderr[-500:]}")
    return target


def test_put_get_with_checksums(
    js_dir: Path, proxy: ProxyThread, client: Any, direct: Any, bucket: str, tmp_path: Path
) -> None:
    data = hashlib.shake_256(b"js-sdk").digest(300_000)
    src = tmp_path / "data.bin"
    src.write_bytes(data)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "AWS_ACCESS_KEY_ID": CLIENT_AK,
        "AWS_SECRET_ACCESS_KEY": CLIENT_SK,
        "AWS_REGION": REGION,
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    done = subprocess.run(
        ["node", str(js_dir / "roundtrip.mjs"), proxy.endpoint, bucket, str(src)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)

    crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    buffer_put, stream_put = out["sent"]
    assert buffer_put["crc32Header"] == crc and buffer_put["contentEncoding"] is None
    assert stream_put["contentSha256"] == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    assert stream_put["contentEncoding"] == "aws-chunked"
    assert stream_put["trailer"] == "x-amz-checksum-crc32"
    assert out["putBuffer"]["crc32"] == crc and out["putStream"]["crc32"] == crc
    assert out["putBuffer"]["sse"] == "aws:kms"

    digest = hashlib.sha256(data).hexdigest()
    for key in ("js/buffer.bin", "js/stream.bin"):
        got = out[key]
        assert got["sha256"] == digest and got["length"] == len(data)
        assert got["contentLength"] == len(data) and got["etag"].endswith('-c"')
        assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == data
        stored = direct.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert len(stored) == crypto.ciphertext_size(len(data)) and data[:32] not in stored
    assert out["range"]["hex"] == data[65530:65550].hex()
    assert out["range"]["contentRange"] == f"bytes 65530-65549/{len(data)}"
    sizes = {o["Key"]: o["Size"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert sizes == {"js/buffer.bin": len(data), "js/stream.bin": len(data)}
