"""Multipart uploads through the proxy with boto3 (default settings) on moto and rclone."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from proxy import crypto
from tests.servers import ProxyThread, Server, proxy_config, stored_envelope
from tests.test_e2e_core import _code, _data

S = crypto.SEGMENT_SIZE
MiB = 1024 * 1024


def _upload(
    client: Any,
    bucket: str,
    key: str,
    parts: list[bytes],
    *,
    shuffle: bool = False,
    parallel: bool = False,
    **create: Any,
) -> dict[str, Any]:
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, **create)["UploadId"]
    order = list(range(len(parts)))
    if shuffle:
        random.Random(len(parts)).shuffle(order)

    def send(i: int) -> dict[str, Any]:
        res = client.upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=i + 1, Body=parts[i]
        )
        out = {"PartNumber": i + 1, "ETag": res["ETag"]}
        for name in ("ChecksumCRC32", "ChecksumCRC32C", "ChecksumSHA256", "ChecksumCRC64NVME"):
            if name in res:
                out[name] = res[name]
        return out

    if parallel:
        with ThreadPoolExecutor(4) as pool:
            done = list(pool.map(send, order))
    else:
        done = [send(i) for i in order]
    done.sort(key=lambda p: p["PartNumber"])
    res: dict[str, Any] = client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": done}
    )
    return res


def _meta(head: dict[str, Any]) -> dict[str, str]:
    """User metadata with lower-case names (rclone capitalises them after multipart)."""
    return {k.lower(): v for k, v in head["Metadata"].items()}


def _check_object(client: Any, bucket: str, key: str, data: bytes, etag: str) -> None:
    got = client.get_object(Bucket=bucket, Key=key)
    assert got["Body"].read() == data
    assert got["ETag"] == etag
    assert got["ServerSideEncryption"] == "aws:kms"
    head = client.head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == len(data) and head["ETag"] == etag
    entry = next(o for o in client.list_objects_v2(Bucket=bucket)["Contents"] if o["Key"] == key)
    assert entry["Size"] == len(data) and entry["ETag"] == etag


@pytest.mark.parametrize(
    "sizes",
    [[5 * MiB, 5 * MiB, 1000], [8 * MiB, 3 * MiB], [12345], [0]],
    ids=["5MiB", "8MiB", "one-part", "empty"],
)
def test_aligned_parts_in_random_order_and_parallel(
    client: Any, direct: Any, bucket: str, sizes: list[int]
) -> None:
    parts = [_data(n, i) for i, n in enumerate(sizes)]
    data = b"".join(parts)
    res = _upload(client, bucket, "mp", parts, shuffle=True, parallel=True)
    _check_object(client, bucket, "mp", data, res["ETag"])
    stored = direct.head_object(Bucket=bucket, Key="mp")
    assert stored_envelope(direct, bucket, "mp")["cmek-layout"] == "m"
    assert stored["ContentLength"] == sum(crypto.ciphertext_size(n) for n in sizes)
    # the upload's state object stays, marked done (a repeated Complete answers the same; a
    # collector removes it by its done_at), and is never listed to clients
    keys = [o["Key"] for o in direct.list_objects_v2(Bucket=bucket).get("Contents", [])]
    states = [k for k in keys if k.startswith(".cmek-proxy/uploads/")]
    assert [k for k in keys if not k.startswith((".cmek-proxy/env/", *states))] == ["mp"]
    assert len(states) == 1
    assert "done_at" in json.loads(direct.get_object(Bucket=bucket, Key=states[0])["Body"].read())
    assert [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]] == ["mp"]


def test_non_aligned_parts_are_realigned(client: Any, direct: Any, bucket: str) -> None:
    sizes = [5 * MiB + 1, 5 * MiB + 1, 777]
    parts = [_data(n, 10 + i) for i, n in enumerate(sizes)]
    data = b"".join(parts)
    res = _upload(
        client,
        bucket,
        "odd",
        parts,
        shuffle=True,
        ContentType="text/x-odd",
        Metadata={"colour": "red"},
    )
    _check_object(client, bucket, "odd", data, res["ETag"])
    stored = direct.head_object(Bucket=bucket, Key="odd")
    assert stored["ContentLength"] == crypto.ciphertext_size(len(data))
    head = client.head_object(Bucket=bucket, Key="odd")
    assert head["ContentType"] == "text/x-odd" and head["Metadata"] == {"colour": "red"}
    got = client.get_object(Bucket=bucket, Key="odd", Range=f"bytes={5 * MiB - 5}-{5 * MiB + 5}")
    assert got["Body"].read() == data[5 * MiB - 5 : 5 * MiB + 6]


def test_non_aligned_above_single_put_limit_goes_multipart(
    client: Any, direct: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.layer import rewrite

    monkeypatch.setattr(rewrite, "MAX_SINGLE_PUT", 6 * MiB)
    monkeypatch.setattr(rewrite, "WRITE_PART_SIZE", 5 * MiB)
    parts = [_data(5 * MiB + 3, 20), _data(2 * MiB, 21)]
    data = b"".join(parts)
    res = _upload(client, bucket, "big", parts)
    _check_object(client, bucket, "big", data, res["ETag"])
    assert stored_envelope(direct, bucket, "big")["cmek-layout"] == "m"


def test_abort_and_no_such_upload(client: Any, direct: Any, bucket: str) -> None:
    upload_id = client.create_multipart_upload(Bucket=bucket, Key="a")["UploadId"]
    client.upload_part(Bucket=bucket, Key="a", UploadId=upload_id, PartNumber=1, Body=b"x" * 100)
    uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["UploadId"] for u in uploads] == [upload_id]
    client.abort_multipart_upload(Bucket=bucket, Key="a", UploadId=upload_id)
    assert direct.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    with pytest.raises(ClientError) as ei:
        client.upload_part(Bucket=bucket, Key="a", UploadId=upload_id, PartNumber=2, Body=b"y")
    assert _code(ei.value) == "NoSuchUpload"
    with pytest.raises(ClientError) as ei:
        client.list_parts(Bucket=bucket, Key="a", UploadId="nonexistent-id")
    assert _code(ei.value) == "NoSuchUpload"
    other = client.create_multipart_upload(Bucket=bucket, Key="b")["UploadId"]
    with pytest.raises(ClientError) as ei:  # an upload id is bound to its key
        client.upload_part(Bucket=bucket, Key="c", UploadId=other, PartNumber=1, Body=b"z")
    assert _code(ei.value) == "NoSuchUpload"
    client.abort_multipart_upload(Bucket=bucket, Key="b", UploadId=other)


def test_list_parts_shows_plaintext_sizes(client: Any, bucket: str) -> None:
    upload_id = client.create_multipart_upload(Bucket=bucket, Key="lp")["UploadId"]
    etags = {}
    for n, size in ((1, 5 * MiB), (2, 1234), (3, 70_000)):
        etags[n] = client.upload_part(
            Bucket=bucket, Key="lp", UploadId=upload_id, PartNumber=n, Body=_data(size, n)
        )["ETag"]
    parts = client.list_parts(Bucket=bucket, Key="lp", UploadId=upload_id)["Parts"]
    assert [(p["PartNumber"], p["Size"], p["ETag"]) for p in parts] == [
        (1, 5 * MiB, etags[1]),
        (2, 1234, etags[2]),
        (3, 70_000, etags[3]),
    ]
    page = client.list_parts(Bucket=bucket, Key="lp", UploadId=upload_id, MaxParts=2)
    assert len(page["Parts"]) == 2 and page["IsTruncated"]
    client.abort_multipart_upload(Bucket=bucket, Key="lp", UploadId=upload_id)


def test_complete_errors(client: Any, bucket: str) -> None:
    upload_id = client.create_multipart_upload(Bucket=bucket, Key="e")["UploadId"]
    e1 = client.upload_part(
        Bucket=bucket, Key="e", UploadId=upload_id, PartNumber=1, Body=_data(1000, 1)
    )["ETag"]
    e2 = client.upload_part(
        Bucket=bucket, Key="e", UploadId=upload_id, PartNumber=2, Body=_data(1000, 2)
    )["ETag"]

    def complete(parts: list[dict[str, Any]]) -> str:
        with pytest.raises(ClientError) as ei:
            client.complete_multipart_upload(
                Bucket=bucket, Key="e", UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        return _code(ei.value)

    assert complete([{"PartNumber": 2, "ETag": e2}, {"PartNumber": 1, "ETag": e1}]) == (
        "InvalidPartOrder"
    )
    assert complete([{"PartNumber": 1, "ETag": e1}, {"PartNumber": 3, "ETag": e2}]) == (
        "InvalidPart"
    )
    assert complete([{"PartNumber": 1, "ETag": e2}]) == "InvalidPart"
    assert complete([{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}]) == (
        "EntityTooSmall"
    )
    client.abort_multipart_upload(Bucket=bucket, Key="e", UploadId=upload_id)


def test_malformed_complete_xml(proxy: ProxyThread, client: Any, bucket: str) -> None:
    upload_id = client.create_multipart_upload(Bucket=bucket, Key="x")["UploadId"]
    with pytest.raises(ClientError) as ei:
        client.complete_multipart_upload(
            Bucket=bucket, Key="x", UploadId=upload_id, MultipartUpload={"Parts": []}
        )
    assert _code(ei.value) == "MalformedXML"
    client.abort_multipart_upload(Bucket=bucket, Key="x", UploadId=upload_id)


def test_upload_file_high_level(client: Any, bucket: str, tmp_path: Path) -> None:
    data = _data(17 * MiB + 5, 30)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    client.upload_file(str(src), bucket, "hl")
    dst = tmp_path / "dst.bin"
    client.download_file(bucket, "hl", str(dst))
    assert dst.read_bytes() == data


def test_two_proxies_alternate_parts(
    backend: Server, keyfile: Path, client: Any, bucket: str
) -> None:
    with ProxyThread(proxy_config(backend.url, keyfile)) as second:
        other = second.client()
        clients = [client, other]
        parts = [_data(5 * MiB, 40 + i) for i in range(3)] + [_data(4321, 43)]
        upload_id = client.create_multipart_upload(Bucket=bucket, Key="lb")["UploadId"]
        done = []
        for i, part in enumerate(parts):
            res = clients[i % 2].upload_part(
                Bucket=bucket, Key="lb", UploadId=upload_id, PartNumber=i + 1, Body=part
            )
            done.append({"PartNumber": i + 1, "ETag": res["ETag"]})
        listed = other.list_parts(Bucket=bucket, Key="lb", UploadId=upload_id)["Parts"]
        assert [p["ETag"] for p in listed] == [p["ETag"] for p in done]
        res = other.complete_multipart_upload(
            Bucket=bucket, Key="lb", UploadId=upload_id, MultipartUpload={"Parts": done}
        )
        data = b"".join(parts)
        _check_object(client, bucket, "lb", data, res["ETag"])
        _check_object(other, bucket, "lb", data, res["ETag"])


def test_range_reads_across_part_boundaries(client: Any, bucket: str) -> None:
    parts = [_data(5 * MiB, 50), _data(5 * MiB, 51), _data(100_000, 52)]
    data = b"".join(parts)
    _upload(client, bucket, "rr", parts)
    b = 5 * MiB
    for a, z in ((b - 1, b), (b - S - 3, b + S + 3), (2 * b - 10, 2 * b + 99_999), (0, 0)):
        got = client.get_object(Bucket=bucket, Key="rr", Range=f"bytes={a}-{z}")
        assert got["Body"].read() == data[a : z + 1], (a, z)
        assert got["ContentRange"] == f"bytes {a}-{z}/{len(data)}"
    got = client.get_object(Bucket=bucket, Key="rr", Range="bytes=-70000")
    assert got["Body"].read() == data[-70000:]


def test_part_number_reads(client: Any, bucket: str) -> None:
    parts = [_data(5 * MiB, 60), _data(8 * MiB, 61), _data(5 * MiB, 62), _data(70_001, 63)]
    data = b"".join(parts)
    _upload(client, bucket, "pn", parts, parallel=True)
    offset = 0
    for i, part in enumerate(parts, start=1):
        got = client.get_object(Bucket=bucket, Key="pn", PartNumber=i)
        assert got["Body"].read() == part, i
        end = offset + len(part) - 1
        assert got["ContentRange"] == f"bytes {offset}-{end}/{len(data)}"
        assert got["PartsCount"] == len(parts)
        head = client.head_object(Bucket=bucket, Key="pn", PartNumber=i)
        assert head["ContentLength"] == len(part) and head["PartsCount"] == len(parts)
        assert head["ContentRange"] == got["ContentRange"]
        offset += len(part)
    with pytest.raises(ClientError) as ei:
        client.get_object(Bucket=bucket, Key="pn", PartNumber=5)
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 416
    client.put_object(Bucket=bucket, Key="single", Body=_data(1000, 64))
    got = client.get_object(Bucket=bucket, Key="single", PartNumber=1)
    assert got["Body"].read() == _data(1000, 64) and got["PartsCount"] == 1
