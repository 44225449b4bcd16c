"""Key lifecycle jobs end to end on moto and rclone: verify, encrypt-existing, rewrap."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy import crypto
from proxy.config import Config
from proxy.control.jobs.common import TMP_PREFIX, JobOptions, JobProgress
from proxy.control.jobs.standalone import run_standalone
from proxy.layer.envelopes import sidecar_prefix
from tests.servers import ProxyThread, Server, new_keyfile, proxy_config, wait_until


def run(config: Config, kind: str, bucket: str, **opts: Any) -> JobProgress:
    return asyncio.run(run_standalone(config, kind, JobOptions(bucket=bucket, **opts)))


def new_bucket(direct: Any, name: str) -> str:
    bucket = f"{name}-{time.monotonic_ns()}"
    direct.create_bucket(Bucket=bucket)
    return bucket


def meta(direct: Any, bucket: str, key: str) -> dict[str, str]:
    """Stored user metadata, names lower-cased (rclone answers them capitalised)."""
    head = direct.head_object(Bucket=bucket, Key=key)
    return {k.lower(): v for k, v in head["Metadata"].items()}


def with_store(config: Config, store: str) -> Config:
    backend = config.backend.model_copy(update={"envelope_store": store})
    return config.model_copy(update={"backend": backend})


def envelope_of(config: Config, direct: Any, bucket: str, key: str) -> dict[str, str]:
    """The stored envelope's metadata names (from the object, or its sidecar)."""
    if config.backend.envelope_store == "metadata":
        return meta(direct, bucket, key)
    etag = direct.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    side = direct.get_object(Bucket=bucket, Key=sidecar_prefix(key) + etag)["Body"].read()
    return {k.lower().removeprefix("x-amz-meta-"): v for k, v in json.loads(side).items()}


def stored(direct: Any, bucket: str, key: str) -> bytes:
    data: bytes = direct.get_object(Bucket=bucket, Key=key)["Body"].read()
    return data


def test_verify_counts_per_key_and_finds_damage(
    backend: Server, direct: Any, keyfile: Path, proxy: ProxyThread, client: Any
) -> None:
    bucket = new_bucket(direct, "verify")
    for i, size in enumerate((0, 1000, 200_000)):
        client.put_object(Bucket=bucket, Key=f"enc/{i}", Body=os.urandom(size))
    direct.put_object(Bucket=bucket, Key="legacy.txt", Body=b"written before the proxy")
    # damage one object's stored bytes, keeping its envelope
    head = direct.head_object(Bucket=bucket, Key="enc/2")
    body = bytearray(stored(direct, bucket, "enc/2"))
    body[100] ^= 1
    put = direct.put_object(Bucket=bucket, Key="enc/2", Body=bytes(body), Metadata=head["Metadata"])
    if proxy.config.backend.envelope_store == "sidecar":  # the envelope is named by the ETag
        old, new = head["ETag"].strip('"'), put["ETag"].strip('"')
        side = direct.get_object(Bucket=bucket, Key=sidecar_prefix("enc/2") + old)["Body"].read()
        direct.put_object(Bucket=bucket, Key=sidecar_prefix("enc/2") + new, Body=side)

    prog = run(proxy.config, "verify", bucket, concurrency=3)
    assert prog.outcomes["ok"] == 2
    assert prog.outcomes["plaintext-legacy"] == 1
    assert prog.outcomes["error:IntegrityError"] == 1
    key = f"local://{keyfile}"
    assert sum(v for k, v in prog.by_key.items() if k.startswith(key) and "error" not in k) == 2
    assert any("error:IntegrityError" in k for k in prog.by_key)
    assert prog.errors[0]["key"] == "enc/2"
    assert "verify" in prog.summary() and "enc/2" in prog.summary()
    # a sample checks a subset, chosen by the key
    assert run(proxy.config, "verify", bucket, sample=0.0).objects == 0


def _plain_objects(direct: Any, bucket: str, n: int, size: int) -> dict[str, bytes]:
    objs = {f"data/{i:03d}": os.urandom(size + i) for i in range(n)}
    for k, v in objs.items():
        direct.put_object(Bucket=bucket, Key=k, Body=v, ContentType="application/x-test")
    return objs


