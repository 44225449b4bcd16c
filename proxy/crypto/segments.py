"""Encryption and verified decryption of v1 segment streams (docs/FORMAT.md sections 4, 5, 8).

A stream is one byte sequence (a single-part object, or one multipart part) cut into
``SEGMENT_SIZE`` plaintext segments, each stored as ``header(16) || ciphertext || tag(16)``
under AES-256-GCM with a key derived from the object key and the part number.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.crypto.layout import PartLayout
from proxy.crypto.sizes import (
    FORMAT_VERSION,
    HEADER_SIZE,
    MAX_PART,
    SEGMENT_OVERHEAD,
    SEGMENT_SIZE,
    STORED_SEGMENT_SIZE,
    TAG_SIZE,
    segment_count,
)
from proxy.errors import FormatError, IntegrityError

Buffer = bytes | bytearray | memoryview
RandomBytes = Callable[[int], bytes]

OBJECT_KEY_SIZE = 32
FLAG_FINAL = 0x01
MAX_INDEX = 2**32 - 1
RANDOM_SIZE = 8
_NONCE_OFFSET = 4
_STREAM_INFO = b"cmek-proxy/v1/stream"
_HEADER = struct.Struct(">BBHI8s")


def new_object_key() -> bytes:
    """A fresh random 32-byte object key (one per object, one per multipart upload)."""
    return os.urandom(OBJECT_KEY_SIZE)


def _check_object_key(object_key: bytes) -> None:
    if len(object_key) != OBJECT_KEY_SIZE:
        raise ValueError(f"object key must be {OBJECT_KEY_SIZE} bytes")


def stream_key(object_key: bytes, part: int) -> bytes:
    """The AES-256 key of stream ``part`` (0 = single-part object, 1..10000 = multipart part)."""
    _check_object_key(object_key)
    if not 0 <= part <= MAX_PART:
        raise ValueError(f"part number must be in 0..{MAX_PART}")
    hkdf = HKDF(
        algorithm=SHA256(), length=32, salt=None, info=_STREAM_INFO + part.to_bytes(4, "big")
    )
    return hkdf.derive(object_key)


class StreamEncryptor:
    """Encrypts one stream into stored segments.

    ``update`` takes plaintext in chunks of any size and returns zero or more whole stored
    segments. One 8-byte random value is drawn per stream and written into every segment
    header (the nonce is ``index || random``). At most one full plaintext segment is held
    back until it is known whether more data follows, so that the stream's last segment
    carries FINAL; ``finalize`` returns that last segment (an empty one if the stream is
    empty).

    ``plaintext_bytes`` counts plaintext given to ``update``; ``stored_bytes`` counts stored bytes
    returned by ``update`` and ``finalize``.
    """

    def __init__(
        self, object_key: bytes, part: int = 0, *, random_bytes: RandomBytes = os.urandom
    ) -> None:
        self._aead = AESGCM(stream_key(object_key, part))
        self._part = part
        self._random = random_bytes(RANDOM_SIZE)
        if len(self._random) != RANDOM_SIZE:
            raise ValueError(f"random_bytes must return {RANDOM_SIZE} bytes")
        self._index = 0
        self._held = bytearray()
        self._finalized = False
        self.plaintext_bytes = 0
        self.stored_bytes = 0

    def update(self, data: Buffer) -> bytes | bytearray:
        """Add plaintext; return the stored segments that are now complete."""
        if self._finalized:
            raise ValueError("encryptor already finalized")
        view = memoryview(data).cast("B")
        size = len(view)
        if size == 0:
            return b""
        self.plaintext_bytes += size
        pos = 0
        pieces: list[memoryview] = []
        if self._held:
            pos = min(SEGMENT_SIZE - len(self._held), size)
            self._held += view[:pos]
            if pos == size:  # nothing is known to follow the held bytes yet
                return b""
            pieces.append(memoryview(self._held))
        while size - pos > SEGMENT_SIZE:
            pieces.append(view[pos : pos + SEGMENT_SIZE])
            pos += SEGMENT_SIZE
        out = self._seal(pieces, final=False)
        self._held = bytearray(view[pos:])
        return out

    def finalize(self) -> bytes | bytearray:
        """Return the stream's last segment, marked FINAL."""
        if self._finalized:
            raise ValueError("encryptor already finalized")
        self._finalized = True
        out = self._seal([memoryview(self._held)], final=True)
        self._held = bytearray()
        return out

    def _seal(self, pieces: list[memoryview], *, final: bool) -> bytearray:
        # Every segment sealed straight into one buffer (no per-segment outputs joined).
        stored = bytearray(sum(len(p) for p in pieces) + SEGMENT_OVERHEAD * len(pieces))
        view = memoryview(stored)
        pos = 0
        last = len(pieces) - 1
        for number, piece in enumerate(pieces):
            header = self._next_header(final=final and number == last)
            view[pos : pos + HEADER_SIZE] = header
            pos += HEADER_SIZE
            end = pos + len(piece) + TAG_SIZE
            self._aead.encrypt_into(header[_NONCE_OFFSET:], piece, header, view[pos:end])
            pos = end
        self.stored_bytes += len(stored)
        return stored

    def _next_header(self, *, final: bool) -> bytes:
        if self._index > MAX_INDEX:
            raise ValueError("stream exceeds 2**32 segments")
        header = _HEADER.pack(
            FORMAT_VERSION, FLAG_FINAL if final else 0, self._part, self._index, self._random
        )
        self._index += 1
        return header


