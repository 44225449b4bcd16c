"""CopyObject and UploadPartCopy racing writers that overwrite the source (issue 10, point 3).

moto and rclone ignore ``x-amz-copy-source-if-match``, so a copy can copy bytes of another
version than the one whose envelope the proxy read. Every acknowledged copy must still open and
equal one of the versions written; a copy that fails leaves nothing that does not open.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import pytest
from botocore.exceptions import ClientError

from proxy.layer import copy
from tests.servers import ProxyThread

MiB = 1024 * 1024
ROUNDS = 24


def _version(i: int, size: int) -> bytes:
    return hashlib.shake_256(f"race-{i}".encode()).digest(size)


def _opens_as_a_version(client: Any, bucket: str, key: str, versions: set[bytes]) -> None:
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        assert exc.response["Error"]["Code"] == "NoSuchKey", exc.response["Error"]
        return
    assert body in versions, f"{key} reads as {len(body)} bytes that were never written"


def _clean_failure(exc: ClientError) -> bool:
    """An error that is not a broken object: a 4xx, or moto failing under concurrent writes
    of one key (its own race: "I/O operation on closed file"), relayed as a backend failure."""
    err = exc.response["Error"]
    status = exc.response["ResponseMetadata"]["HTTPStatusCode"]
    return status < 500 or err.get("Message") == "the backend object store failed"


def _race(proxy: ProxyThread, bucket: str, mode: str, size: int, rounds: int) -> None:
    writer, copier, reader = proxy.client(), proxy.client(), proxy.client()
    versions = {_version(i, size) for i in range(rounds + 1)}
    writer.put_object(Bucket=bucket, Key="src", Body=_version(0, size))
    acked: list[str] = []
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for i in range(1, rounds + 1):
                try:
                    writer.put_object(Bucket=bucket, Key="src", Body=_version(i, size))
                except ClientError as exc:
                    if not _clean_failure(exc):
                        raise
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    try:
        for i in range(rounds):
            dst = "src" if mode == "self" else f"dst{i}"
            src = {"Bucket": bucket, "Key": "src"}
            try:
                if mode == "part":
                    up = copier.create_multipart_upload(Bucket=bucket, Key=dst)["UploadId"]
                    etag = copier.upload_part_copy(
                        Bucket=bucket, Key=dst, UploadId=up, PartNumber=1, CopySource=src
                    )["CopyPartResult"]["ETag"]
                    copier.complete_multipart_upload(
                        Bucket=bucket,
                        Key=dst,
                        UploadId=up,
                        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]},
                    )
                else:
                    copier.copy_object(
                        Bucket=bucket,
                        Key=dst,
                        CopySource=src,
                        MetadataDirective="REPLACE",
                        Metadata={"round": str(i)},
                    )
            except ClientError as exc:  # a clean failure is allowed, a broken copy is not
                assert _clean_failure(exc), exc.response["Error"]
            else:
                acked.append(dst)
            _opens_as_a_version(reader, bucket, dst, versions)
    finally:
        thread.join(300)
    assert not errors, errors
    assert acked, "no copy was acknowledged"
    for dst in {*acked, "src"}:
        _opens_as_a_version(reader, bucket, dst, versions)


@pytest.mark.parametrize("mode", ["other", "self", "part"])
def test_copies_racing_overwrites_of_their_source_open(
    proxy: ProxyThread, bucket: str, mode: str
) -> None:
    # A broken self-copy lasts only until the next overwrite: more rounds to catch one.
    _race(proxy, bucket, mode, 3 * 65536 + 99, ROUNDS * 5 // 2 if mode == "self" else ROUNDS)


def test_backend_multipart_copy_racing_overwrites_opens(
    proxy: ProxyThread, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above MAX_SINGLE_COPY the reseal copies ciphertext ranges part by part."""
    monkeypatch.setattr(copy, "MAX_SINGLE_COPY", 5 * MiB)
    monkeypatch.setattr(copy, "COPY_PART_SIZE", 5 * MiB)
    _race(proxy, bucket, "other", 5 * MiB + 1000, 6)
