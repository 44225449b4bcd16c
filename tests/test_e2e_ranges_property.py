"""Property: any range of any object, read through the proxy, equals the plaintext slice."""

from __future__ import annotations

import hashlib
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import crypto

S = crypto.SEGMENT_SIZE
SIZES = [0, 1, 100, S - 1, S, S + 1, 2 * S + 17, 4 * S]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_random_ranges(client: Any, bucket: str, data: st.DataObject) -> None:
    size = data.draw(st.sampled_from(SIZES), label="size")
    key = f"prop-{size}"
    body = hashlib.shake_256(f"prop{size}".encode()).digest(size) if size else b""
    try:
        client.head_object(Bucket=bucket, Key=key)
    except client.exceptions.ClientError:
        client.put_object(Bucket=bucket, Key=key, Body=body)
    shape = data.draw(st.sampled_from(["closed", "open", "suffix"]), label="shape")
    if size == 0:
        return
    if shape == "closed":
        a = data.draw(st.integers(0, size - 1), label="a")
        b = data.draw(st.integers(a, size + S), label="b")
        rng, want = f"bytes={a}-{b}", body[a : b + 1]
    elif shape == "open":
        a = data.draw(st.integers(0, size - 1), label="a")
        rng, want = f"bytes={a}-", body[a:]
    else:
        n = data.draw(st.integers(1, size + S), label="n")
        rng, want = f"bytes=-{n}", body[-n:]
    got = client.get_object(Bucket=bucket, Key=key, Range=rng)
    assert got["Body"].read() == want
    assert got["ContentLength"] == len(want)
