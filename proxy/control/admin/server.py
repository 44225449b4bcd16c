"""Admin listener, never on the S3 port (where ``/metrics`` would be a bucket).

``/healthz`` - the process serves; ``/readyz`` - every configured key is available
(otherwise 503 naming the key and why); ``/metrics`` - Prometheus text format.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from proxy.kms.keys import KeyService, KeyStatus
from proxy.metrics import Metrics

WORKERS_READY: web.AppKey[Callable[[], list[str]]] = web.AppKey("workers_ready")
"""Set by ``serve --workers``: why the host's workers are not all serving (empty: they are)."""


def make_admin_app(
    metrics: Metrics,
    keys: KeyService,
    not_ready: Callable[[], dict[str, str]] = dict,
) -> web.Application:
    """``not_ready``: other reasons not to be ready (name -> reason), e.g. specs unread."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        status = keys.status()
        workers = request.app.get(WORKERS_READY)
        down = workers() if workers is not None else []
        # Not ready when a key is revoked (denied), not yet validated (its KMS was
        # unreachable at start) or never used; a KMS that stopped answering after the key
        # was validated leaves the proxy ready while cached keys still serve.
        unavailable = {
            uri: {"state": s.state, "reason": s.reason}
            for uri, s in status.items()
            if s.state == "revoked"
            or (s.state in ("unknown", "pending") and not _covered(keys, status, uri))
        }
        others = not_ready()
        ready = not unavailable and not others and not down
        body: dict[str, object] = {
            "ready": ready,
            "keys": {
                uri: {
                    "available": s.available,
                    "state": s.state,
                    "reason": s.reason,
                    "since": s.since,
                    **(
                        {"replicas": list(keys.groups.replicas_of(uri))}
                        if keys.groups.replicas_of(uri)
                        else {}
                    ),
                }
                for uri, s in status.items()
            },
        }
        if others:
            body["not_ready"] = others
        if down:
            body["workers"] = down
        return web.json_response(body, status=200 if ready else 503)

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


def _covered(keys: KeyService, status: dict[str, KeyStatus], uri: str) -> bool:
    """A key not yet answered for whose replica group has an available member serves (a
    revoked member is never covered: a denial by any replica revokes the key)."""
    group = keys.groups.containing(uri)
    return group is not None and any(
        status[m].state == "available" for m in group if m != uri and m in status
    )
