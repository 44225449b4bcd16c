"""Build the known-answer vectors of formats v1 and v2 in tests/vectors/.

Run ``python tests/gen_vectors.py`` to (re)write them; only do that for a deliberate format
change, which also needs a new format version. ``tests/test_crypto_vectors.py`` rebuilds the
vectors with this module and compares them with the committed files.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from proxy.crypto import (  # noqa: E402
    SEGMENT_SIZE,
    Binding,
    Envelope,
    PartLayout,
    encrypt_all,
    seal_object_key,
    stream_key,
    to_metadata,
)
from proxy.crypto.seal import seal_aad  # noqa: E402

VECTOR_DIR = Path(__file__).resolve().parent / "vectors"
OBJECT_KEY = hashlib.sha256(b"cmek-proxy vector object key").digest()
DATA_KEY = hashlib.sha256(b"cmek-proxy vector data key").digest()
FULL_HEX_LIMIT = 256
EDGE = 64
S = SEGMENT_SIZE
STREAM_SIZES = [
    ("empty", 0),
    ("one", 1),
    ("s-1", S - 1),
    ("s", S),
    ("s+1", S + 1),
    ("3s+5", 3 * S + 5),
]
SEAL_BINDINGS = [
    ("ascii", Binding("bucket-a", "dir/object.bin", multipart=False)),
    ("multipart", Binding("bucket-a", "dir/object.bin", multipart=True)),
    ("unicode", Binding("bucket-b", "photos/2024/été 📷.jpg", multipart=False)),
    ("shifted", Binding("bucket-ad", "ir/object.bin", multipart=False)),
]


def deterministic_random(label: str) -> Callable[[int], bytes]:
    """``random_bytes(n)`` = SHA-256(label || u64(counter))[:n], counter from 0."""
    counter = 0

    def random_bytes(n: int) -> bytes:
        nonlocal counter
        block = hashlib.sha256(label.encode() + counter.to_bytes(8, "big")).digest()
        counter += 1
        assert n <= len(block)
        return block[:n]

    return random_bytes


def pattern(n: int) -> bytes:
    """The vectors' plaintext: byte i = (31 * i + 7) mod 256."""
    return bytes((31 * i + 7) & 0xFF for i in range(n))


def stream_vectors() -> dict[str, Any]:
    cases = []
    for part in (0, 3):
        for label, size in STREAM_SIZES:
            name = f"part{part}/{label}"
            stored = encrypt_all(
                OBJECT_KEY, pattern(size), part, random_bytes=deterministic_random(name)
            )
            case: dict[str, Any] = {
                "name": name,
                "part": part,
                "plaintext_size": size,
                "stored_size": len(stored),
                "stored_sha256": hashlib.sha256(stored).hexdigest(),
                "stored_head": stored[:EDGE].hex(),
                "stored_tail": stored[-EDGE:].hex(),
            }
            if len(stored) <= FULL_HEX_LIMIT:
                case["stored"] = stored.hex()
            cases.append(case)
    return {
        "description": "cmek-proxy format v1 segment streams, see docs/FORMAT.md section 4",
        "segment_size": S,
        "object_key": OBJECT_KEY.hex(),
        "plaintext": "byte i = (31 * i + 7) mod 256",
        "random_bytes": "SHA-256(utf8(name) || u64be(counter))[:n], counter from 0 per case",
        "stream_keys": {str(p): stream_key(OBJECT_KEY, p).hex() for p in (0, 1, 3, 10000)},
        "cases": cases,
    }


def seal_vectors() -> dict[str, Any]:
    cases = []
    for label, binding in SEAL_BINDINGS:
        sealed = seal_object_key(
            DATA_KEY, OBJECT_KEY, binding, random_bytes=deterministic_random(f"seal/{label}")
        )
        cases.append(
            {
                "name": label,
                "bucket": binding.bucket,
                "key": binding.key,
                "multipart": binding.multipart,
                "aad": seal_aad(binding).hex(),
                "sealed": sealed.hex(),
            }
        )
    return {
        "description": "cmek-proxy format v1 sealed object keys, see docs/FORMAT.md section 3",
        "data_key": DATA_KEY.hex(),
        "object_key": OBJECT_KEY.hex(),
        "random_bytes": "SHA-256(utf8('seal/' + name) || u64be(counter))[:n], counter from 0",
        "cases": cases,
    }