class StreamDecryptor:
    """Authenticates and decrypts stored segments ``first_segment..last_segment`` of a body.

    ``total_segments`` is the body's segment count (from its stored size). ``update`` takes the
    stored bytes of those segments, in order, in chunks of any size, and returns the plaintext
    of every segment that has fully arrived and passed all checks; ``finalize`` returns the
    plaintext of a short last segment and raises ``IntegrityError`` if bytes are missing or left
    over. After any ``IntegrityError`` the decryptor refuses further use.
    """

    def __init__(
        self,
        object_key: bytes,
        *,
        multipart: bool,
        first_segment: int,
        last_segment: int,
        total_segments: int,
        layout: PartLayout | None = None,
    ) -> None:
        _check_object_key(object_key)
        if not 0 <= first_segment <= last_segment < total_segments:
            raise ValueError("segments must satisfy 0 <= first <= last < total")
        if layout is not None:
            if not multipart:
                raise ValueError("only a multipart body has a part layout")
            if layout.total_segments != total_segments:
                raise IntegrityError(
                    f"the stored size holds {total_segments} segments, the object's bound "
                    f"layout {layout.total_segments}: parts were removed, added or cut"
                )
        self._layout = layout
        self._object_key = bytes(object_key)
        self._multipart = multipart
        self._keys: dict[int, AESGCM] = {}
        self._next = first_segment
        self._last = last_segment
        self._total = total_segments
        self._buf = bytearray()
        self._prev_part: int | None = None
        self._prev_index = 0
        self._prev_random = b""
        self._prev_final = False
        self._failed = False
        self._finalized = False

    def update(self, data: Buffer) -> bytes | bytearray:
        """Add stored bytes; return the plaintext of each segment that authenticated."""
        self._check_usable()
        try:
            return self._update(memoryview(data).cast("B"))
        except IntegrityError:
            self._fail()
            raise

    def finalize(self) -> bytes:
        """Check that exactly the requested segments arrived; return any remaining plaintext."""
        self._check_usable()
        try:
            out = self._finalize()
        except IntegrityError:
            self._fail()
            raise
        self._finalized = True
        return out

    def _check_usable(self) -> None:
        if self._failed:
            raise IntegrityError("stream failed verification earlier")
        if self._finalized:
            raise ValueError("decryptor already finalized")

    def _fail(self) -> None:
        self._failed = True
        self._buf = bytearray()

    def _update(self, view: memoryview) -> bytes | bytearray:
        size = len(view)
        pos = 0
        segments: list[memoryview] = []
        if self._buf:
            pos = min(STORED_SEGMENT_SIZE - len(self._buf), size)
            self._buf += view[:pos]
            if len(self._buf) < STORED_SEGMENT_SIZE:
                return b""
            segments.append(memoryview(self._buf))
            self._buf = bytearray()
        while size - pos >= STORED_SEGMENT_SIZE:
            segments.append(view[pos : pos + STORED_SEGMENT_SIZE])
            pos += STORED_SEGMENT_SIZE
        # Every whole segment opened straight into one buffer; it leaves only if all of them
        # authenticated (an exception drops it, with whatever a failed segment wrote into it).
        out = bytearray(SEGMENT_SIZE * len(segments))
        into = memoryview(out)
        for number, segment in enumerate(segments):
            self._open(segment, into[number * SEGMENT_SIZE : (number + 1) * SEGMENT_SIZE])
        if pos < size:
            if self._next > self._last:
                raise IntegrityError("stored data continues after the last segment")
            self._buf = bytearray(view[pos:])
        return out

    def _finalize(self) -> bytes:
        if self._next > self._last:
            return b""
        if self._next != self._last or self._last != self._total - 1:
            raise IntegrityError(f"stored data ends before segment {self._next} is complete")
        minimum = SEGMENT_OVERHEAD if self._total == 1 else SEGMENT_OVERHEAD + 1
        if len(self._buf) < minimum:
            raise IntegrityError(f"last segment {self._next} is truncated")
        out = self._open(memoryview(self._buf))
        self._buf = bytearray()
        return out

    def _key(self, part: int) -> AESGCM:
        aead = self._keys.get(part)
        if aead is None:
            aead = AESGCM(stream_key(self._object_key, part))
            self._keys[part] = aead
        return aead

    def _open(self, segment: memoryview, into: memoryview | None = None) -> bytes:
        """Check and decrypt one stored segment: its plaintext, or written ``into`` (exactly its
        size; then b"" is returned)."""
        number = self._next
        if number > self._last:
            raise IntegrityError("stored data continues after the last segment")
        version, flags, part, index, random = _HEADER.unpack_from(segment)
        if version != FORMAT_VERSION:
            raise IntegrityError(f"segment {number}: unknown segment version {version}")
        if flags & ~FLAG_FINAL:
            raise IntegrityError(f"segment {number}: reserved flag bits set")
        if self._multipart and not 1 <= part <= MAX_PART:
            raise IntegrityError(f"segment {number}: part number {part} out of range")
        if not self._multipart and part != 0:
            raise IntegrityError(f"segment {number}: part number {part} in a single-part object")
        header = bytes(segment[:HEADER_SIZE])
        try:
            if into is None:
                plaintext = self._key(part).decrypt(
                    header[_NONCE_OFFSET:], segment[HEADER_SIZE:], header
                )
            else:
                plaintext = b""
                self._key(part).decrypt_into(
                    header[_NONCE_OFFSET:], segment[HEADER_SIZE:], header, into
                )
        except InvalidTag:
            raise IntegrityError(f"segment {number}: authentication failed") from None
        final = bool(flags & FLAG_FINAL)
        if self._layout is not None:
            if (part, index, final) != self._layout.position(number):
                raise IntegrityError(
                    f"segment {number}: found part {part} index {index} where the bound layout "
                    "has another segment (parts or segments reordered, duplicated or replaced)"
                )
        elif self._multipart:
            self._check_multipart_position(number, part, index, final)
        else:
            self._check_single_position(number, index, final)
        if self._prev_part == part and random != self._prev_random:
            raise IntegrityError(f"segment {number}: comes from another upload of part {part}")
        self._prev_part = part
        self._prev_random = random
        self._prev_index = index
        self._prev_final = final
        self._next = number + 1
        return plaintext

    def _check_single_position(self, number: int, index: int, final: bool) -> None:
        if index != number:
            raise IntegrityError(f"segment {number}: found segment index {index}")
        if final != (number == self._total - 1):
            raise IntegrityError(f"segment {number}: FINAL flag out of place")

    def _check_multipart_position(self, number: int, part: int, index: int, final: bool) -> None:
        if self._prev_part is None:
            if index > number or (number == 0 and index != 0):
                raise IntegrityError(f"segment {number}: found part {part} index {index}")
        elif self._prev_final:
            if part <= self._prev_part or index != 0:
                raise IntegrityError(
                    f"segment {number}: part {part} index {index} does not start a new part"
                )
        elif part != self._prev_part or index != self._prev_index + 1:
            raise IntegrityError(
                f"segment {number}: part {part} index {index} does not continue part "
                f"{self._prev_part} index {self._prev_index}"
            )
        if number == self._total - 1 and not final:
            raise IntegrityError(f"segment {number}: last segment is not FINAL")


