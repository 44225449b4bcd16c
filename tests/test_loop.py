"""The allocator tuning every serving process gets (proxy.loop.tune_malloc).

Counted, not timed: the kernel's minor page faults while a process makes MiB-sized buffers the
way a large GET or PUT does (two alive at a time).  Untuned, glibc trims and regrows its heap
for them, one page fault per 4 KiB (~256 per MiB); tuned, the heap is reused.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

PATTERN = """
import os, resource, sys
from proxy.loop import tune_malloc
tuned = tune_malloc() if sys.argv[1] == "tune" else False
src = os.urandom(1 << 20)
parts = [src[i:i + 65536] for i in range(0, 1 << 20, 65536)]
held = []
def step():
    held.append(b"".join(parts))
    held.append(bytes(bytearray(src)))
    while len(held) > 2:
        held.pop(0)
for _ in range(16):
    step()  # warm-up: the heap grows to its working size
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(256):
    step()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", PATTERN, mode],
        capture_output=True,
        check=True,
        cwd=REPO,
        env={**clean, "PYTHONPATH": str(REPO), **env},
        timeout=120,
    ).stdout.split()
    return out[0].decode(), int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_mib_buffers_reuse_the_heap_once_tuned() -> None:
    tuned, faults = _faults("tune")
    if tuned != "True":
        pytest.skip("not glibc")
    # 512 MiB of buffers made: untuned that is ~130,000 faults; tuned, a handful.
    assert faults < 2000, faults


def test_operator_can_keep_the_default_allocator() -> None:
    tuned, _ = _faults("tune", CMEK_PROXY_MALLOC="default")
    assert tuned == "False"
    tuned, _ = _faults("tune", MALLOC_TRIM_THRESHOLD_="1048576")
    assert tuned == "False"
