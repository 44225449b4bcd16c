"""Raw HTTP/1.1 over a socket: requests exactly as written (odd paths, broken headers).

``signed`` signs a request target as it will be sent (no normalisation by a client library),
``exchange`` sends bytes and reads one response with a deadline, so a test sees exactly what
the proxy answers to what no well-behaved client would send.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from xml.etree import ElementTree

from proxy.wire.sigv4 import Credentials, sign_headers
from tests.servers import CLIENT_AK, CLIENT_SK, REGION

TIMEOUT = 20.0


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    raw_head: bytes = field(repr=False, default=b"")

    @property
    def code(self) -> str:
        """The S3 error code of an XML error body ("" when the body is not one)."""
        try:
            root = ElementTree.fromstring(self.body)
        except ElementTree.ParseError:
            return ""
        return root.findtext("Code") or ""

    def is_s3_xml(self) -> bool:
        return self.headers.get("content-type", "").startswith("application/xml")


def signed(
    host: str,
    method: str,
    target: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    unsigned_payload: bool = False,
) -> bytes:
    """A whole SigV4-signed request for ``target`` (raw path and query, sent as is)."""
    extra = dict(headers or {})
    payload = "UNSIGNED-PAYLOAD" if unsigned_payload else hashlib.sha256(body).hexdigest()
    to_sign = {"host": host, **{k.lower(): v for k, v in extra.items()}}
    auth = sign_headers(
        method,
        f"http://{host}{target}",
        to_sign,
        payload,
        Credentials(CLIENT_AK, CLIENT_SK),
        REGION,
        now=datetime.now(UTC),
    )
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    lines += [f"{k}: {v}" for k, v in auth.items() if k != "host"]
    framed = any(k.lower() in ("content-length", "transfer-encoding") for k in extra)
    if (body or method in ("PUT", "POST")) and not framed:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


def exchange(host: str, data: bytes, *, timeout: float = TIMEOUT, head: bool = False) -> Reply:
    """Send ``data`` and read one response; raises TimeoutError if none comes in time."""
    name, _, port = host.partition(":")
    deadline = time.monotonic() + timeout
    with socket.create_connection((name, int(port)), timeout=timeout) as sock:
        # the server may answer and close before reading everything
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        buf = b""

        def more() -> bool:
            nonlocal buf
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no complete response in time")
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            except TimeoutError:
                raise TimeoutError("no complete response in time") from None
            buf += chunk
            return bool(chunk)

        status = 100
        while status == 100:  # an interim 100 Continue: the real answer follows
            while b"\r\n\r\n" not in buf:
                if not more():
                    raise ConnectionError(f"connection closed before a response: {buf[:200]!r}")
            raw_head, _, buf = buf.partition(b"\r\n\r\n")
            lines = raw_head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if head or status in (204, 304):
            return Reply(status, headers, b"", raw_head)
        if "content-length" in headers:
            need = int(headers["content-length"])
            while len(buf) < need:
                if not more():
                    raise ConnectionError("connection closed inside the body")
            return Reply(status, headers, buf[:need], raw_head)
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                while b"\r\n" not in buf:
                    if not more():
                        raise ConnectionError("connection closed inside a chunk")
                size_line, _, buf = buf.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                while len(buf) < size + 2:
                    if not more():
                        raise ConnectionError("connection closed inside a chunk")
                body, buf = body + buf[:size], buf[size + 2 :]
                if size == 0:
                    return Reply(status, headers, body, raw_head)
        while more():
            pass
        return Reply(status, headers, buf, raw_head)

