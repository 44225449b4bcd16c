"""Object-key sealing (bound to bucket, key, layout) and the metadata envelope."""

from __future__ import annotations

import base64
import os

import pytest
from multidict import CIMultiDict

from proxy.crypto import (
    INTERNAL_PREFIX,
    M_CHECKSUM,
    M_DATA_KEY,
    M_KEK,
    M_KEK_VERSION,
    M_LAYOUT,
    M_OBJECT_KEY,
    M_VERSION,
    Binding,
    Envelope,
    from_metadata,
    is_internal,
    new_object_key,
    open_object_key,
    reseal,
    seal_object_key,
    strip_internal,
    to_metadata,
)
from proxy.crypto.seal import seal_aad
from proxy.errors import FormatError, IntegrityError

DK = os.urandom(32)
OK = new_object_key()
B = Binding("bucket", "a/b.txt", multipart=False)


def test_seal_round_trip_and_size() -> None:
    sealed = seal_object_key(DK, OK, B)
    assert len(sealed) == 60
    assert open_object_key(DK, sealed, B) == OK
    assert seal_object_key(DK, OK, B) != sealed  # fresh nonce every time


@pytest.mark.parametrize(
    "other",
    [
        Binding("bucket2", "a/b.txt", False),
        Binding("bucket", "a/b.txt2", False),
        Binding("bucket", "a/b.txt", True),
        Binding("bucke", "ta/b.txt", False),  # same concatenation, different split
        Binding("Bucket", "a/b.txt", False),
    ],
)
def test_open_with_other_binding_fails(other: Binding) -> None:
    sealed = seal_object_key(DK, OK, B)
    with pytest.raises(IntegrityError):
        open_object_key(DK, sealed, other)


def test_open_with_other_data_key_fails() -> None:
    sealed = seal_object_key(DK, OK, B)
    with pytest.raises(IntegrityError):
        open_object_key(os.urandom(32), sealed, B)


def test_every_flipped_bit_fails() -> None:
    sealed = seal_object_key(DK, OK, B)
    for i in range(len(sealed)):
        for bit in (0, 7):
            bad = bytearray(sealed)
            bad[i] ^= 1 << bit
            with pytest.raises(IntegrityError) as info:
                open_object_key(DK, bytes(bad), B)
            assert OK.hex() not in str(info.value) and DK.hex() not in str(info.value)


@pytest.mark.parametrize("length", [0, 59, 61])
def test_wrong_length_fails(length: int) -> None:
    with pytest.raises(IntegrityError):
        open_object_key(DK, os.urandom(length), B)


def test_bad_key_sizes() -> None:
    with pytest.raises(ValueError):
        seal_object_key(DK[:16], OK, B)
    with pytest.raises(ValueError):
        seal_object_key(DK, OK[:31], B)
    with pytest.raises(ValueError):
        open_object_key(DK + b"x", bytes(60), B)


def test_aad_is_unambiguous() -> None:
    bindings = [
        Binding(b, k, m)
        for b in ("", "a", "ab", "a\x00")
        for k in ("", "b", "ab", "\x00b")
        for m in (False, True)
    ]
    assert len({seal_aad(x) for x in bindings}) == len(bindings)


def test_reseal_for_copy() -> None:
    dst_dk = os.urandom(32)
    dst = Binding("other", "copy.txt", multipart=True)
    sealed = seal_object_key(DK, OK, B)
    copied = reseal(DK, sealed, B, dst_dk, dst)
    assert open_object_key(dst_dk, copied, dst) == OK
    with pytest.raises(IntegrityError):
        open_object_key(DK, copied, B)
    with pytest.raises(IntegrityError):
        reseal(DK, sealed, dst, dst_dk, dst)


# --- envelope ----------------------------------------------------------------------------

ENV = Envelope(
    kek_uri="local://k1",
    kek_version="v7",
    wrapped_data_key=os.urandom(57),
    sealed_object_key=seal_object_key(DK, OK, B),
    multipart=False,
)


