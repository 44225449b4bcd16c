"""Upload state objects: new optional members round-trip, and states written before them parse."""

from __future__ import annotations

import json

import pytest

from proxy import crypto
from proxy.errors import FormatError
from proxy.layer.uploads import Completion, UploadState

ENV = crypto.Envelope(
    kek_uri="local://k",
    kek_version="1",
    wrapped_data_key=b"w" * 40,
    sealed_object_key=b"s" * crypto.SEALED_KEY_SIZE,
    multipart=True,
)


def test_state_written_before_done_and_realign_still_parses() -> None:
    old = {"v": 1, "bucket": "b", "key": "k", "meta": crypto.to_metadata(ENV), "ck_alg": None}
    old["ck_type"] = None
    state = UploadState.from_json(json.dumps(old).encode())
    assert state.envelope == ENV and state.done is None and state.realign == ()


def test_done_and_realign_round_trip() -> None:
    done = Completion(((1, "aa"), (2, "bb")), '"etag-2"', {"x-h": "v"}, (("ChecksumCRC32", "x"),))
    state = UploadState("b", "k", ENV, done=done, realign=((1, '"aa"', 5_000_000),))
    doc = json.loads(state.to_json())
    assert isinstance(doc["done_at"], int)
    assert UploadState.from_json(state.to_json()) == state


def test_garbled_done_is_a_format_error() -> None:
    doc = json.loads(UploadState("b", "k", ENV).to_json())
    doc["done"] = {"parts": "not a list", "etag": "x"}
    with pytest.raises(FormatError):
        UploadState.from_json(json.dumps(doc).encode())
