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
from typing import Any

import pytest
from botocore.exceptions import BotoCoreError, ClientError
from urllib3.exceptions import HTTPError as Urllib3Error

from proxy import crypto
from proxy.layer.envelopes import sidecar_prefix

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
        etag = got["ETag"].strip('"')
        record = direct.get_object(Bucket=bucket, Key=sidecar_prefix(key) + etag)
        self.envelope: bytes = record["Body"].read()


@pytest.fixture
def mp_object(proxy: Any, client: Any, direct: Any, bucket: str) -> tuple[Any, str, bytes, Stored]:
    parts = [_data(PART, 1), _data(PART, 2), _data(1000, 3)]
    up = client.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
    etags = [
        client.upload_part(Bucket=bucket, Key="mp", UploadId=up, PartNumber=n, Body=p)["ETag"]
        for n, p in enumerate(parts, 1)
    ]
    client.complete_multipart_upload(
        Bucket=bucket,
        Key="mp",
        UploadId=up,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]},
    )
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
    etag = direct.head_object(Bucket=bucket, Key="mp")["ETag"].strip('"')
    direct.put_object(Bucket=bucket, Key=sidecar_prefix("mp") + etag, Body=stored.envelope)
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
