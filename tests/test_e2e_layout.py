"""Issue 10 point 5 end to end: a hostile backend that rearranges a multipart object's parts
or segments gets errors on full and ranged reads, never plaintext from the wrong position.

Completed multipart objects carry a v2 envelope with their part layout (docs/FORMAT.md
section 5.1). The backend operator here rewrites the stored body and re-files the object's
completed envelope under the new body's ETag, as it can; nothing it does reopens the
object with bytes out of place. On moto and ceph (metadata store: the completed envelope is
kept by ETag, the object's metadata holds the upload's pending one) and rclone (sidecar).
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from botocore.exceptions import BotoCoreError, ClientError
from urllib3.exceptions import HTTPError as Urllib3Error

from proxy import crypto
from proxy.layer.envelopes import current_names, sidecar_prefix
from proxy.layer.uploads import STATE_PREFIX, UploadState
from tests.servers import Server
from tests.test_jobs import run

S = crypto.SEGMENT_SIZE
STORED = crypto.STORED_SEGMENT_SIZE
MiB = 1024 * 1024
PART = 5 * MiB
PART_STORED = crypto.ciphertext_size(PART)
FAILURES = (ClientError, BotoCoreError, Urllib3Error, ConnectionError)


def _data(n: int, seed: int) -> bytes:
    return hashlib.shake_256(f"layout-{n}-{seed}".encode()).digest(n)


class Stored:
    """A completed multipart object as the backend holds it."""

    def __init__(self, direct: Any, bucket: str, key: str) -> None:
        got = direct.get_object(Bucket=bucket, Key=key)
        self.body: bytes = got["Body"].read()
        self.metadata: dict[str, str] = dict(got["Metadata"])
        self.name = record_name(direct, bucket, key)
        record = direct.get_object(Bucket=bucket, Key=sidecar_prefix(key) + self.name)
        self.envelope: bytes = record["Body"].read()


def record_name(direct: Any, bucket: str, key: str) -> str:
    """The name the completed envelope of the object now at ``key`` is filed under: its
    upload's (metadata store), or its ETag (sidecar store)."""
    head = direct.head_object(Bucket=bucket, Key=key)
    headers = {"x-amz-meta-" + k: v for k, v in head["Metadata"].items()}
    return current_names({**headers, "etag": head["ETag"]})[-1]


def _send_parts(client: Any, bucket: str, key: str, up: str, parts: list[bytes]) -> None:
    """Upload ``parts`` as parts 1..n of upload ``up`` and complete it."""
    etags = [
        client.upload_part(Bucket=bucket, Key=key, UploadId=up, PartNumber=n, Body=p)["ETag"]
        for n, p in enumerate(parts, 1)
    ]
    client.complete_multipart_upload(
        Bucket=bucket,
        Key=key,
        UploadId=up,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]},
    )


@pytest.fixture
def mp_object(proxy: Any, client: Any, direct: Any, bucket: str) -> tuple[Any, str, bytes, Stored]:
    parts = [_data(PART, 1), _data(PART, 2), _data(1000, 3)]
    up = client.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
    _send_parts(client, bucket, "mp", up, parts)
    stored = Stored(direct, bucket, "mp")
    env = json.loads(stored.envelope)
    assert env["x-amz-meta-cmek-v"] == "2"
    assert env["x-amz-meta-cmek-parts"] == "1-2:80,3-3:1"
    if proxy.config.backend.envelope_store == "metadata":
        assert stored.metadata["cmek-layout"] == "p"  # the upload's, never read with
    return proxy, bucket, b"".join(parts), stored


def _rewrite(proxy: Any, direct: Any, bucket: str, stored: Stored, body: bytes) -> None:
    """The hostile backend: another body under the same name, metadata and envelope."""
    direct.put_object(Bucket=bucket, Key="mp", Body=body, Metadata=stored.metadata)
    name = record_name(direct, bucket, "mp")
    direct.put_object(Bucket=bucket, Key=sidecar_prefix("mp") + name, Body=stored.envelope)
    proxy.proxy.envelopes.clear_cache()


def _fails(client: Any, bucket: str, **kw: Any) -> None:
    try:
        body = client.get_object(Bucket=bucket, Key="mp", **kw)["Body"].read()
    except FAILURES:
        return
    pytest.fail(f"rearranged object was served ({len(body)} bytes)")


def test_untouched_object_reads_in_any_range(
    mp_object: tuple[Any, str, bytes, Stored], client: Any
) -> None:
    _, bucket, data, _ = mp_object
    assert client.get_object(Bucket=bucket, Key="mp")["Body"].read() == data
    for start, end in ((0, 10), (PART - 5, PART + 5), (2 * PART - 1, 2 * PART + 999)):
        got = client.get_object(Bucket=bucket, Key="mp", Range=f"bytes={start}-{end}")
        assert got["Body"].read() == data[start : end + 1]


