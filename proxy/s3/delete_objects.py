"""DeleteObjects (``POST /bucket?delete``): the client's document is never forwarded.

The proxy parses the client's XML itself (``parse_client``: no DTDs, no entities), checks
every key like any single-object request (``check_key``), answers refused keys (the
reserved prefix in any spelling, keys over 1,024 bytes) as per-key errors, and sends the
backend a document of its own with only the allowed keys.  The backend is always asked
for a verbose answer, so ``DeleteOutcome.deleted`` lists every key the backend reports
deleted even when the client asked for ``<Quiet>``.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from typing import Final
from xml.etree import ElementTree

from proxy.backend.client import BackendClient
from proxy.errors import S3Error
from proxy.wire.names import check_key
from proxy.wire.xmldoc import S3_NS, local, malformed_xml, parse_backend, parse_client, serialize

MAX_KEYS: Final = 1000
"""S3's limit of objects per DeleteObjects request (more is MalformedXML)."""


@dataclass(frozen=True)
class DeleteTarget:
    key: str
    version_id: str | None


@dataclass
class DeleteOutcome:
    deleted: list[DeleteTarget] = field(default_factory=list)
    """What the backend reports Deleted: the keys whose per-object state may now go."""
    document: bytes = b""
    """The DeleteResult for the client."""


def parse_request(body: bytes) -> tuple[list[DeleteTarget], bool]:
    """The objects a client's ``<Delete>`` names and its Quiet flag; MalformedXML if bad."""
    root = parse_client(body)
    if local(root.tag) != "Delete":
        raise malformed_xml()
    quiet = False
    targets: list[DeleteTarget] = []
    for el in root:
        name = local(el.tag)
        if name == "Quiet":
            value = (el.text or "").strip().lower()
            if value not in ("true", "false"):
                raise malformed_xml()
            quiet = value == "true"
        elif name == "Object":
            key: str | None = None
            version: str | None = None
            for child in el:
                if local(child.tag) == "Key":
                    key = child.text or ""
                elif local(child.tag) == "VersionId":
                    version = (child.text or "").strip() or None
            if not key:
                raise malformed_xml()
            targets.append(DeleteTarget(key, version))
    if not targets or len(targets) > MAX_KEYS:
        raise malformed_xml()
    return targets, quiet


def _element(tag: str, fields: list[tuple[str, str | None]]) -> ElementTree.Element:
    el = ElementTree.Element(tag)
    for name, value in fields:
        if value is not None:
            ElementTree.SubElement(el, name).text = value
    return el


def backend_document(targets: list[DeleteTarget]) -> bytes:
    root = ElementTree.Element("Delete", {"xmlns": S3_NS})
    ElementTree.SubElement(root, "Quiet").text = "false"
    for t in targets:
        root.append(_element("Object", [("Key", t.key), ("VersionId", t.version_id)]))
    return serialize(root)


async def delete_objects(backend: BackendClient, bucket: str, body: bytes) -> DeleteOutcome:
    """Delete what may be deleted; answer the rest as per-key errors."""
    targets, quiet = parse_request(body)
    allowed: list[DeleteTarget] = []
    refused: list[tuple[DeleteTarget, S3Error]] = []
    for t in targets:
        try:
            check_key(t.key)
        except S3Error as denied:
            refused.append((t, denied))
        else:
            allowed.append(t)
    result = ElementTree.Element("DeleteResult", {"xmlns": S3_NS})
    outcome = DeleteOutcome()
    if allowed:
        doc = backend_document(allowed)
        md5 = base64.b64encode(hashlib.md5(doc).digest()).decode()  # noqa: S324 - Content-MD5
        _, data = await backend.call(
            "POST",
            bucket,
            query=(("delete", ""),),
            headers={"content-type": "application/xml", "content-md5": md5},
            body=doc,
        )
        for el in parse_backend(data):
            name = local(el.tag)
            fields = [(local(c.tag), c.text or "") for c in el]
            if name == "Deleted":
                values = dict(fields)
                if "Key" in values:
                    outcome.deleted.append(
                        DeleteTarget(values["Key"], values.get("VersionId") or None)
                    )
                if not quiet:
                    result.append(_element("Deleted", list(fields)))
            elif name == "Error":
                result.append(_element("Error", list(fields)))
    for t, err in refused:
        result.append(
            _element(
                "Error",
                [
                    ("Key", t.key),
                    ("VersionId", t.version_id),
                    ("Code", err.code),
                    ("Message", err.message),
                ],
            )
        )
    outcome.document = serialize(result)
    return outcome
