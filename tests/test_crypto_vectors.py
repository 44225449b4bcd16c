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


@pytest.mark.parametrize("name", ["stream_v1.json", "seal_v1.json", "envelope_v1.json"])
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
