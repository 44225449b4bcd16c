"""The S3 front end: one catch-all route, routing, error mapping, request metrics.

Every answer is S3's: a request aiohttp's HTTP parser rejects (oversized or malformed header
lines, too many headers, a bad request line), a path no route matches, an ``Expect`` it
does not know, or a bug that escapes a handler all get an S3 XML error (``S3RequestHandler``
and ``s3_errors_middleware``), never the parser's plain text.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import HttpVersion11, hdrs, web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, InvalidURLError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from proxy.errors import CmekError, S3Error
from proxy.metrics import Metrics
from proxy.s3.accesslog import AccessLogSettings, RequestObserver
from proxy.s3.errors import error_response, new_request_id, to_s3_error
from proxy.s3.handlers import S3Handlers
from proxy.s3.routing import Target, route

log = logging.getLogger(__name__)


MAX_HEADER_SECTION = 8192
"""S3's limit on a request's header section, in bytes."""
MAX_USER_METADATA = 2048
"""S3's limit on user metadata (``x-amz-meta-*`` names without the prefix, plus values)."""


def header_section_too_large() -> S3Error:
    return S3Error(
        "RequestHeaderSectionTooLarge",
        "Your request header section exceeds the maximum allowed size.",
        400,
        extra={"MaxSizeAllowed": str(MAX_HEADER_SECTION)},
    )


def check_request_limits(request: web.Request, target: Target) -> None:
    """S3's size limits on the header section and on user metadata; UTF-8 header values."""
    size = 0
    meta = 0
    for name, value in request.raw_headers:
        size += len(name) + len(value) + 4
        if name[:11].lower() == b"x-amz-meta-":
            meta += len(name) - 11 + len(value)
    if size > MAX_HEADER_SECTION:
        raise header_section_too_large()
    for text in request.headers.values():
        try:  # bytes that are not UTF-8 arrive as lone surrogates and could never be sent on
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise S3Error("InvalidArgument", "A header value is not valid UTF-8.", 400) from None
    if meta > MAX_USER_METADATA and target.key is not None and request.method in ("PUT", "POST"):
        raise S3Error(
            "MetadataTooLarge",
            "Your metadata headers exceed the maximum allowed metadata size.",
            400,
            extra={"MaxSizeAllowed": str(MAX_USER_METADATA)},
        )


def parser_error(status: int, exc: BaseException | None) -> S3Error:
    """What S3 answers to a request aiohttp could not parse (or a handler's stray bug)."""
    if status >= 500 or not isinstance(exc, HttpProcessingError):
        return S3Error("InternalError", "We encountered an internal error. Please try again.", 500)
    if isinstance(exc, LineTooLong) or "Too many headers" in str(exc.message):
        return header_section_too_large()
    if isinstance(exc, BadHttpMethod):
        return S3Error("MethodNotAllowed", "The specified method is not allowed", 405)
    if isinstance(exc, InvalidURLError):
        return S3Error("InvalidURI", "Couldn't parse the specified URI.", 400)
    return S3Error("InvalidRequest", "The request could not be parsed as HTTP/1.1", 400)


class S3RequestHandler(RequestHandler):
    """aiohttp's connection handler, answering what it rejects in S3 XML."""

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            self.log_exception("Error handling request", exc_info=exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started: cannot send an error")
        err = parser_error(status, exc)
        resp = error_response(err, resource="/", request_id=new_request_id())
        resp.force_close()
        return resp


class S3Server(web.Server):
    def __call__(self) -> RequestHandler:
        return S3RequestHandler(self, loop=self._loop, **self._kwargs)


class S3AppRunner(web.AppRunner):
    """An AppRunner whose connections answer parser errors in S3 XML."""

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return S3Server(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **plain._kwargs,
        )


async def expect_handler(request: web.Request) -> None:
    """``100-continue`` answered as aiohttp does; any other ``Expect`` ignored, as S3 does."""
    expect = request.headers.get(hdrs.EXPECT, "").lower()
    if request.version == HttpVersion11 and expect == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the real response has not started


@web.middleware
async def s3_errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own HTTP errors (no route matched, bad method for it) as S3 XML."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "NoSuchKey", 405: "MethodNotAllowed", 413: "EntityTooLarge"}.get(
            exc.status, "InvalidRequest"
        )
        return error_response(
            S3Error(code, exc.reason, exc.status),
            resource=request.path,
            request_id=new_request_id(),
            head=request.method == "HEAD",
        )


def make_s3_app(
    handlers: S3Handlers,
    metrics: Metrics,
    *,
    virtual_host_domain: str | None,
    access_log: AccessLogSettings | None = None,
) -> web.Application:
    settings = access_log or AccessLogSettings()

    async def handle(request: web.Request) -> web.StreamResponse:
        with RequestObserver(request, new_request_id(), metrics, settings) as obs:
            resource = request.path
            try:
                target = route(request, virtual_host_domain)
                obs.routed(target)
                check_request_limits(request, target)
                resource = target.resource
                resp = await handlers.dispatch(request, target)
                obs.answered(resp)
                resp.headers["x-amz-request-id"] = obs.request_id
                return resp
            except CmekError as exc:
                err = to_s3_error(exc)
                obs.failed(err)
                if err.status >= 500:
                    log.warning(
                        "%s %s -> %s (%s)",
                        request.method,
                        obs.operation,
                        err.code,
                        type(exc).__name__,
                    )
                return error_response(
                    err, resource=resource, request_id=obs.request_id, head=request.method == "HEAD"
                )

    app = web.Application(client_max_size=0, middlewares=[s3_errors_middleware])
    # [\s\S]: a decoded path may hold any character, line breaks included
    app.router.add_route("*", r"/{tail:[\s\S]*}", handle, expect_handler=expect_handler)
    return app
