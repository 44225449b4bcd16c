"""pyarrow's own S3 filesystem (the AWS C++ SDK) through the proxy, with Parquet.

pyarrow (26) wrote even a 3.8 MB Parquet file as a multipart upload, so these tests need it.

Reading one column of one row group must fetch only part of the object: the proxy's
``cmek_s3_bytes_out_total`` counter (plaintext bytes sent to clients) tells how much.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from proxy import crypto
from tests.servers import CLIENT_AK, CLIENT_SK, REGION, ProxyThread

fs_mod = pytest.importorskip("pyarrow.fs")

ROWS = 200_000
ROW_GROUP = 25_000
COLUMNS = ("id", "value", "label", "blob")


def bytes_out(proxy: ProxyThread) -> float:
    text = requests.get(f"{proxy.admin}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "cmek_s3_bytes_out_total":
                total += sample.value
    return total


@pytest.fixture
def s3(proxy: ProxyThread) -> Any:
    host = proxy.endpoint.removeprefix("http://")
    return fs_mod.S3FileSystem(
        endpoint_override=host,
        scheme="http",
        access_key=CLIENT_AK,
        secret_key=CLIENT_SK,
        region=REGION,
    )


def _table() -> pa.Table:
    ids = pa.array(range(ROWS), pa.int64())
    values = pa.array([i * 0.5 for i in range(ROWS)], pa.float64())
    labels = pa.array([f"label-{i % 977}" for i in range(ROWS)])
    blobs = pa.array([(i * 2654435761 % 2**32).to_bytes(4, "big") * 8 for i in range(ROWS)])
    return pa.table([ids, values, labels, blobs], names=list(COLUMNS))


def test_parquet_row_group_and_column(
    proxy: ProxyThread, s3: Any, client: Any, direct: Any, bucket: str
) -> None:
    table = _table()
    path = f"{bucket}/data/t.parquet"
    pq.write_table(table, path, filesystem=s3, row_group_size=ROW_GROUP, compression="none")
    size = client.head_object(Bucket=bucket, Key="data/t.parquet")["ContentLength"]
    assert s3.get_file_info(path).size == size
    assert size > 10 * 1024 * 1024
    # pyarrow writes this file as a multipart upload (10 MiB + the rest); parts that are
    # whole segments make the stored size that of one stream of the same length.
    stored = direct.get_object(Bucket=bucket, Key="data/t.parquet")["Body"].read()
    assert len(stored) == crypto.ciphertext_size(size)
    assert b"label-976" not in stored and b"PAR1" not in stored[:4]

    before = bytes_out(proxy)
    with s3.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        assert pf.metadata.num_row_groups == ROWS // ROW_GROUP
        got = pf.read_row_group(3, columns=["value"])
    after = bytes_out(proxy)
    assert (
        got.column("value").to_pylist()
        == table.column("value").to_pylist()[3 * ROW_GROUP : 4 * ROW_GROUP]
    )
    fetched = after - before
    one_chunk = pf.metadata.row_group(3).column(1).total_compressed_size
    assert one_chunk <= fetched < size / 4, (fetched, size)

    whole = pq.read_table(path, filesystem=s3)
    assert whole.equals(table)


def test_file_ops(s3: Any, client: Any, bucket: str) -> None:
    path = f"{bucket}/plain/x.bin"
    payload = bytes(range(256)) * 1000
    with s3.open_output_stream(path) as out:
        out.write(payload)
    info = s3.get_file_info(path)
    assert info.size == len(payload)
    with s3.open_input_file(path) as f:
        f.seek(65530)
        assert f.read(20) == payload[65530:65550]
        assert f.read_at(10, 100) == payload[100:110]
    listed = s3.get_file_info(fs_mod.FileSelector(f"{bucket}/plain", recursive=True))
    assert [(i.path, i.size) for i in listed] == [(path, len(payload))]
    s3.delete_file(path)
    assert s3.get_file_info(path).type == fs_mod.FileType.NotFound