@pytest.mark.parametrize("store", ["metadata", "sidecar"])
def test_encrypt_existing_in_place_keeps_properties(
    backend: Server, direct: Any, keyfile: Path, store: str
) -> None:
    config = proxy_config(
        backend.url,
        keyfile,
        encryption={"default": {"key": f"local://{keyfile}"}, "unencrypted_paths": ["*/cache/**"]},
    )
    config = with_store(config, store)
    bucket = new_bucket(direct, "encex")
    body = os.urandom(300_000)
    direct.put_object(
        Bucket=bucket,
        Key="doc.bin",
        Body=body,
        ContentType="application/pdf",
        CacheControl="max-age=60",
        ContentDisposition='attachment; filename="doc.bin"',
        Metadata={"owner": "alice"},
    )
    direct.put_object(Bucket=bucket, Key="cache/tmp.bin", Body=b"short-lived")
    direct.put_object(Bucket=bucket, Key="empty", Body=b"")

    dry = run(config, "encrypt-existing", bucket, dry_run=True)
    assert dry.outcomes["would-encrypt"] == 2
    assert dry.outcomes["skipped-unencrypted-path"] == 1
    assert stored(direct, bucket, "doc.bin") == body

    done = run(config, "encrypt-existing", bucket, concurrency=2)
    assert done.outcomes["encrypted"] == 2, done.summary()
    raw = stored(direct, bucket, "doc.bin")
    assert raw != body and len(raw) == crypto.ciphertext_size(len(body))
    assert stored(direct, bucket, "cache/tmp.bin") == b"short-lived"
    listing = direct.list_objects_v2(Bucket=bucket, Prefix=".cmek-proxy/")
    leftovers = [o["Key"] for o in listing.get("Contents", []) if o["Key"].startswith(TMP_PREFIX)]
    assert leftovers == []  # a job leaves nothing behind (an rb of the bucket works)

    with ProxyThread(config) as p:
        c = p.client()
        got = c.get_object(Bucket=bucket, Key="doc.bin")
        assert got["Body"].read() == body
        assert got["ContentType"] == "application/pdf"
        assert got["CacheControl"] == "max-age=60"
        assert got["ContentDisposition"] == 'attachment; filename="doc.bin"'
        assert got["Metadata"] == {"owner": "alice"}
        assert got["SSEKMSKeyId"] == f"local://{keyfile}"
        assert c.get_object(Bucket=bucket, Key="empty")["Body"].read() == b""

    again = run(config, "encrypt-existing", bucket)
    assert again.outcomes["already"] == 2 and "encrypted" not in again.outcomes