def test_parts_reordered(
    mp_object: tuple[Any, str, bytes, Stored], client: Any, direct: Any
) -> None:
    proxy, bucket, _, stored = mp_object
    b = stored.body
    p1, p2, p3 = b[:PART_STORED], b[PART_STORED : 2 * PART_STORED], b[2 * PART_STORED :]
    _rewrite(proxy, direct, bucket, stored, p2 + p1 + p3)
    _fails(client, bucket)
    _fails(client, bucket, Range="bytes=0-10")
    _fails(client, bucket, Range=f"bytes={PART}-{PART + 10}")


def test_segment_copied_over_the_next(
    mp_object: tuple[Any, str, bytes, Stored], client: Any, direct: Any
) -> None:
    proxy, bucket, _, stored = mp_object
    b = stored.body
    _rewrite(proxy, direct, bucket, stored, b[:STORED] + b[:STORED] + b[2 * STORED :])
    _fails(client, bucket, Range=f"bytes={S}-{S + 10}")
    _fails(client, bucket)


def test_part_stored_twice(
    mp_object: tuple[Any, str, bytes, Stored], client: Any, direct: Any
) -> None:
    proxy, bucket, _, stored = mp_object
    b = stored.body
    p1, p3 = b[:PART_STORED], b[2 * PART_STORED :]
    _rewrite(proxy, direct, bucket, stored, p1 + p1 + p3)
    _fails(client, bucket, Range=f"bytes={PART}-{PART + 10}")
    _fails(client, bucket)


def test_last_part_dropped(
    mp_object: tuple[Any, str, bytes, Stored], client: Any, direct: Any
) -> None:
    proxy, bucket, _, stored = mp_object
    _rewrite(proxy, direct, bucket, stored, stored.body[: 2 * PART_STORED])
    _fails(client, bucket)  # no longer served as a shorter object
    _fails(client, bucket, Range="bytes=0-10")


def test_pending_envelope_filed_as_the_completed_one(
    mp_object: tuple[Any, str, bytes, Stored], client: Any, direct: Any
) -> None:
    """The upload's envelope (which every part was written under) never opens the object:
    there is no unbound reading to fall back to."""
    proxy, bucket, _, stored = mp_object
    env = json.loads(stored.envelope)
    env["x-amz-meta-cmek-layout"] = "p"
    del env["x-amz-meta-cmek-parts"]
    forged = Stored.__new__(Stored)
    forged.metadata, forged.envelope = stored.metadata, json.dumps(env).encode()
    p1, p2 = stored.body[:PART_STORED], stored.body[PART_STORED : 2 * PART_STORED]
    _rewrite(proxy, direct, bucket, forged, p2 + p1 + stored.body[2 * PART_STORED :])
    _fails(client, bucket, Range="bytes=0-10")
    env["x-amz-meta-cmek-v"], env["x-amz-meta-cmek-layout"] = "1", "m"  # v1 multipart
    forged.envelope = json.dumps(env).encode()
    _rewrite(proxy, direct, bucket, forged, p2 + p1 + stored.body[2 * PART_STORED :])
    _fails(client, bucket, Range="bytes=0-10")


def test_completed_envelope_left_by_an_overwrite_goes_with_gc(
    mp_object: tuple[Any, str, bytes, Stored], client: Any, direct: Any
) -> None:
    """Metadata store: a PUT or DELETE over a multipart object leaves its completed envelope
    (no extra request on those paths); ``gc`` removes it, and keeps the live ones."""
    proxy, bucket, data, _ = mp_object
    etag = direct.head_object(Bucket=bucket, Key="mp")["ETag"].strip('"')
    client.copy_object(Bucket=bucket, Key="mp2", CopySource={"Bucket": bucket, "Key": "mp"})
    assert client.get_object(Bucket=bucket, Key="mp2")["Body"].read() == data
    client.put_object(Bucket=bucket, Key="mp", Body=b"small now")
    config = proxy.config
    done = run(config, "gc", bucket, min_age=0)
    left = direct.list_objects_v2(Bucket=bucket, Prefix=sidecar_prefix("mp")).get("Contents", [])
    if proxy.config.backend.envelope_store == "metadata":
        assert done.outcomes["removed-envelope"] == 1
        assert left == []
    else:
        assert [o["Key"] for o in left] == [
            sidecar_prefix("mp") + direct.head_object(Bucket=bucket, Key="mp")["ETag"].strip('"')
        ]
    assert etag not in str(left)
    assert client.get_object(Bucket=bucket, Key="mp")["Body"].read() == b"small now"
    assert client.get_object(Bucket=bucket, Key="mp2")["Body"].read() == data
    ranged = client.get_object(Bucket=bucket, Key="mp2", Range=f"bytes={PART}-{PART + 9}")
    assert ranged["Body"].read() == data[PART : PART + 10]
    assert run(config, "verify", bucket).outcomes["ok"] == 2


