"""A backend that changes stored bytes or metadata gets errors, never wrong plaintext."""

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
FAILURES = (ClientError, BotoCoreError, Urllib3Error, ConnectionError)
SIDECAR = False  # set per test by the autouse fixture below


CLEAR_CACHE: Any = None


@pytest.fixture(autouse=True)
def _envelope_mode(proxy: Any) -> None:
    global SIDECAR, CLEAR_CACHE
    SIDECAR = proxy.config.backend.envelope_store == "sidecar"
    CLEAR_CACHE = proxy.proxy.envelopes.clear_cache if SIDECAR else None


def _data(n: int, seed: int) -> bytes:
    return hashlib.shake_256(f"tamper-{n}-{seed}".encode()).digest(n)


def _stored(direct: Any, bucket: str, key: str) -> tuple[bytes, dict[str, str], str]:
    """The stored body and envelope (short metadata names), wherever the envelope lives."""
    got = direct.get_object(Bucket=bucket, Key=key)
    body = got["Body"].read()
    meta = {k.lower(): v for k, v in got["Metadata"].items()}
    if SIDECAR and not any(k.startswith("cmek-") for k in meta):
        etag = got["ETag"].strip('"')
        side = direct.get_object(Bucket=bucket, Key=sidecar_prefix(key) + etag)["Body"].read()
        meta = {k.removeprefix("x-amz-meta-"): v for k, v in json.loads(side).items()}
    return body, meta, got.get("ContentType", "")


def _replace(direct: Any, bucket: str, key: str, body: bytes, meta: dict[str, str]) -> None:
    """What a hostile backend operator can do: any body, any envelope, under any name."""
    if not SIDECAR:
        direct.put_object(Bucket=bucket, Key=key, Body=body, Metadata=meta)
        return
    direct.put_object(Bucket=bucket, Key=key, Body=body)
    side = json.dumps({f"x-amz-meta-{k}": v for k, v in meta.items()}).encode()
    etag = hashlib.md5(body).hexdigest()
    direct.put_object(Bucket=bucket, Key=sidecar_prefix(key) + etag, Body=side)
    CLEAR_CACHE()  # envelopes are immutable per ETag, so the proxy caches them for good


def _read_fails(client: Any, bucket: str, key: str, original: bytes, **kw: Any) -> None:
    """The read must fail; if any bytes come back they are a prefix of the truth, never wrong."""
    try:
        body = client.get_object(Bucket=bucket, Key=key, **kw)["Body"].read()
    except FAILURES:
        return
    pytest.fail(f"tampered object was served ({len(body)} bytes, equal={body == original})")


@pytest.fixture
def victim(client: Any, direct: Any, bucket: str) -> tuple[str, bytes, bytes, dict[str, str]]:
    data = _data(3 * S + 777, 1)
    client.put_object(Bucket=bucket, Key="victim", Body=data)
    body, meta, _ = _stored(direct, bucket, "victim")
    return bucket, data, body, meta


# Offsets inside a stored segment: header fields, ciphertext, tag.
REGIONS = {
    "version": 0,
    "flags": 1,
    "part": 2,
    "index": 4,
    "random": 10,
    "ciphertext": 16 + 500,
    "tag": STORED - 1,
}


@pytest.mark.parametrize("segment", [0, 1, 3])
@pytest.mark.parametrize("region", sorted(REGIONS))
def test_flipped_bit_in_body(
    client: Any,
    direct: Any,
    victim: tuple[str, bytes, bytes, dict[str, str]],
    segment: int,
    region: str,
) -> None:
    bucket, data, body, meta = victim
    offset = segment * STORED + REGIONS[region]
    if segment == 3 and region == "tag":
        offset = len(body) - 1
    tampered = bytearray(body)
    tampered[offset] ^= 0x10
    _replace(direct, bucket, "victim", bytes(tampered), meta)
    _read_fails(client, bucket, "victim", data)
    # A range read of the damaged segment fails too.
    start = segment * S
    _read_fails(client, bucket, "victim", data, Range=f"bytes={start}-{start + 10}")


@pytest.mark.parametrize("field", ["cmek-v", "cmek-dk", "cmek-ok", "cmek-layout", "cmek-kek"])
def test_flipped_metadata(
    client: Any, direct: Any, victim: tuple[str, bytes, bytes, dict[str, str]], field: str
) -> None:
    bucket, data, body, meta = victim
    meta = {k.lower(): v for k, v in meta.items()}
    value = meta[field]
    if field == "cmek-layout":
        meta[field] = "m" if value == "s" else "s"
    elif field == "cmek-v":
        meta[field] = "2"
    else:
        i = len(value) // 2
        meta[field] = value[:i] + ("A" if value[i] != "A" else "B") + value[i + 1 :]
    _replace(direct, bucket, "victim", body, meta)
    _read_fails(client, bucket, "victim", data)