def _write_config(config: Config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
    return path


def test_encrypt_existing_killed_halfway_and_rerun(
    backend: Server, direct: Any, keyfile: Path, tmp_path: Path
) -> None:
    config = proxy_config(backend.url, keyfile)
    bucket = new_bucket(direct, "killed")
    objs = _plain_objects(direct, bucket, 40, 1_000_000)
    cfg = _write_config(config, tmp_path / "config.yaml")
    log = (tmp_path / "job.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy.cli",
            "job",
            "encrypt-existing",
            "--config",
            str(cfg),
            "--bucket",
            bucket,
            "--concurrency",
            "1",
            "--no-progress",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def some_encrypted() -> bool:
            if proc.poll() is not None:
                return True  # finished early: fail at once below, not after the timeout
            try:
                return "cmek-v" in envelope_of(config, direct, bucket, "data/000")
            except direct.exceptions.ClientError:
                return False  # sidecar not there yet

        try:
            wait_until(some_encrypted, 120, "the first object encrypted")
        except TimeoutError:
            raise AssertionError((tmp_path / "job.log").read_text()[-3000:]) from None
        assert proc.poll() is None, "the job finished before it could be killed"
        proc.kill()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        log.close()

    rerun = run(config, "encrypt-existing", bucket, concurrency=4)
    assert rerun.outcomes["already"] >= 1
    assert rerun.outcomes["already"] + rerun.outcomes["encrypted"] == len(objs), rerun.to_json()
    assert "error" not in rerun.outcomes
    listing = direct.list_objects_v2(Bucket=bucket, Prefix=TMP_PREFIX)
    assert [o["Key"] for o in listing.get("Contents", [])] == []
    with ProxyThread(config) as p:
        c = p.client()
        for k, v in objs.items():
            got = c.get_object(Bucket=bucket, Key=k)
            assert hashlib.sha256(got["Body"].read()).digest() == hashlib.sha256(v).digest(), k
            assert got["ContentType"] == "application/x-test"
    assert run(config, "verify", bucket).outcomes["ok"] == len(objs)


@pytest.mark.parametrize("store", ["metadata", "sidecar"])
def test_rewrap_then_the_old_key_is_disabled(
    backend: Server, direct: Any, tmp_path: Path, store: str
) -> None:
    old = new_keyfile(tmp_path / "old.json")
    new = new_keyfile(tmp_path / "new.json")
    old_uri, new_uri = f"local://{old}", f"local://{new}"
    bucket = new_bucket(direct, "rewrap")
    objs = {f"o/{i}": os.urandom(n) for i, n in enumerate((0, 10, 65_536, 300_000))}
    with ProxyThread(with_store(proxy_config(backend.url, old), store)) as p:
        c = p.client()
        for k, v in objs.items():
            c.put_object(Bucket=bucket, Key=k, Body=v, Metadata={"n": k}, ContentType="text/x-n")
        big = os.urandom(5 * 1024 * 1024 + 123)
        up = c.create_multipart_upload(Bucket=bucket, Key="multi")
        parts = []
        for n, chunk in enumerate((big[: 5 * 1024 * 1024], big[5 * 1024 * 1024 :]), start=1):
            r = c.upload_part(
                Bucket=bucket, Key="multi", UploadId=up["UploadId"], PartNumber=n, Body=chunk
            )
            parts.append({"PartNumber": n, "ETag": r["ETag"]})
        c.complete_multipart_upload(
            Bucket=bucket, Key="multi", UploadId=up["UploadId"], MultipartUpload={"Parts": parts}
        )
        objs["multi"] = big
    before = {k: stored(direct, bucket, k) for k in objs}

    config = with_store(proxy_config(backend.url, old), store)
    dry = run(config, "rewrap", bucket, target_key=new_uri, dry_run=True)
    assert dry.outcomes["would-rewrap"] == len(objs)
    assert envelope_of(config, direct, bucket, "o/1")["cmek-kek"] == old_uri

    done = run(config, "rewrap", bucket, target_key=new_uri, concurrency=3)
    assert done.outcomes["rewrapped"] == len(objs), done.to_json()
    for k in objs:
        assert envelope_of(config, direct, bucket, k)["cmek-kek"] == new_uri
        assert stored(direct, bucket, k) == before[k], "object data must not be rewritten"
    assert run(config, "rewrap", bucket, target_key=new_uri).outcomes["already"] == len(objs)

    old.unlink()  # the old key is gone for good
    new_config = with_store(proxy_config(backend.url, new), store)
    with ProxyThread(new_config) as p:
        c = p.client()
        for k, v in objs.items():
            got = c.get_object(Bucket=bucket, Key=k)
            assert got["Body"].read() == v, k
            assert got["SSEKMSKeyId"] == new_uri
            if k != "multi":
                assert got["Metadata"] == {"n": k} and got["ContentType"] == "text/x-n"
    check = run(new_config, "verify", bucket)
    assert check.outcomes["ok"] == len(objs)
    assert set(check.by_key) == {k for k in check.by_key if k.startswith(new_uri)}


@pytest.mark.parametrize("kind", ["rewrap", "encrypt-existing", "verify"])
def test_cli_job_dry_run_prints_a_summary(
    backend: Server, direct: Any, keyfile: Path, tmp_path: Path, kind: str
) -> None:
    bucket = new_bucket(direct, "cli")
    _plain_objects(direct, bucket, 3, 10)
    cfg = _write_config(proxy_config(backend.url, keyfile), tmp_path / "c.yaml")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy.cli",
            "job",
            kind,
            "--config",
            str(cfg),
            "--bucket",
            bucket,
            "--dry-run",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert f"{kind} s3://{bucket}/ (dry run): 3 objects" in out


def test_encrypt_existing_loses_no_concurrent_client_write(
    backend: Server, direct: Any, keyfile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client writes the object between the job's check and its replace: the client wins."""
    from proxy.layer import envelopes

    config = proxy_config(backend.url, keyfile)  # sidecar envelopes on rclone, metadata on moto
    store = config.backend.envelope_store
    bucket = new_bucket(direct, "race")
    original = os.urandom(100_000)
    direct.put_object(Bucket=bucket, Key="hot", Body=original)
    newer = os.urandom(50_000)

    with ProxyThread(config) as p:
        client = p.client()
        cls = envelopes.SidecarEnvelopes if store == "sidecar" else envelopes.MetadataEnvelopes
        real = cls.before_commit

        fired: list[bool] = []

        async def racing(self: Any, bucket_: str, key: str, env: Any, md5: str) -> None:
            if key == "hot" and not fired:  # the job's call (the proxy's own comes nested)
                fired.append(True)  # the client's write lands right before the job replaces
                await asyncio.to_thread(client.put_object, Bucket=bucket, Key="hot", Body=newer)
            await real(self, bucket_, key, env, md5)

        monkeypatch.setattr(cls, "before_commit", racing)
        done = run(config, "encrypt-existing", bucket)
        monkeypatch.setattr(cls, "before_commit", real)
        assert done.outcomes.get("conflict") == 1, done.summary()
        assert "encrypted" not in done.outcomes
        assert client.get_object(Bucket=bucket, Key="hot")["Body"].read() == newer
    if store == "sidecar":  # the job's envelope for the replacement that lost goes too
        current = direct.head_object(Bucket=bucket, Key="hot")["ETag"].strip('"')
        listing = direct.list_objects_v2(Bucket=bucket, Prefix=sidecar_prefix("hot"))
        assert [o["Key"] for o in listing.get("Contents", [])] == [sidecar_prefix("hot") + current]