def test_v1_multipart_objects_still_read(proxy: Any, client: Any, direct: Any, bucket: str) -> None:
    """A multipart object written before format v2 (v1 envelope, layout ``m``) reads in full
    and in ranges, on both stores."""
    uri = proxy.config.encryption.default.key
    dk = proxy.call(proxy.proxy.keys.data_key_for_write(uri, bucket))
    object_key = crypto.new_object_key()
    parts = [_data(PART, 7), _data(1234, 8)]
    body = b"".join(crypto.encrypt_all(object_key, p, n) for n, p in enumerate(parts, 1))
    sealed = crypto.seal_object_key(
        dk.plaintext, object_key, crypto.Binding(bucket, "old", multipart=True)
    )
    env = crypto.Envelope(
        kek_uri=dk.kek_uri or uri,
        kek_version=dk.key_version,
        wrapped_data_key=dk.wrapped,
        sealed_object_key=sealed,
        multipart=True,
    )
    meta = crypto.to_metadata(env)
    assert meta["x-amz-meta-cmek-v"] == "1"
    if proxy.config.backend.envelope_store == "metadata":
        direct.put_object(
            Bucket=bucket,
            Key="old",
            Body=body,
            Metadata={k.removeprefix("x-amz-meta-"): v for k, v in meta.items()},
        )
    else:
        direct.put_object(Bucket=bucket, Key="old", Body=body)
        etag = direct.head_object(Bucket=bucket, Key="old")["ETag"].strip('"')
        side = json.dumps({**meta, "key": "old"}).encode()
        direct.put_object(Bucket=bucket, Key=sidecar_prefix("old") + etag, Body=side)
    data = b"".join(parts)
    assert client.get_object(Bucket=bucket, Key="old")["Body"].read() == data
    got = client.get_object(Bucket=bucket, Key="old", Range=f"bytes={PART - 3}-{PART + 3}")
    assert got["Body"].read() == data[PART - 3 : PART + 4]
    assert client.head_object(Bucket=bucket, Key="old")["ContentLength"] == len(data)


def test_upload_created_by_a_v1_proxy_completes(
    proxy: Any, client: Any, direct: Any, bucket: str
) -> None:
    """An upload a proxy of format v1 created (v1 envelope in its state and, with the
    metadata store, in the backend upload) completes and reads after the upgrade."""
    uri = proxy.config.encryption.default.key
    dk = proxy.call(proxy.proxy.keys.data_key_for_write(uri, bucket))
    sealed = crypto.seal_object_key(
        dk.plaintext, crypto.new_object_key(), crypto.Binding(bucket, "up", multipart=True)
    )
    env = crypto.Envelope(
        kek_uri=dk.kek_uri or uri,
        kek_version=dk.key_version,
        wrapped_data_key=dk.wrapped,
        sealed_object_key=sealed,
        multipart=True,
    )
    meta: dict[str, str] = {}
    if proxy.config.backend.envelope_store == "metadata":
        meta = {k.removeprefix("x-amz-meta-"): v for k, v in crypto.to_metadata(env).items()}
    up = direct.create_multipart_upload(Bucket=bucket, Key="up", Metadata=meta)["UploadId"]
    state = UploadState(bucket, "up", env)
    direct.put_object(Bucket=bucket, Key=STATE_PREFIX + up, Body=state.to_json())
    parts = [_data(PART, 11), _data(77, 12)]
    _send_parts(client, bucket, "up", up, parts)
    data = b"".join(parts)
    assert client.get_object(Bucket=bucket, Key="up")["Body"].read() == data
    got = client.get_object(Bucket=bucket, Key="up", Range=f"bytes={PART - 2}-{PART + 2}")
    assert got["Body"].read() == data[PART - 2 : PART + 3]