@pytest.mark.parametrize("cut", ["last-segment", "mid-segment", "one-byte", "append", "append-seg"])
def test_truncated_or_extended(
    client: Any, direct: Any, victim: tuple[str, bytes, bytes, dict[str, str]], cut: str
) -> None:
    bucket, data, body, meta = victim
    changed = {
        "last-segment": body[: 3 * STORED],
        "mid-segment": body[: 2 * STORED + 5000],
        "one-byte": body[:-1],
        "append": body + b"\0" * 40,
        "append-seg": body + body[:STORED],
    }[cut]
    _replace(direct, bucket, "victim", changed, meta)
    _read_fails(client, bucket, "victim", data)
    if cut == "last-segment":
        # Reading the segment before the cut must not pretend the object ends there.
        _read_fails(client, bucket, "victim", data, Range=f"bytes={2 * S}-")


def test_segments_swapped_or_duplicated(
    client: Any, direct: Any, victim: tuple[str, bytes, bytes, dict[str, str]]
) -> None:
    bucket, data, body, meta = victim
    seg = [body[i : i + STORED] for i in range(0, len(body), STORED)]
    _replace(direct, bucket, "victim", seg[1] + seg[0] + seg[2] + seg[3], meta)
    _read_fails(client, bucket, "victim", data)
    _replace(direct, bucket, "victim", seg[0] + seg[0] + seg[2] + seg[3], meta)
    _read_fails(client, bucket, "victim", data, Range=f"bytes={S}-{S + 9}")


def test_bodies_and_metadata_swapped_between_objects(client: Any, direct: Any, bucket: str) -> None:
    a, b = _data(2 * S + 1, 2), _data(2 * S + 1, 3)
    client.put_object(Bucket=bucket, Key="a", Body=a)
    client.put_object(Bucket=bucket, Key="b", Body=b)
    body_a, meta_a, _ = _stored(direct, bucket, "a")
    body_b, meta_b, _ = _stored(direct, bucket, "b")
    # b's body under a's metadata: wrong object key.
    _replace(direct, bucket, "a", body_b, meta_a)
    _read_fails(client, bucket, "a", a)
    # b's whole stored object (body and metadata) moved to the name "a": the seal is bound to "b".
    _replace(direct, bucket, "a", body_b, meta_b)
    _read_fails(client, bucket, "a", b)
    # A splice: a's first segment followed by b's second.
    _replace(direct, bucket, "a", body_a[:STORED] + body_b[STORED:], meta_a)
    _read_fails(client, bucket, "a", a)


def test_integrity_failures_are_counted(
    proxy: Any, client: Any, direct: Any, victim: tuple[str, bytes, bytes, dict[str, str]]
) -> None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    def failures() -> float:
        text = urllib.request.urlopen(f"{proxy.admin}/metrics").read().decode()
        for fam in text_string_to_metric_families(text):
            if fam.name == "cmek_integrity_failures":
                return sum(s.value for s in fam.samples if s.name.endswith("_total"))
        return 0.0

    bucket, data, body, meta = victim
    before = failures()
    tampered = bytearray(body)
    tampered[20] ^= 1
    _replace(direct, bucket, "victim", bytes(tampered), meta)
    _read_fails(client, bucket, "victim", data)
    assert failures() > before


@pytest.mark.parametrize("size", [0, 100, 3 * S + 777])
@pytest.mark.parametrize("multipart", [False, True])
def test_stripped_envelope_is_an_error_never_plaintext(
    client: Any, direct: Any, bucket: str, size: int, multipart: bool
) -> None:
    """A backend that drops the envelope (metadata stripped, sidecar lost) turns ciphertext
    into an error that says the envelope is missing, never a 200 with the raw ciphertext."""
    data = _data(size, 7)
    if multipart:
        part = _data(5 * 1024 * 1024, 8)
        up = client.create_multipart_upload(Bucket=bucket, Key="bare")["UploadId"]
        etags = [
            client.upload_part(Bucket=bucket, Key="bare", UploadId=up, PartNumber=n, Body=b)["ETag"]
            for n, b in ((1, part), (2, data))
        ]
        client.complete_multipart_upload(
            Bucket=bucket,
            Key="bare",
            UploadId=up,
            MultipartUpload={
                "Parts": [{"PartNumber": n + 1, "ETag": e} for n, e in enumerate(etags)]
            },
        )
        data = part + data
    else:
        client.put_object(Bucket=bucket, Key="bare", Body=data)
    body, _, _ = _stored(direct, bucket, "bare")
    direct.put_object(Bucket=bucket, Key="bare", Body=body)  # same bytes, no metadata
    if SIDECAR:  # the sidecar lost
        listed = direct.list_objects_v2(Bucket=bucket, Prefix=sidecar_prefix("bare"))
        for obj in listed.get("Contents", []):
            direct.delete_object(Bucket=bucket, Key=obj["Key"])
        CLEAR_CACHE()
    for kw in ({}, {"Range": "bytes=0-10"}, {"Range": f"bytes={max(len(data) - 5, 0)}-"}):
        if not data and kw:
            continue
        with pytest.raises(ClientError) as ei:
            client.get_object(Bucket=bucket, Key="bare", **kw)["Body"].read()
        assert ei.value.response["Error"]["Code"] == "InternalError"
        assert "envelope" in ei.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as ei:
        client.head_object(Bucket=bucket, Key="bare")
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    # Plaintext that only has a size a v1 body could have is still served as legacy.
    plain = _data(len(body), 9)
    direct.put_object(Bucket=bucket, Key="legacy", Body=plain)
    if not SIDECAR:
        assert client.get_object(Bucket=bucket, Key="legacy")["Body"].read() == plain