def envelope_vectors() -> dict[str, Any]:
    sealed = seal_object_key(
        DATA_KEY, OBJECT_KEY, SEAL_BINDINGS[1][1], random_bytes=deterministic_random("envelope")
    )
    env = Envelope(
        kek_uri="local://keys/k1",
        kek_version="3",
        wrapped_data_key=b"\x00wrapped-data-key\xff",
        sealed_object_key=sealed,
        multipart=True,
        checksum="opaque-checksum",
    )
    return {
        "description": "cmek-proxy format v1 metadata envelope, see docs/FORMAT.md section 7",
        "envelope": {
            "kek_uri": env.kek_uri,
            "kek_version": env.kek_version,
            "wrapped_data_key": env.wrapped_data_key.hex(),
            "sealed_object_key": env.sealed_object_key.hex(),
            "multipart": env.multipart,
            "checksum": env.checksum,
        },
        "metadata": to_metadata(env),
    }


LAYOUT_PARTS = [(1, 2 * S), (2, 2 * S), (4, 100)]
"""Parts 1 and 2 of two full segments, part 4 (numbers may skip) of one short segment."""


def layout_vectors() -> dict[str, Any]:
    """Format v2: a multipart object whose layout is bound into its sealed object key."""
    layout = PartLayout.from_parts(LAYOUT_PARTS)
    assert layout is not None
    bucket, key = "bucket-a", "dir/object.bin"
    pending = Binding(bucket, key, multipart=True, pending=True)
    final = Binding(bucket, key, multipart=True, layout=layout)
    seals = {}
    for label, binding in (("pending", pending), ("completed", final)):
        sealed = seal_object_key(
            DATA_KEY, OBJECT_KEY, binding, random_bytes=deterministic_random(f"v2/{label}")
        )
        seals[label] = {"aad": seal_aad(binding).hex(), "sealed": sealed.hex()}
    body = b""
    offset = 0
    for number, size in LAYOUT_PARTS:
        body += encrypt_all(
            OBJECT_KEY,
            pattern(offset + size)[offset:],
            number,
            random_bytes=deterministic_random(f"v2/part{number}"),
        )
        offset += size
    envelopes = {}
    for label, binding in (("pending", pending), ("completed", final)):
        env = Envelope(
            kek_uri="local://keys/k1",
            kek_version="3",
            wrapped_data_key=b"\x00wrapped-data-key\xff",
            sealed_object_key=bytes.fromhex(seals[label]["sealed"]),
            multipart=True,
            layout=binding.layout,
            pending=binding.pending,
        )
        envelopes[label] = to_metadata(env)
    return {
        "description": "cmek-proxy format v2 (bound multipart layout), docs/FORMAT.md section 5.1",
        "data_key": DATA_KEY.hex(),
        "object_key": OBJECT_KEY.hex(),
        "bucket": bucket,
        "key": key,
        "parts": [{"number": n, "plaintext_size": size} for n, size in LAYOUT_PARTS],
        "layout": layout.to_text(),
        "layout_bytes": layout.to_bytes().hex(),
        "random_bytes": "SHA-256(utf8('v2/' + name) || u64be(counter))[:n], counter from 0",
        "plaintext": "byte i = (31 * i + 7) mod 256 over the whole object",
        "seal": seals,
        "metadata": envelopes,
        "stored_size": len(body),
        "stored_sha256": hashlib.sha256(body).hexdigest(),
    }


def all_vectors() -> dict[str, dict[str, Any]]:
    """File name -> content of every vector file."""
    return {
        "stream_v1.json": stream_vectors(),
        "seal_v1.json": seal_vectors(),
        "envelope_v1.json": envelope_vectors(),
        "layout_v2.json": layout_vectors(),
    }


def render(content: dict[str, Any]) -> str:
    return json.dumps(content, indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    VECTOR_DIR.mkdir(exist_ok=True)
    for name, content in all_vectors().items():
        (VECTOR_DIR / name).write_text(render(content), encoding="utf-8")
        print(f"wrote {VECTOR_DIR / name}")


if __name__ == "__main__":
    main()