def test_racing_completes_leave_the_key_readable(client: Any, bucket: str) -> None:
    """Two uploads of one key completed at once: whichever the backend kept, the key reads as
    it (each Complete files its envelope under the ETag of the object it made, never under
    the other one's)."""
    for r in range(8):
        bodies = [_data(70_000 + i, 100 * r + i) for i in range(2)]
        ups = [
            client.create_multipart_upload(Bucket=bucket, Key="race")["UploadId"] for _ in bodies
        ]
        etags = [
            client.upload_part(Bucket=bucket, Key="race", UploadId=u, PartNumber=1, Body=b)["ETag"]
            for u, b in zip(ups, bodies, strict=True)
        ]

        def complete(up: str, etag: str) -> bool:
            try:
                client.complete_multipart_upload(
                    Bucket=bucket,
                    Key="race",
                    UploadId=up,
                    MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]},
                )
            except ClientError as exc:  # rclone refuses some racing Completes with a 500
                assert exc.response["ResponseMetadata"]["HTTPStatusCode"] >= 500
                return False
            return True

        with ThreadPoolExecutor(2) as pool:
            assert any(pool.map(complete, ups, etags))
        assert client.get_object(Bucket=bucket, Key="race")["Body"].read() in bodies, r


def _metadata_store(proxy: Any) -> None:
    if proxy.config.backend.envelope_store != "metadata":
        pytest.skip("the sidecar store files every envelope under its object's ETag")


def test_complete_reads_nothing_back(proxy: Any, client: Any, bucket: str, backend: Server) -> None:
    """Metadata store: the completed envelope is named after the upload and written before
    the backend's Complete (and again after), so a Complete never reads the object it made:
    ``rclone serve s3`` hashes the whole object to answer its first HEAD. It reads at once."""
    _metadata_store(proxy)
    parts = [_data(PART, 11), _data(500, 12)]
    up = client.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
    etags = [
        client.upload_part(Bucket=bucket, Key="mp", UploadId=up, PartNumber=n, Body=p)["ETag"]
        for n, p in enumerate(parts, 1)
    ]
    bc = proxy.proxy.jobs.backend
    real = bc.request
    seen: list[tuple[str, str | None, bool]] = []

    async def spy(
        method: str, bucket_: str | None = None, key: str | None = None, **kw: Any
    ) -> Any:
        seen.append((method, key, bool(kw.get("query"))))  # ListParts is a GET with a query
        return await real(method, bucket_, key, **kw)

    bc.request = spy
    try:
        client.complete_multipart_upload(
            Bucket=bucket,
            Key="mp",
            UploadId=up,
            MultipartUpload={
                "Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]
            },
        )
    finally:
        del bc.request
    reads = [s[0] for s in seen if s[1] == "mp" and s[0] in ("HEAD", "GET") and not s[2]]
    # Ceph RGW answers the Complete with an empty <ETag>: one HEAD for the client's answer
    assert reads == (["HEAD"] if backend.name == "ceph" else []), seen
    # ListParts, the envelope, the Complete, the envelope again, the upload's state
    assert len(seen) == 5 + len(reads), seen
    proxy.proxy.envelopes.clear_cache()
    assert client.get_object(Bucket=bucket, Key="mp")["Body"].read() == b"".join(parts)


def test_completed_envelope_of_an_earlier_version_still_reads(
    mp_object: tuple[Any, str, bytes, Stored], client: Any, direct: Any
) -> None:
    """Metadata store: objects completed before the envelope was named after the upload have
    it under their ETag; they read as before."""
    proxy, bucket, data, stored = mp_object
    _metadata_store(proxy)
    etag = direct.head_object(Bucket=bucket, Key="mp")["ETag"].strip('"')
    direct.put_object(Bucket=bucket, Key=sidecar_prefix("mp") + etag, Body=stored.envelope)
    direct.delete_object(Bucket=bucket, Key=sidecar_prefix("mp") + stored.name)
    proxy.proxy.envelopes.clear_cache()
    assert client.get_object(Bucket=bucket, Key="mp")["Body"].read() == data
    got = client.get_object(Bucket=bucket, Key="mp", Range=f"bytes={PART - 2}-{PART + 2}")
    assert got["Body"].read() == data[PART - 2 : PART + 3]


def test_prune_and_gc_keep_the_current_upload_envelope(
    mp_object: tuple[Any, str, bytes, Stored], client: Any, direct: Any
) -> None:
    """A prune (a copy or rewrite of the key, racing this Complete) that deletes the envelope
    of the object now current puts it back; ``gc`` counts it live."""
    proxy, bucket, data, stored = mp_object
    _metadata_store(proxy)
    layouts = proxy.proxy.envelopes.layouts
    assert proxy.call(layouts.prune(bucket, "mp", None, None)) == 1
    got = direct.get_object(Bucket=bucket, Key=sidecar_prefix("mp") + stored.name)
    assert got["Body"].read() == stored.envelope
    done = run(proxy.config, "gc", bucket, min_age=0)
    assert done.outcomes["envelope-live"] == 1
    assert "removed-envelope" not in done.outcomes
    proxy.proxy.envelopes.clear_cache()
    assert client.get_object(Bucket=bucket, Key="mp")["Body"].read() == data
