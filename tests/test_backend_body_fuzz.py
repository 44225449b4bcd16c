"""Generated backend responses against the hand-written body reader, on both event loops.

``proxy/backend/pool.py`` and ``http.py`` read every backend body on the data path: a
Content-Length body counted and read by the socket straight into the reader's buffer, a
chunked one parsed by llhttp.  Hypothesis draws the framing, the body's size, the pieces the
server writes it in, a fault (the connection cut inside the body, or bytes past its end that
forge a second response) and the reader's mix of ``readinto`` and ``read`` sizes.  What must
hold whatever the draw: an intact body arrives byte for byte; a cut body is an error, and what
was read before it is a prefix of the body (never a wrong byte, never a silent short body); no
byte past a body ever reaches the next request's answer.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.backend.http import Body, PayloadError
from tests.test_backend_client import Scripted, _raw_client
from tests.test_backend_readinto import LOOPS, _run

SECOND = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond"
FORGED = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
EDGES = [0, 1, 4095, 65_536, 262_143, 262_144, 262_145, 1_048_576 + 7]


@dataclass(frozen=True)
class Case:
    chunked: bool
    size: int
    pieces: tuple[int, ...]
    fault: str  # "none", "cut" or "extra"
    cut_at: float
    reads: tuple[tuple[str, int], ...]


cases = st.builds(
    Case,
    chunked=st.booleans(),
    size=st.one_of(st.sampled_from(EDGES), st.integers(0, 1_500_000)),
    pieces=st.lists(st.integers(1, 300_000), min_size=1, max_size=12).map(tuple),
    fault=st.sampled_from(["none", "none", "cut", "extra"]),
    cut_at=st.floats(0.0, 0.999),
    reads=st.lists(
        st.tuples(st.sampled_from(["into", "read"]), st.integers(1, 1_100_000)),
        min_size=1,
        max_size=6,
    ).map(tuple),
)


def _wire(case: Case, data: bytes) -> tuple[bytes, bytes]:
    """The response's head and the bytes after it, as the server sends them."""
    if not case.chunked:
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data), data
    out = bytearray()
    pos = 0
    sizes = itertools.cycle(case.pieces)
    while pos < len(data):
        piece = data[pos : pos + next(sizes)]
        out += b"%x\r\n%s\r\n" % (len(piece), piece)
        pos += len(piece)
    out += b"0\r\n\r\n"
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", bytes(out)


async def _read(body: Body, reads: tuple[tuple[str, int], ...], got: bytearray) -> None:
    i = 0
    while True:
        how, n = reads[i % len(reads)]
        i += 1
        if how == "into":
            buf = memoryview(bytearray(n))
            k = await body.readinto(buf)
            if k == 0:
                return
            got += buf[:k]
        else:
            chunk = await body.read(n)
            if not chunk:
                return
            got += chunk


# Hand-picked draws: a body past the pool's high-water mark with forged bytes in the same
# write as its tail, read into a buffer larger than what is left; a chunked body cut in its
# last chunk; an empty chunked body cut before its end.
PICKED = [
    Case(False, 1_000_000, (300_000,), "extra", 0.0, (("into", 1_100_000),)),
    Case(False, 700_001, (65_536, 1), "extra", 0.0, (("read", 100_000), ("into", 900_000))),
    Case(False, 1_048_583, (262_144,), "cut", 0.9, (("into", 1_048_576),)),
    Case(True, 500_000, (70_000,), "cut", 0.999, (("into", 600_000),)),
    Case(True, 0, (1,), "cut", 0.5, (("read", 10),)),
]


@pytest.mark.parametrize("kind", LOOPS)
@pytest.mark.parametrize("case", PICKED, ids=range(len(PICKED)))
def test_picked_backend_bodies(kind: str, case: Case) -> None:
    _check(kind, case)


@pytest.mark.parametrize("kind", LOOPS)
@settings(
    max_examples=int(os.environ.get("CMEK_BODY_FUZZ_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(case=cases)
def test_generated_backend_bodies(kind: str, case: Case) -> None:
    _check(kind, case)


def _check(kind: str, case: Case) -> None:
    data = os.urandom(case.size)
    head, rest = _wire(case, data)
    fault = "none" if case.fault == "cut" and not case.chunked and not data else case.fault
    cut = len(rest)
    if fault == "cut":  # before the body's last byte (or, empty and chunked, its last chunk)
        cut = int(len(rest) * case.cut_at)
        if case.chunked:  # rest ends: last data byte, CRLF, "0", CRLF, CRLF
            cut = min(cut, len(rest) - 8 if data else 4)
    writes = [head]
    sent = 0
    sizes = itertools.cycle(case.pieces)
    while sent < cut:
        writes.append(rest[sent : min(cut, sent + next(sizes))])
        sent += len(writes[-1])
    if fault == "extra":  # in the same write as the body's tail
        writes[-1] += FORGED
    answered = 0

    async def answer(_head: bytes, w: asyncio.StreamWriter) -> bool:
        nonlocal answered
        answered += 1
        for piece in writes if answered == 1 else [SECOND]:
            w.write(piece)
            await w.drain()
        return answered > 1 or fault != "cut"  # a cut closes the connection

    async def scenario() -> None:
        async with Scripted(answer) as srv:
            bc = _raw_client(srv.url, read_timeout=5.0)  # a reader left waiting fails
            try:
                resp = await bc.request("GET", "b", "k")
                got = bytearray()
                if fault == "cut":
                    with pytest.raises(PayloadError):
                        await _read(resp.content, case.reads, got)
                    assert len(got) < len(data) or not data
                    assert bytes(got) == data[: len(got)]
                else:
                    await _read(resp.content, case.reads, got)
                    assert bytes(got) == data
                resp.release()
                await asyncio.sleep(0.02)
                again = await bc.request("GET", "b", "k2")
                assert await again.read() == b"second"  # never the forged bytes
                again.release()
            finally:
                await bc.session.close()

    _run(kind, scenario)