def test_envelope_round_trip() -> None:
    meta = to_metadata(ENV)
    assert set(meta) == {M_VERSION, M_KEK, M_KEK_VERSION, M_DATA_KEY, M_OBJECT_KEY, M_LAYOUT}
    assert meta[M_VERSION] == "1" and meta[M_LAYOUT] == "s"
    assert "=" not in meta[M_DATA_KEY] + meta[M_OBJECT_KEY]
    assert from_metadata(meta) == ENV
    with_ck = Envelope(**{**ENV.__dict__, "checksum": "crc32c:abc", "multipart": True})
    meta = to_metadata(with_ck)
    assert meta[M_CHECKSUM] == "crc32c:abc" and meta[M_LAYOUT] == "m"
    assert from_metadata(meta) == with_ck


def test_empty_kek_version_is_omitted() -> None:
    env = Envelope(**{**ENV.__dict__, "kek_version": ""})
    meta = to_metadata(env)
    assert M_KEK_VERSION not in meta
    assert from_metadata(meta) == env


def test_envelope_repr_hides_key_material() -> None:
    text = repr(ENV)
    assert ENV.wrapped_data_key.hex() not in text and "sealed_object_key" not in text


def test_from_metadata_case_insensitive_and_mixed_headers() -> None:
    meta = {k.title(): v for k, v in to_metadata(ENV).items()}
    meta["Content-Type"] = "text/plain"
    meta["X-Amz-Meta-User"] = "kept"
    assert from_metadata(meta) == ENV


def test_from_metadata_plaintext_object() -> None:
    assert from_metadata({}) is None
    assert from_metadata({"x-amz-meta-color": "blue", "content-length": "3"}) is None


def test_padded_base64_accepted() -> None:
    meta = to_metadata(ENV)
    meta[M_DATA_KEY] = base64.b64encode(ENV.wrapped_data_key).decode()
    meta[M_OBJECT_KEY] = base64.b64encode(ENV.sealed_object_key).decode()
    assert from_metadata(meta) == ENV


def _garbled() -> list[tuple[str, dict[str, str]]]:
    good = to_metadata(ENV)
    cases: list[tuple[str, dict[str, str]]] = []
    for name in (M_VERSION, M_KEK, M_DATA_KEY, M_OBJECT_KEY, M_LAYOUT):
        cases.append((f"missing {name}", {k: v for k, v in good.items() if k != name}))
    changes = {
        "version 2": (M_VERSION, "2"),
        "version empty": (M_VERSION, ""),
        "kek empty": (M_KEK, ""),
        "dk not base64": (M_DATA_KEY, "!!!"),
        "dk bad length": (M_DATA_KEY, "A"),
        "dk empty": (M_DATA_KEY, ""),
        "dk non-canonical": (M_DATA_KEY, "AB"),
        "ok short": (M_OBJECT_KEY, base64.b64encode(bytes(59)).decode()),
        "ok not base64": (M_OBJECT_KEY, "@@@@"),
        "layout x": (M_LAYOUT, "x"),
        "layout upper": (M_LAYOUT, "S"),
    }
    for label, (name, value) in changes.items():
        cases.append((label, {**good, name: value}))
    cases.append(("unknown name", {**good, INTERNAL_PREFIX + "zz": "1"}))
    cases.append(("only one name", {M_KEK: "local://k1"}))
    return cases


@pytest.mark.parametrize(("label", "meta"), _garbled(), ids=[c[0] for c in _garbled()])
def test_from_metadata_garbled(label: str, meta: dict[str, str]) -> None:
    with pytest.raises(FormatError):
        from_metadata(meta)


def test_from_metadata_duplicate_names() -> None:
    # aiohttp gives backend headers as a case-insensitive multidict.
    headers = CIMultiDict(to_metadata(ENV))
    assert from_metadata(headers) == ENV
    headers.add("X-Amz-Meta-Cmek-Layout", "s")
    with pytest.raises(FormatError):
        from_metadata(headers)


