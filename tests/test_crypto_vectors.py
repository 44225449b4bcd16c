"""Known-answer tests: the committed vectors pin every byte of format v1.

The vectors are rebuilt with ``tests/gen_vectors.py`` and compared with the committed JSON
files, and the small ones are decoded by an independent reference decoder written from
docs/FORMAT.md (plain AES-GCM and HKDF, no ``proxy.crypto`` stream code).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.crypto import (
    Binding,
    Envelope,
    decrypt_all,
    encrypt_all,
    from_metadata,
    open_object_key,
)
from proxy.errors import IntegrityError

HERE = Path(__file__).resolve().parent
VECTORS = HERE / "vectors"
S = 65536


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cmek_gen_vectors", HERE / "gen_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


GEN = _load_generator()


def _committed(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text(encoding="utf-8"))
    return data


@pytest.mark.parametrize(
    "name", ["stream_v1.json", "seal_v1.json", "envelope_v1.json", "layout_v2.json"]
)
def test_regenerated_vectors_equal_committed(name: str) -> None:
    assert GEN.all_vectors()[name] == _committed(name)


def _hkdf(ikm: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=SHA256(), length=32, salt=None, info=info).derive(ikm)


def reference_decode(object_key: bytes, stored: bytes, *, multipart: bool) -> bytes:
    """Decode a whole body exactly as docs/FORMAT.md section 8 reads."""
    out = []
    pos = 0
    segments = []
    while pos < len(stored):
        segments.append(stored[pos : pos + S + 32])
        pos += S + 32
    prev: tuple[int, int, bool] | None = None
    for number, seg in enumerate(segments):
        version, flags, part, index = struct.unpack(">BBHI", seg[:8])
        assert version == 1 and flags & 0xFE == 0
        final = bool(flags & 1)
        if multipart:
            if prev is None:
                assert index == 0
            elif prev[2]:
                assert part > prev[0] and index == 0
            else:
                assert part == prev[0] and index == prev[1] + 1
        else:
            assert part == 0 and index == number
            assert final == (number == len(segments) - 1)
        key = _hkdf(object_key, b"cmek-proxy/v1/stream" + part.to_bytes(4, "big"))
        out.append(AESGCM(key).decrypt(seg[4:16], seg[16:], seg[:16]))
        prev = (part, index, final)
    assert prev is not None and prev[2]
    return b"".join(out)


def test_stream_vectors_decode() -> None:
    vec = _committed("stream_v1.json")
    object_key = bytes.fromhex(vec["object_key"])
    for part, key_hex in vec["stream_keys"].items():
        info = b"cmek-proxy/v1/stream" + int(part).to_bytes(4, "big")
        assert _hkdf(object_key, info).hex() == key_hex
    for case in vec["cases"]:
        plaintext = GEN.pattern(case["plaintext_size"])
        multipart = case["part"] != 0
        if "stored" in case:
            stored = bytes.fromhex(case["stored"])
            assert reference_decode(object_key, stored, multipart=multipart) == plaintext
        else:
            stored = encrypt_all(
                object_key,
                plaintext,
                case["part"],
                random_bytes=GEN.deterministic_random(case["name"]),
            )
            assert hashlib.sha256(stored).hexdigest() == case["stored_sha256"]
            assert stored[:64].hex() == case["stored_head"]
            assert stored[-64:].hex() == case["stored_tail"]
            assert reference_decode(object_key, stored, multipart=multipart) == plaintext
        assert len(stored) == case["stored_size"]
        assert decrypt_all(object_key, stored, multipart=multipart) == plaintext


def test_seal_vectors_open() -> None:
    vec = _committed("seal_v1.json")
    data_key = bytes.fromhex(vec["data_key"])
    object_key = bytes.fromhex(vec["object_key"])
    sealing_key = _hkdf(data_key, b"cmek-proxy/v1/seal")
    for case in vec["cases"]:
        sealed = bytes.fromhex(case["sealed"])
        assert len(sealed) == 60
        binding = Binding(case["bucket"], case["key"], case["multipart"])
        aad = bytes.fromhex(case["aad"])
        bucket, key = case["bucket"].encode(), case["key"].encode()
        expected_aad = (
            (18).to_bytes(4, "big")
            + b"cmek-proxy/v1/seal"
            + b"\x01"
            + len(bucket).to_bytes(4, "big")
            + bucket
            + len(key).to_bytes(4, "big")
            + key
            + (b"\x01" if case["multipart"] else b"\x00")
        )
        assert aad == expected_aad
        assert AESGCM(sealing_key).decrypt(sealed[:12], sealed[12:], aad) == object_key
        assert open_object_key(data_key, sealed, binding) == object_key


def test_envelope_vector_parses() -> None:
    vec = _committed("envelope_v1.json")
    e = vec["envelope"]
    expected = Envelope(
        kek_uri=e["kek_uri"],
        kek_version=e["kek_version"],
        wrapped_data_key=bytes.fromhex(e["wrapped_data_key"]),
        sealed_object_key=bytes.fromhex(e["sealed_object_key"]),
        multipart=e["multipart"],
        checksum=e["checksum"],
    )
    assert from_metadata(vec["metadata"]) == expected


def _layout_positions(text: str) -> list[tuple[int, int, bool]]:
    """(part, index, FINAL) of every segment, from the layout text as FORMAT.md 5.1 reads it."""
    out = []
    for run in text.split(","):
        numbers, segments = run.split(":")
        first, last = (int(x) for x in numbers.split("-"))
        for part in range(first, last + 1):
            n = int(segments)
            out += [(part, i, i == n - 1) for i in range(n)]
    return out


def test_layout_v2_vector() -> None:
    vec = _committed("layout_v2.json")
    data_key = bytes.fromhex(vec["data_key"])
    object_key = bytes.fromhex(vec["object_key"])
    bucket, key = vec["bucket"].encode(), vec["key"].encode()
    runs = [r.split(":") for r in vec["layout"].split(",")]
    layout_bytes = len(runs).to_bytes(2, "big") + b"".join(
        int(a).to_bytes(2, "big") + int(b).to_bytes(2, "big") + int(n).to_bytes(4, "big")
        for (a, b), n in ((r[0].split("-"), r[1]) for r in runs)
    )
    assert layout_bytes.hex() == vec["layout_bytes"]
    head = (
        (18).to_bytes(4, "big")
        + b"cmek-proxy/v2/seal"
        + b"\x02"
        + len(bucket).to_bytes(4, "big")
        + bucket
        + len(key).to_bytes(4, "big")
        + key
    )
    sealing_key = _hkdf(data_key, b"cmek-proxy/v1/seal")
    for label, bound in (("pending", b"\x02"), ("completed", b"\x01" + layout_bytes)):
        case = vec["seal"][label]
        assert bytes.fromhex(case["aad"]) == head + bound
        sealed = bytes.fromhex(case["sealed"])
        assert AESGCM(sealing_key).decrypt(sealed[:12], sealed[12:], head + bound) == object_key
        env = from_metadata(vec["metadata"][label])
        assert env is not None and env.sealed_object_key == sealed
        assert env.pending == (label == "pending")
        assert open_object_key(data_key, sealed, env.binding(vec["bucket"], vec["key"])) == (
            object_key
        )
    # The v1 binding of the same object does not open either seal: no downgrade.
    for label in ("pending", "completed"):
        sealed = bytes.fromhex(vec["seal"][label]["sealed"])
        with pytest.raises(IntegrityError):
            open_object_key(data_key, sealed, Binding(vec["bucket"], vec["key"], multipart=True))
    # The body: every segment stands where the layout says.
    total = sum(p["plaintext_size"] for p in vec["parts"])
    body = b""
    offset = 0
    for p in vec["parts"]:
        size = p["plaintext_size"]
        body += encrypt_all(
            object_key,
            GEN.pattern(offset + size)[offset:],
            p["number"],
            random_bytes=GEN.deterministic_random(f"v2/part{p['number']}"),
        )
        offset += size
    assert len(body) == vec["stored_size"]
    assert hashlib.sha256(body).hexdigest() == vec["stored_sha256"]
    segments = [body[i : i + S + 32] for i in range(0, len(body), S + 32)]
    assert len(segments) == len(_layout_positions(vec["layout"]))
    for seg, (part, index, final) in zip(segments, _layout_positions(vec["layout"]), strict=True):
        _, flags, got_part, got_index = struct.unpack(">BBHI", seg[:8])
        assert (got_part, got_index, bool(flags & 1)) == (part, index, final)
    completed = from_metadata(vec["metadata"]["completed"])
    assert completed is not None and completed.layout is not None
    assert decrypt_all(object_key, body, multipart=True, layout=completed.layout) == GEN.pattern(
        total
    )
