"""The S3 front end: one catch-all route, routing, error mapping, request metrics."""

from __future__ import annotations

import logging
import time

from aiohttp import web

from proxy.errors import CmekError
from proxy.metrics import Metrics
from proxy.s3.errors import error_response, new_request_id, to_s3_error
from proxy.s3.handlers import S3Handlers
from proxy.s3.routing import Target, route

log = logging.getLogger(__name__)


def operation_name(method: str, target: Target) -> str:
    """A bounded label for metrics: never bucket or key names."""
    if target.bucket is None:
        return "ListBuckets" if method == "GET" else "Service" + method.title()
    if target.key is None:
        if method == "GET":
            return "ListObjects" if not target.query or target.has("list-type") else "BucketGet"
        return {"PUT": "CreateBucket", "DELETE": "DeleteBucket", "HEAD": "HeadBucket"}.get(
            method, "Bucket" + method.title()
        )
    return {
        "GET": "GetObject",
        "HEAD": "HeadObject",
        "PUT": "PutObject",
        "DELETE": "DeleteObject",
        "POST": "ObjectPost",
    }.get(method, "Object" + method.title())


def make_s3_app(
    handlers: S3Handlers, metrics: Metrics, *, virtual_host_domain: str | None
) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = new_request_id()
        op = "Unknown"
        resource = request.path
        status = 500
        try:
            target = route(request, virtual_host_domain)
            op = operation_name(request.method, target)
            resource = target.resource
            resp = await handlers.dispatch(request, target)
            status = resp.status
            resp.headers["x-amz-request-id"] = request_id
            if request.content_length:
                metrics.s3_bytes_in.inc(request.content_length)
            if resp.content_length and request.method == "GET":
                metrics.s3_bytes_out.inc(resp.content_length)
            return resp
        except CmekError as exc:
            err = to_s3_error(exc)
            status = err.status
            if err.status >= 500:
                log.warning("%s %s -> %s (%s)", request.method, op, err.code, type(exc).__name__)
            return error_response(
                err, resource=resource, request_id=request_id, head=request.method == "HEAD"
            )
        finally:
            metrics.observe_s3(op, status, time.perf_counter() - started)

    app = web.Application(client_max_size=0)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app