@pytest.mark.parametrize(
    "env",
    [
        Envelope("", "1", b"x", bytes(60), False),
        Envelope("local://é", "1", b"x", bytes(60), False),
        Envelope(" local://k", "1", b"x", bytes(60), False),
        Envelope("local://k", "1", b"", bytes(60), False),
        Envelope("local://k", "1", b"x", bytes(59), False),
        Envelope("local://k", "1\n", b"x", bytes(60), False),
        Envelope("local://k", "1", b"x", bytes(60), False, checksum=""),
    ],
)
def test_to_metadata_rejects_bad_envelopes(env: Envelope) -> None:
    with pytest.raises(ValueError):
        to_metadata(env)


def test_internal_names() -> None:
    assert is_internal("x-amz-meta-cmek-dk") and is_internal("X-Amz-Meta-Cmek-Anything")
    assert not is_internal("x-amz-meta-cmek") and not is_internal("x-amz-meta-user")
    headers = {**to_metadata(ENV), "X-Amz-Meta-Cmek-Ok": "x", "x-amz-meta-a": "1", "ETag": "e"}
    assert strip_internal(headers) == {"x-amz-meta-a": "1", "ETag": "e"}


# ---- key replicas (x-amz-meta-cmek-kr, FORMAT.md 7.2) ---------------------------------


def _replicated() -> Envelope:
    from proxy.crypto import WrappedReplica

    return Envelope(
        kek_uri="aws-kms://arn:aws:kms:eu-west-1:111122223333:key/mrk-1",
        kek_version="v1",
        wrapped_data_key=os.urandom(40),
        sealed_object_key=ENV.sealed_object_key,
        multipart=False,
        replicas=(
            WrappedReplica(
                "aws-kms://arn:aws:kms:eu-central-1:111122223333:key/mrk-1", "", b"x" * 9
            ),
            WrappedReplica("vault-transit://bao:8200/transit/keys/k", "v3", os.urandom(50)),
        ),
    )


def test_replicas_round_trip_and_old_envelopes_unchanged() -> None:
    env = _replicated()
    meta = to_metadata(env)
    assert from_metadata(meta) == env
    plain = Envelope(
        env.kek_uri, env.kek_version, env.wrapped_data_key, env.sealed_object_key, False
    )
    old = to_metadata(plain)
    assert "x-amz-meta-cmek-kr" not in old  # no replicas: the envelope is byte-identical
    back = from_metadata(old)
    assert back == plain and back is not None and back.replicas == ()


@pytest.mark.parametrize(
    "value",
    [
        "",  # present but empty is garbled, not "no replicas"
        "abc",  # not three fields
        "YQ.dg.eA.eQ",  # four fields
        "YQ.dg",  # two fields
        "YQ.dg.",  # empty wrapped key
        "!!.dg.eA",  # not base64
        "YQ.dg.eA",  # well formed: the control row
    ],
)
def test_replicas_garbled(value: str) -> None:
    meta = to_metadata(_replicated())
    meta["x-amz-meta-cmek-kr"] = value
    if value == "YQ.dg.eA":
        assert from_metadata(meta) is not None
        return
    with pytest.raises(FormatError):
        from_metadata(meta)


def test_replicas_repeating_a_key_or_too_many_are_refused() -> None:
    env = _replicated()
    meta = to_metadata(env)
    main = base64.b64encode(env.kek_uri.encode()).decode().rstrip("=")
    meta["x-amz-meta-cmek-kr"] = f"{main}.dg.eA"  # the main key again
    with pytest.raises(FormatError):
        from_metadata(meta)
    meta["x-amz-meta-cmek-kr"] = ",".join(
        f"{base64.b64encode(bytes([65 + i])).decode().rstrip('=')}.dg.eA" for i in range(4)
    )
    with pytest.raises(FormatError, match="more than 3"):
        from_metadata(meta)
