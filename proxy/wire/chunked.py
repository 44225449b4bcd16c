"""Incremental decoder for ``Content-Encoding: aws-chunked`` request bodies.

Three encodings (the ``x-amz-content-sha256`` value names them):

``STREAMING-UNSIGNED-PAYLOAD-TRAILER``::

    <hex-size>\\r\\n<data>\\r\\n ... 0\\r\\n<name>:<value>\\r\\n ... \\r\\n

``STREAMING-AWS4-HMAC-SHA256-PAYLOAD``::

    <hex-size>;chunk-signature=<64 hex>\\r\\n<data>\\r\\n ... 0;chunk-signature=<sig>\\r\\n\\r\\n

``STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER``::

    ... 0;chunk-signature=<sig>\\r\\n<name>:<value>\\r\\n ...
    x-amz-trailer-signature:<64 hex>\\r\\n\\r\\n

A chunk signature is ``HMAC(kSigning, "AWS4-HMAC-SHA256-PAYLOAD\\n" amz-date "\\n"
scope "\\n" previous-signature "\\n" sha256("") "\\n" sha256(chunk-data))``, chained
from the request's seed signature. The trailer signature is ``HMAC(kSigning,
"AWS4-HMAC-SHA256-TRAILER\\n" amz-date "\\n" scope "\\n" final-chunk-signature "\\n"
sha256(canonical-trailers))`` where the canonical trailers are ``name:value\\n`` per
trailer, lower-case names, sorted (as aws-c-auth, MinIO and other servers do).

The decoder is a synchronous state machine: :meth:`AwsChunkedDecoder.feed` takes
bytes as they arrive and returns decoded payload pieces; in the signed modes a
chunk's data is returned only after its signature has been verified, so memory is
bounded by one chunk (at most :data:`MAX_CHUNK_SIZE`). :meth:`finish` checks the end.
After any error the decoder is poisoned and raises the same error again.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Final

from proxy.errors import S3Error
from proxy.wire.sigv4 import EMPTY_SHA256, ChunkSigningContext, PayloadMode

__all__ = [
    "MAX_CHUNK_SIZE",
    "MAX_LINE",
    "AwsChunkedDecoder",
    "ChunkSigningContext",
    "Trailers",
]

MAX_CHUNK_SIZE: Final = 16 * 1024 * 1024
MAX_LINE: Final = 4096
MAX_TRAILERS: Final = 16

_SIZE: Final = 0
_DATA: Final = 1
_DATA_END: Final = 2
_TRAILER: Final = 3
_FINAL_CRLF: Final = 4
_DONE: Final = 5

_HEX_SIZE = re.compile(rb"[0-9a-fA-F]{1,16}")
_SIG = re.compile(rb"[0-9a-f]{64}")
_TRAILER_NAME = re.compile(r"[a-z0-9-]+")
_SIG_EXT = b"chunk-signature="
_TRAILER_SIG = "x-amz-trailer-signature"


class Trailers(Mapping[str, str]):
    """Trailing headers of an aws-chunked body: lower-case name -> value."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)

    def __getitem__(self, name: str) -> str:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Trailers({sorted(self._values)})"


def _malformed(detail: str) -> S3Error:
    return S3Error("InvalidRequest", f"Malformed aws-chunked body: {detail}", 400)


def _incomplete() -> S3Error:
    return S3Error(
        "IncompleteBody",
        "The request body terminated unexpectedly",
        400,
    )


def _bad_signature() -> S3Error:
    return S3Error(
        "SignatureDoesNotMatch",
        "The request signature we calculated does not match the signature you provided. "
        "Check your key and signing method.",
        403,
    )


def _bad_trailer(detail: str) -> S3Error:
    return S3Error(
        "MalformedTrailerError",
        f"The request contained trailing data that was not well-formed: {detail}",
        400,
    )