def looks_like_v1(first: Buffer, stored_size: int) -> bool:
    """Whether a body of ``stored_size`` bytes starting with ``first`` may be v1 ciphertext.

    True when the size is one a v1 body can have and the first segment's header parses as
    the first segment of a stream (version 1, no reserved flag, part 0..10000, index 0, and for
    a single-part body FINAL exactly when it is the only segment). Nothing is authenticated:
    this only tells an object whose envelope went missing from plaintext, which it mistakes
    for ciphertext with a chance of about 2**-49.
    """
    view = memoryview(first).cast("B")
    if len(view) < HEADER_SIZE:
        return False
    try:
        total = segment_count(stored_size)
    except FormatError:
        return False
    version, flags, part, index, _ = _HEADER.unpack_from(view)
    if version != FORMAT_VERSION or flags & ~FLAG_FINAL or part > MAX_PART or index != 0:
        return False
    return part != 0 or bool(flags & FLAG_FINAL) == (total == 1)


def opens_first_segment(
    object_key: bytes, stored: Buffer, total_segments: int, *, multipart: bool
) -> bool:
    """Whether ``stored`` (a body's first stored segment, at least) authenticates under
    ``object_key`` as segment 0 of a body of ``total_segments`` segments."""
    view = memoryview(stored).cast("B")[:STORED_SEGMENT_SIZE]
    dec = StreamDecryptor(
        object_key,
        multipart=multipart,
        first_segment=0,
        last_segment=0,
        total_segments=total_segments,
    )
    try:
        dec.update(view)
        dec.finalize()
    except IntegrityError:
        return False
    return True


def encrypt_all(
    object_key: bytes, plaintext: Buffer, part: int = 0, *, random_bytes: RandomBytes = os.urandom
) -> bytes:
    """Encrypt a whole stream at once (for tests and tools)."""
    encryptor = StreamEncryptor(object_key, part, random_bytes=random_bytes)
    return bytes(encryptor.update(plaintext) + encryptor.finalize())


def decrypt_all(
    object_key: bytes,
    stored: Buffer,
    multipart: bool = False,
    layout: PartLayout | None = None,
) -> bytes:
    """Verify and decrypt a whole body at once (for tests and tools)."""
    total = segment_count(len(memoryview(stored).cast("B")))
    decryptor = StreamDecryptor(
        object_key,
        multipart=multipart,
        first_segment=0,
        last_segment=total - 1,
        total_segments=total,
        layout=layout,
    )
    return bytes(decryptor.update(stored) + decryptor.finalize())
