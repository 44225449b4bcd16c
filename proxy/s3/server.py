"""The S3 front end: one catch-all route, routing, error mapping; request metrics and the
access log in ``proxy.s3.accesslog``."""

from __future__ import annotations

import logging

from aiohttp import web

from proxy.errors import CmekError
from proxy.metrics import Metrics
from proxy.s3.accesslog import AccessLogSettings, RequestObserver
from proxy.s3.errors import error_response, new_request_id, to_s3_error
from proxy.s3.handlers import S3Handlers
from proxy.s3.routing import route

log = logging.getLogger(__name__)


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

    app = web.Application(client_max_size=0)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app
