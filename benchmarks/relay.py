"""A tiny counting TCP relay, run as its own process between cmek-proxy and its backend.

It forwards bytes unchanged and counts them in both directions, so the harness can measure
how many backend bytes the proxy reads per request without trusting the proxy's own
metrics.  Counters are served as JSON on a separate stats port (``GET /stats``).

    python -m benchmarks.relay --listen-port P --target-port Q --stats-port S
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from collections.abc import Callable
from dataclasses import dataclass

HOST = "127.0.0.1"
_CHUNK = 1 << 18


@dataclass
class Counters:
    """Bytes relayed; ``from_upstream`` is what the backend sent (what the proxy read)."""

    from_upstream: int = 0
    to_upstream: int = 0
    connections: int = 0

    def as_json(self) -> bytes:
        return json.dumps(
            {
                "from_upstream": self.from_upstream,
                "to_upstream": self.to_upstream,
                "connections": self.connections,
            }
        ).encode()


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counters: Counters, up: bool
) -> None:
    try:
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                break
            if up:
                counters.to_upstream += len(data)
            else:
                counters.from_upstream += len(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


async def _handle(
    client_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
    target_port: int,
    counters: Counters,
) -> None:
    counters.connections += 1
    try:
        up_r, up_w = await asyncio.open_connection(HOST, target_port)
    except OSError:
        client_w.close()
        return
    try:
        await asyncio.gather(
            _pump(client_r, up_w, counters, True), _pump(up_r, client_w, counters, False)
        )
    finally:
        for w in (up_w, client_w):
            w.close()
            with contextlib.suppress(ConnectionError, OSError):
                await w.wait_closed()


async def _stats(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counters: Counters
) -> None:
    try:
        # Read the request head (bounded); any request gets the counters.
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        body = counters.as_json()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
        pass
    finally:
        writer.close()


async def serve(listen_port: int, target_port: int, stats_port: int) -> None:
    """Relay until SIGTERM or SIGINT."""
    counters = Counters()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    relay = await asyncio.start_server(
        lambda r, w: _handle(r, w, target_port, counters), HOST, listen_port
    )
    stats = await asyncio.start_server(lambda r, w: _stats(r, w, counters), HOST, stats_port)
    async with relay, stats:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.relay", description=__doc__)
    p.add_argument("--listen-port", type=int, required=True)
    p.add_argument("--target-port", type=int, required=True)
    p.add_argument("--stats-port", type=int, required=True)
    a = p.parse_args(argv)
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(a.listen_port, a.target_port, a.stats_port))


if __name__ == "__main__":
    main()
