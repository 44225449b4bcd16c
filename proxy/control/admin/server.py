"""Admin listener, never on the S3 port (where ``/metrics`` would be a bucket).

``/healthz`` - the process serves; ``/readyz`` - every configured key is available
(otherwise 503 naming the key and why); ``/metrics`` - Prometheus text format.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from proxy.kms.keys import KeyService
from proxy.metrics import Metrics

WORKERS_READY: web.AppKey[Callable[[], list[str]]] = web.AppKey("workers_ready")
"""Set by ``serve --workers``: why the host's workers are not all serving (empty: they are)."""


def make_admin_app(metrics: Metrics, keys: KeyService) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        status = keys.status()
        workers = request.app.get(WORKERS_READY)
        down = workers() if workers is not None else []
        # Not ready when a key is revoked (denied) or was never reachable; a KMS that
        # stopped answering leaves the proxy ready while cached keys still serve.
        unavailable = {
            uri: {"state": s.state, "reason": s.reason}
            for uri, s in status.items()
            if s.state in ("revoked", "unknown")
        }
        body: dict[str, object] = {
            "ready": not unavailable and not down,
            "keys": {
                uri: {
                    "available": s.available,
                    "state": s.state,
                    "reason": s.reason,
                    "since": s.since,
                }
                for uri, s in status.items()
            },
        }
        if down:
            body["workers"] = down
        return web.json_response(body, status=503 if unavailable or down else 200)

    async def metrics_view(_: web.Request) -> web.Response:
        body, ctype = metrics.render()
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = ctype
        return resp

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    return app
