"""What header and query-string verification share: S3 errors, scope, date, skew, lookup."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

from proxy.errors import S3Error
from proxy.wire.sigv4.canonical import (
    _AMZ_DATE,
    _CREDENTIAL_HINT,
    _HEADER_NAME,
    _MALFORMED,
    _SCOPE_DATE,
    ALGORITHM,
    AMZ_DATE_FORMAT,
    ECDSA_ALGORITHM,
    TERMINATOR,
    Credentials,
)


def _malformed(detail: str) -> S3Error:
    return S3Error("AuthorizationHeaderMalformed", f"{_MALFORMED}; {detail}", 400)


def _query_malformed(detail: str) -> S3Error:
    return S3Error("AuthorizationQueryParametersError", detail, 400)


def _unsupported_algorithm(algorithm: str) -> S3Error:
    if algorithm == ECDSA_ALGORITHM:
        return S3Error(
            "NotImplemented",
            "A header you provided implies functionality that is not implemented",
            501,
            extra={"Header": "Authorization"},
        )
    return S3Error(
        "InvalidRequest",
        f"The authorization mechanism you have provided is not supported. Please use {ALGORITHM}.",
        400,
    )


def _split_credential(value: str, fail: Callable[[str], S3Error]) -> tuple[str, ...]:
    parts = value.rsplit("/", 4)
    if len(parts) != 5 or not parts[0] or not all(parts[1:]):
        raise fail(f"the Credential is mal-formed; {_CREDENTIAL_HINT}.")
    if not _SCOPE_DATE.fullmatch(parts[1]):
        raise fail(
            f"incorrect date format '{parts[1]}'. This date in the credential must be in "
            'the format "yyyyMMdd".'
        )
    if parts[4] != TERMINATOR:
        raise fail(f"incorrect terminal '{parts[4]}'. This endpoint uses '{TERMINATOR}'.")
    return tuple(parts)


def _split_signed_headers(value: str, fail: Callable[[str], S3Error]) -> tuple[str, ...]:
    names = tuple(value.split(";"))
    for name in names:
        if not _HEADER_NAME.fullmatch(name):
            raise fail("the SignedHeaders list is mal-formed.")
    return names


def _check_scope(
    region: str, service: str, expected_region: str | None, fail: Callable[[str], S3Error]
) -> None:
    if service != "s3":
        raise fail(f"incorrect service '{service}'. This endpoint belongs to 's3'.")
    if expected_region is not None and region != expected_region:
        err = fail(f"the region '{region}' is wrong; expecting '{expected_region}'")
        err.extra["Region"] = expected_region
        raise err


def _parse_amz_date(value: str) -> datetime | None:
    if not _AMZ_DATE.fullmatch(value):
        return None
    try:
        return datetime(
            int(value[0:4]),
            int(value[4:6]),
            int(value[6:8]),
            int(value[9:11]),
            int(value[11:13]),
            int(value[13:15]),
            tzinfo=UTC,
        )
    except ValueError:
        return None


def _request_time(headers: Mapping[str, str], signed: tuple[str, ...]) -> tuple[str, datetime]:
    """The request's timestamp (``x-amz-date``, else ``Date``) and its ISO8601 basic form."""
    raw = headers.get("x-amz-date")
    name = "x-amz-date"
    when: datetime | None = None
    if raw is not None:
        when = _parse_amz_date(raw.strip())
    else:
        raw = headers.get("date")
        name = "date"
        if raw is not None:
            try:
                when = parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                when = None
            if when is not None and when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
    if when is None:
        raise S3Error(
            "AccessDenied", "AWS authentication requires a valid Date or x-amz-date header", 403
        )
    if name not in signed:
        raise _headers_not_signed([name])
    if raw is not None and name == "x-amz-date":
        return raw.strip(), when
    when = when.astimezone(UTC)
    return when.strftime(AMZ_DATE_FORMAT), when


def _headers_not_signed(names: list[str]) -> S3Error:
    return S3Error(
        "AccessDenied",
        "There were headers present in the request which were not signed",
        403,
        extra={"HeadersNotSigned": ", ".join(names)},
    )


def _check_signed_headers(headers: Mapping[str, str], signed: tuple[str, ...]) -> None:
    """``host`` and every ``x-amz-*`` header present must be signed.

    ``x-amz-content-sha256`` is exempt: its value is the canonical request's last
    line, so it is covered by the signature either way.
    """
    signed_set = set(signed)
    missing: list[str] = []
    if "host" not in signed_set:
        missing.append("host")
    for name in headers:
        lname = name.lower()
        if (
            lname.startswith("x-amz-")
            and lname not in signed_set
            and lname != "x-amz-content-sha256"
            and lname not in missing
        ):
            missing.append(lname)
    if missing:
        raise _headers_not_signed(missing)


def _check_skew(when: datetime, now: datetime, max_skew: timedelta, amz_date: str) -> None:
    if abs(now - when) > max_skew:
        raise S3Error(
            "RequestTimeTooSkewed",
            "The difference between the request time and the current time is too large.",
            403,
            extra={
                "RequestTime": amz_date,
                "ServerTime": now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "MaxAllowedSkewMilliseconds": str(int(max_skew.total_seconds() * 1000)),
            },
        )


def _lookup(lookup: Callable[[str], Credentials | None], access_key: str) -> Credentials:
    creds = lookup(access_key)
    if creds is None:
        raise S3Error(
            "InvalidAccessKeyId",
            "The AWS Access Key Id you provided does not exist in our records.",
            403,
            extra={"AWSAccessKeyId": access_key},
        )
    return creds


def _signature_mismatch(access_key: str) -> S3Error:
    return S3Error(
        "SignatureDoesNotMatch",
        "The request signature we calculated does not match the signature you provided. "
        "Check your key and signing method.",
        403,
        extra={"AWSAccessKeyId": access_key},
    )


def _require_utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now