class AwsChunkedDecoder:
    """Decode one aws-chunked body, verifying chunk and trailer signatures.

    ``mode`` must be a streaming :class:`PayloadMode`. ``signing`` is required for
    the signed modes (``VerifiedAuth.chunk_signing()``). ``decoded_length`` is
    ``x-amz-decoded-content-length`` (``None``: not checked). ``trailer_names`` are
    the names declared in ``x-amz-trailer``; each must arrive, no other may.
    ``feed`` keeps views of its argument until a signed chunk is verified, so pass
    immutable ``bytes`` (not a buffer that is reused).
    """

    __slots__ = (
        "_chunk_sig",
        "_declared",
        "_decoded_length",
        "_error",
        "_has_trailer",
        "_line",
        "_pending",
        "_prefix",
        "_prev_sig",
        "_remaining",
        "_sha",
        "_signed",
        "_signing",
        "_state",
        "_total",
        "_trailer_sig_seen",
        "_trailers",
    )

    def __init__(
        self,
        mode: PayloadMode,
        *,
        signing: ChunkSigningContext | None,
        decoded_length: int | None,
        trailer_names: Sequence[str] = (),
    ) -> None:
        if not mode.is_streaming:
            raise ValueError(f"{mode.value} is not an aws-chunked encoding")
        self._signed = mode.is_signed_streaming
        if self._signed and signing is None:
            raise ValueError(f"{mode.value} needs a ChunkSigningContext")
        self._has_trailer = mode.has_trailer
        declared = [name.strip().lower() for name in trailer_names if name.strip()]
        if declared and not self._has_trailer:
            raise _bad_trailer("x-amz-trailer was sent with an encoding that has no trailer")
        if len(declared) > MAX_TRAILERS or len(set(declared)) != len(declared):
            raise _bad_trailer("x-amz-trailer lists too many or repeated names")
        self._declared = frozenset(declared)
        self._signing = signing
        self._prefix = (
            f"AWS4-HMAC-SHA256-PAYLOAD\n{signing.amz_date}\n{signing.scope}\n"
            if signing is not None
            else ""
        )
        self._prev_sig = signing.seed_signature if signing is not None else ""
        self._decoded_length = decoded_length
        self._state = _SIZE
        self._line = bytearray()
        self._remaining = 0
        self._total = 0
        self._sha = hashlib.sha256()
        self._chunk_sig = ""
        self._pending: list[memoryview] = []
        self._trailers: dict[str, str] = {}
        self._trailer_sig_seen = False
        self._error: S3Error | None = None

    @property
    def decoded_bytes(self) -> int:
        """Payload bytes announced by the chunk headers seen so far."""
        return self._total

    # ------------------------------------------------------------------ feeding

    def feed(self, data: bytes) -> list[bytes]:
        """Consume the next bytes of the body; return payload pieces ready to pass on."""
        if self._error is not None:
            raise self._error
        try:
            return self._feed(data)
        except S3Error as err:
            self._poison(err)
            raise

    def _poison(self, err: S3Error) -> None:
        self._error = err
        self._pending.clear()
        self._line.clear()

    def _feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        n = len(data)
        pos = 0
        view = memoryview(data)
        while pos < n:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, n - pos)
                if self._signed:
                    piece = view[pos : pos + take]
                    self._sha.update(piece)
                    self._pending.append(piece)
                else:
                    out.append(data if take == n else data[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _DATA_END
            elif state in (_DATA_END, _FINAL_CRLF):
                need = 2 - len(self._line)
                self._line += view[pos : pos + need]
                pos += min(need, n - pos)
                if len(self._line) < 2:
                    break
                if self._line != b"\r\n":
                    raise _malformed("chunk data is not followed by CRLF")
                self._line.clear()
                if state == _FINAL_CRLF:
                    self._state = _DONE
                    continue
                if self._signed:
                    self._verify_chunk(self._sha.hexdigest())
                    out.append(self._release())
                self._state = _SIZE
            elif state in (_SIZE, _TRAILER):
                line, pos = self._take_line(data, pos)
                if line is None:
                    break
                if state == _SIZE:
                    self._size_line(line)
                else:
                    self._trailer_line(line)
            else:
                raise _malformed("data after the end of the body")
        return out

    def _take_line(self, data: bytes, pos: int) -> tuple[bytes | None, int]:
        limit = MAX_LINE + 2 - len(self._line)
        idx = data.find(b"\n", pos, pos + limit)
        if idx < 0:
            if len(data) - pos >= limit:
                raise _malformed("line too long")
            self._line += data[pos:]
            return None, len(data)
        if self._line:
            self._line += data[pos : idx + 1]
            line = bytes(self._line)
            self._line.clear()
        else:
            line = data[pos : idx + 1]
        if len(line) < 2 or line[-2] != 0x0D:
            raise _malformed("line does not end with CRLF")
        return line[:-2], idx + 1

    def _release(self) -> bytes:
        pending = self._pending
        piece = bytes(pending[0]) if len(pending) == 1 else b"".join(pending)
        pending.clear()
        return piece

    def _size_line(self, line: bytes) -> None:
        if self._signed:
            size_part, sep, ext = line.partition(b";")
            if not sep or not ext.startswith(_SIG_EXT) or not _SIG.fullmatch(ext, len(_SIG_EXT)):
                raise _bad_signature()
            self._chunk_sig = ext[len(_SIG_EXT) :].decode("ascii")
        else:
            size_part = line
        if not _HEX_SIZE.fullmatch(size_part):
            raise _malformed("invalid chunk size")
        size = int(size_part, 16)
        if size > MAX_CHUNK_SIZE:
            raise _malformed(f"chunk larger than {MAX_CHUNK_SIZE} bytes")
        total = self._total + size
        if self._decoded_length is not None and total > self._decoded_length:
            raise _malformed("more data than x-amz-decoded-content-length")
        self._total = total
        if size:
            self._remaining = size
            self._sha = hashlib.sha256()
            self._state = _DATA
            return
        if self._signed:
            self._verify_chunk(EMPTY_SHA256)
        self._state = _TRAILER if self._has_trailer else _FINAL_CRLF

    def _verify_chunk(self, data_sha256: str) -> None:
        signing = self._signing
        assert signing is not None
        to_sign = f"{self._prefix}{self._prev_sig}\n{EMPTY_SHA256}\n{data_sha256}"
        expected = hmac.digest(signing.signing_key, to_sign.encode(), "sha256").hex()
        if not hmac.compare_digest(expected, self._chunk_sig):
            raise _bad_signature()
        self._prev_sig = self._chunk_sig

    def _trailer_line(self, line: bytes) -> None:
        if not line:
            if self._signed and not self._trailer_sig_seen:
                raise _bad_signature()
            self._state = _DONE
            return
        if self._trailer_sig_seen:
            raise _bad_trailer("data after x-amz-trailer-signature")
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            raise _bad_trailer("trailer is not ASCII") from None
        name, sep, value = text.partition(":")
        name = name.strip().lower()
        value = value.strip()
        if not sep or not _TRAILER_NAME.fullmatch(name):
            raise _bad_trailer("trailer line is not 'name:value'")
        if name == _TRAILER_SIG:
            if not self._signed:
                raise _bad_trailer("x-amz-trailer-signature in an unsigned body")
            self._verify_trailer(value)
            return
        if name in self._trailers or len(self._trailers) >= MAX_TRAILERS:
            raise _bad_trailer("repeated or too many trailers")
        if name not in self._declared:
            raise _bad_trailer(f"{name} was not declared in x-amz-trailer")
        self._trailers[name] = value

    def _verify_trailer(self, provided: str) -> None:
        signing = self._signing
        assert signing is not None
        canonical = "".join(f"{n}:{self._trailers[n]}\n" for n in sorted(self._trailers))
        to_sign = (
            f"AWS4-HMAC-SHA256-TRAILER\n{signing.amz_date}\n{signing.scope}\n{self._prev_sig}\n"
            f"{hashlib.sha256(canonical.encode()).hexdigest()}"
        )
        expected = hmac.digest(signing.signing_key, to_sign.encode(), "sha256").hex()
        if not hmac.compare_digest(expected, provided):
            raise _bad_signature()
        self._trailer_sig_seen = True

    # ------------------------------------------------------------------ the end

    def finish(self) -> Trailers:
        """Check that the body ended properly; return its trailers."""
        if self._error is not None:
            raise self._error
        try:
            return self._finish()
        except S3Error as err:
            self._poison(err)
            raise

    def _finish(self) -> Trailers:
        state = self._state
        if state == _TRAILER and not self._line and (self._trailers or self._trailer_sig_seen):
            # Everything arrived but the blank line that closes the trailer section.
            if self._signed and not self._trailer_sig_seen:
                raise _bad_signature()
            state = self._state = _DONE
        if state != _DONE:
            raise _incomplete()
        if self._decoded_length is not None and self._total != self._decoded_length:
            raise _incomplete()
        missing = sorted(self._declared - self._trailers.keys())
        if missing:
            raise _bad_trailer(f"declared trailer {', '.join(missing)} is missing")
        return Trailers(self._trailers)
