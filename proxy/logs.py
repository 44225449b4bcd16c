"""Log output: ``text`` (one readable line) or ``json`` (one JSON object per line).

Every record gets the ``request_id`` of the S3 request it is about (``proxy.reqctx``), so
the ``x-amz-request-id`` a client reports finds every line of its request. Access and
authentication lines carry their fields in ``extra={"fields": {...}}``; the JSON format puts
them at the top level, the text format appends them as ``key=value``.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Final, Literal

from proxy.reqctx import RequestIdFilter

LogFormat = Literal["text", "json"]
FORMATS: Final = ("text", "json")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[
                :-3
            ]
            + "Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            out["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update({k: v for k, v in fields.items() if k not in out})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            line += f" request_id={request_id}"
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and record.name == "proxy.auth":
            line += "".join(
                f" {k}={json.dumps(v, default=str)}" for k, v in fields.items() if k != "event"
            )
        return line


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the moment of each record (as logging's own
    last-resort handler does), never to a stream that was replaced and closed since."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure(fmt: LogFormat, level: str = "INFO") -> None:
    """One handler on the root logger, to stderr, in the chosen format."""
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
