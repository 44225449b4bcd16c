"""``inventory`` end to end on moto and rclone (metadata and sidecar envelopes).

Objects under two keys (one rotated to a second version), legacy plaintext on an encrypted
path and plaintext on an unencrypted path: the CLI job and the admin API count objects and
bytes per key URI, version and provider, and the plaintext.  It reads envelopes only:
through a counting front in front of the backend it issues no GET of any object body, and
it needs no KMS (the key files are unreadable while it runs).  The admin API answers the
latest inventory of the bucket, also one made by the CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import Config
from proxy.wire.reserved import RESERVED_PREFIX
from tests.fakes import LoopThread
from tests.servers import ProxyThread, Server, new_keyfile, proxy_config
from tests.test_admin_api import TOKEN, call, wait_op
from tests.test_jobs import _write_config, new_bucket


class CountingFront:
    """A transparent HTTP front that counts requests by (method, path, has-query)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.requests: Counter[tuple[str, str, bool]] = Counter()
        self._lock = threading.Lock()
        self._thread = LoopThread("counting-front")
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self.requests[(request.method, request.path, bool(request.query_string))] += 1
        assert self._session is not None
        body = await request.read()
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            data=body,
            headers=dict(request.headers),  # Host too: the request is signed for it
            allow_redirects=False,
        ) as resp:
            payload = await resp.read()
            headers = {
                k: v
                for k, v in resp.headers.items()
                if k.lower() not in ("transfer-encoding", "content-encoding", "connection")
            }
            return web.Response(status=resp.status, body=payload, headers=headers)

    def start(self) -> None:
        self._thread.start()

        async def up() -> int:
            self._session = aiohttp.ClientSession(auto_decompress=False)
            app = web.Application(client_max_size=1024**3)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            server: Any = site._server
            return int(server.sockets[0].getsockname()[1])

        self.port = self._thread.run(up())

    def stop(self) -> None:
        async def down() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
            if self._session is not None:
                await self._session.close()

        self._thread.run(down())
        self._thread.stop()


@pytest.fixture
def front(backend: Server) -> Iterator[CountingFront]:
    f = CountingFront(backend.url)
    f.start()
    try:
        yield f
    finally:
        f.stop()


def _setup(direct: Any, backend: Server, tmp_path: Path) -> tuple[Config, str, dict[str, Any]]:
    k1 = new_keyfile(tmp_path / "k1.json")
    k2 = new_keyfile(tmp_path / "k2.json")
    bucket = new_bucket(direct, "inv")
    direct.put_object(Bucket=bucket, Key="a/legacy.txt", Body=b"L" * 11)  # before encryption
    config = proxy_config(
        backend.url,
        k1,
        admin={"host": "127.0.0.1", "port": 0, "token": TOKEN},
        specs={"control_bucket": f"ctl-{bucket}", "poll_interval": 0.2},
        audit={"path": str(tmp_path / "audit.jsonl")},
        encryption={
            "default": {"key": f"local://{k1}"},
            "buckets": {f"{bucket}/b/": {"key": f"local://{k2}"}},
            "unencrypted_paths": [f"{bucket}/tmp/**"],
        },
    )
    with ProxyThread(config) as p:
        c = p.client()
        for i in range(3):
            c.put_object(Bucket=bucket, Key=f"a/{i}", Body=b"a" * (100 + i))
        for i in range(2):
            c.put_object(Bucket=bucket, Key=f"b/{i}", Body=b"b" * 1000)
        c.put_object(Bucket=bucket, Key="tmp/scratch", Body=b"t" * 7)
        sizes = {
            o["Key"]: o["Size"]
            for o in direct.list_objects_v2(Bucket=bucket)["Contents"]
            if not o["Key"].startswith(RESERVED_PREFIX)
        }
    expected = {
        "keys": {
            f"local://{k1}": {
                "objects": 3,
                "bytes": sum(sizes[f"a/{i}"] for i in range(3)),
                "provider": "local",
            },
            f"local://{k2}": {
                "objects": 2,
                "bytes": sum(sizes[f"b/{i}"] for i in range(2)),
                "provider": "local",
            },
        },
        "plaintext_legacy": {"objects": 1, "bytes": 11},
        "plaintext_allowed": {"objects": 1, "bytes": 7},
    }
    return config, bucket, expected


def _check(inv: dict[str, Any], expected: dict[str, Any]) -> None:
    for uri, want in expected["keys"].items():
        got = inv["keys"][uri]
        assert {k: got[k] for k in want} == want, uri
        assert sum(v["objects"] for v in got["versions"].values()) == want["objects"]
        assert got["sole"] == {"objects": want["objects"], "bytes": want["bytes"]}
    assert set(inv["keys"]) == set(expected["keys"])
    assert inv["plaintext_legacy"] == expected["plaintext_legacy"]
    assert inv["plaintext_allowed"] == expected["plaintext_allowed"]


def test_inventory_cli_reads_envelopes_only(
    backend: Server, direct: Any, front: CountingFront, tmp_path: Path
) -> None:
    config, bucket, expected = _setup(direct, backend, tmp_path)
    # the job talks to the backend through the counting front, and no key is readable
    via_front = config.model_copy(
        update={"backend": config.backend.model_copy(update={"endpoint": front.url})}
    )
    cfg = _write_config(via_front, tmp_path / "c.yaml")
    for k in ("k1.json", "k2.json"):
        (tmp_path / k).chmod(0o000)
    try:
        out = subprocess.run(
            [
                *(sys.executable, "-m", "proxy.cli", "job", "inventory"),
                *("--config", str(cfg), "--bucket", bucket, "--no-progress", "--json"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        for k in ("k1.json", "k2.json"):
            (tmp_path / k).chmod(0o600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)  # --json prints the summary as JSON only
    assert summary["outcomes"] == {"encrypted": 5, "plaintext-allowed": 1, "plaintext-legacy": 1}
    _check(summary["inventory"], expected)
    assert "inventory" in summary
    body_gets = [
        (m, path)
        for (m, path, has_query) in front.requests
        if m == "GET"
        and not has_query
        and not path.split("/", 2)[-1].startswith(RESERVED_PREFIX)
        and path.startswith(f"/{bucket}/")
    ]
    assert body_gets == []
    heads = sum(n for (m, path, _), n in front.requests.items() if m == "HEAD")
    assert heads >= 7

    # the admin API answers the latest inventory, here the one the CLI stored
    with ProxyThread(config) as p:
        r = call(p, "GET", f"/v1/buckets/{bucket}/inventory")
        assert r.status_code == 200
        assert r.json()["source"] == "cli"
        _check(r.json()["inventory"], expected)


def test_inventory_through_the_admin_api(backend: Server, direct: Any, tmp_path: Path) -> None:
    config, bucket, expected = _setup(direct, backend, tmp_path)
    with ProxyThread(config) as p:
        assert call(p, "GET", f"/v1/buckets/{bucket}/inventory").status_code == 404
        r = call(p, "POST", f"/v1/buckets/{bucket}/jobs", {"job": "inventory"})
        assert r.status_code == 200
        op = wait_op(p, r.json()["name"])
        assert "error" not in op, op
        _check(op["response"]["inventory"], expected)
        latest = call(p, "GET", f"/v1/buckets/{bucket}/inventory").json()
        assert latest["operation"] == r.json()["name"]
        _check(latest["inventory"], expected)
