"""Signing outbound requests (the backend client) with the same canonicalisation."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from urllib.parse import urlsplit

from proxy.wire.sigv4.canonical import (
    ALGORITHM,
    AMZ_DATE_FORMAT,
    TERMINATOR,
    UNSIGNED_HEADERS,
    Credentials,
    SigningKeyCache,
    _canonical,
    _canonical_query,
    _derive,
    signature,
    string_to_sign,
)


def _host_from_split(scheme: str, netloc: str) -> str:
    host = netloc.rpartition("@")[2].lower()
    if host.endswith(":80") and scheme == "http":
        return host[:-3]
    if host.endswith(":443") and scheme == "https":
        return host[:-4]
    return host


def sign_headers(
    method: str,
    url: str,
    headers: Mapping[str, str],
    payload_hash: str,
    creds: Credentials,
    region: str,
    service: str = "s3",
    *,
    now: datetime,
    key_cache: SigningKeyCache | None = None,
) -> dict[str, str]:
    """Sign an outbound request; return the headers to add (lower-case names).

    ``url`` is the full, already-encoded URL (path used as is; query canonicalised
    as described in the module docstring). Every header in ``headers`` except the
    hop-by-hop ones in :data:`UNSIGNED_HEADERS` is signed; ``host`` is derived from
    the URL when absent. Returns ``authorization``, ``x-amz-date``,
    ``x-amz-content-sha256`` and, when it was missing, ``host``.
    """
    split = urlsplit(url)
    amz_date = now.astimezone(UTC).strftime(AMZ_DATE_FORMAT)
    lowered: dict[str, str] = {}
    for name, value in headers.items():
        lname = name.lower()
        if lname in UNSIGNED_HEADERS:
            continue
        norm = " ".join(value.split())
        prev = lowered.get(lname)
        lowered[lname] = norm if prev is None else f"{prev},{norm}"
    added: dict[str, str] = {}
    if "host" not in lowered:
        added["host"] = lowered["host"] = _host_from_split(split.scheme, split.netloc)
    added["x-amz-date"] = lowered["x-amz-date"] = amz_date
    added["x-amz-content-sha256"] = lowered["x-amz-content-sha256"] = payload_hash
    signed = sorted(lowered)
    date = amz_date[:8]
    scope = f"{date}/{region}/{service}/{TERMINATOR}"
    canonical = _canonical(
        method,
        split.path,
        _canonical_query(split.query),
        lowered,
        signed,
        payload_hash,
    )
    key = _derive(key_cache, creds.secret_key, date, region, service)
    sig = signature(key, string_to_sign(amz_date, scope, canonical))
    added["authorization"] = (
        f"{ALGORITHM} Credential={creds.access_key}/{scope}, "
        f"SignedHeaders={';'.join(signed)}, Signature={sig}"
    )
    return added
