"""The segment cipher alone, in-process: ``python -m benchmarks.segments [--mib N] [--rounds R]``.

Encrypts ``N`` MiB (default 256) in 1 MiB chunks with ``crypto.StreamEncryptor`` - what a PUT
does per chunk it receives - and decrypts the result in 1 MiB chunks with
``crypto.StreamDecryptor``, as a GET does; prints the best of ``R`` (5) rounds of each in
seconds per GiB, with the allocator tuned as the proxy tunes it. Runs whichever ``proxy`` is
imported, so the commit before a change can be measured from its own tree against the one
after. Bounded: ``N`` at most 4096, ``R`` at most 50.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from proxy import crypto
from proxy.loop import tune_malloc

MiB = 1 << 20
CHUNK = MiB


def _encrypt(object_key: bytes, chunks: list[bytes]) -> tuple[float, list[bytes | bytearray]]:
    started = time.perf_counter()
    enc = crypto.StreamEncryptor(object_key)
    out = [enc.update(c) for c in chunks]
    out.append(enc.finalize())
    return time.perf_counter() - started, out


def _decrypt(object_key: bytes, stored: bytes, total_plain: int) -> float:
    total = crypto.segment_count(len(stored))
    started = time.perf_counter()
    dec = crypto.StreamDecryptor(
        object_key, multipart=False, first_segment=0, last_segment=total - 1, total_segments=total
    )
    got = 0
    view = memoryview(stored)
    for pos in range(0, len(stored), CHUNK):
        got += len(dec.update(view[pos : pos + CHUNK]))
    got += len(dec.finalize())
    elapsed = time.perf_counter() - started
    if got != total_plain:
        raise RuntimeError(f"decrypted {got} bytes of {total_plain}")
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.segments", description=__doc__)
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    tune_malloc()  # as every serving process does
    mib = max(1, min(a.mib, 4096))
    rounds = max(1, min(a.rounds, 50))
    object_key = crypto.new_object_key()
    chunk = os.urandom(CHUNK)
    chunks = [chunk] * mib
    enc_best = dec_best = float("inf")
    for _ in range(rounds):
        seconds, out = _encrypt(object_key, chunks)
        enc_best = min(enc_best, seconds)
        stored = b"".join(out)
        del out
        dec_best = min(dec_best, _decrypt(object_key, stored, mib * MiB))
    gib = mib * MiB / (1 << 30)
    doc = {"mib": mib, "rounds": rounds}
    doc["encrypt_s_per_gib"] = round(enc_best / gib, 3)
    doc["decrypt_s_per_gib"] = round(dec_best / gib, 3)
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
