"""Several worker processes behind one S3 port: ``cmek-proxy serve --workers N``.

One Python process is one core. With ``--workers N`` (config ``workers``; default: the CPUs
this process may use, see :func:`available_cpus`) the command becomes a small supervisor:

* **the S3 port** is reserved by the parent with a bound, not listening ``SO_REUSEPORT``
  socket (so ``port: 0`` picks one port for all), and every worker listens on it with
  ``SO_REUSEPORT``: the kernel spreads new connections over the workers;
* **workers** are processes (``multiprocessing`` *spawn*), each with its own event loop,
  backend connection pool and ``KeyService`` (cache and prober: the revocation bound of
  docs/KMS.md holds in every worker; KMS cost: at most one data-key call per key, bucket and
  cache period *per worker*, one probe per key and interval per process);
* **the parent** is the control process: it validates the keys before any worker starts,
  and runs the admin listener (``/healthz``, ``/readyz``, the admin API and its jobs: once per
  host) with one ``/metrics`` merged over all processes (prometheus_client's multiprocess
  mode, in a private directory removed at exit). ``/readyz`` is 503 while a worker is down;
* **a worker that dies** is started again (``cmek_worker_restarts_total``), at most once a
  second per slot;
* **SIGTERM / SIGINT** drain: every worker closes its listening socket (new connections are
  refused) and lets requests in flight finish within ``shutdown_grace`` seconds, then exits;
  the parent waits for them, then closes its own listener.

Specs created through the admin API reach the workers by their spec poller
(``specs.poll_interval``), as they reach other replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Final

from proxy.config import Config, Listen
from proxy.errors import CmekError

if TYPE_CHECKING:  # prometheus_client is imported only once the multiprocess mode is set
    from prometheus_client import Counter

log = logging.getLogger(__name__)

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
READY_TIMEOUT: Final = 120.0
"""How long a starting worker may take to listen (it builds its own backend pool and caches)."""
RESTART_DELAY: Final = 1.0


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup (v2 ``cpu.max``, v1 ``cfs_quota_us``), or None if unlimited."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        q = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        p = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if q <= 0 or p <= 0 else q / p
    return None


def worker_count(config: Config, override: int | None = None) -> int:
    if override is not None:
        return override
    return config.workers if config.workers is not None else available_cpus()


@contextlib.contextmanager
def multiprocess_metrics() -> Iterator[Path]:
    """A private directory for prometheus_client's multiprocess mode, for this run only.

    Must be entered before ``prometheus_client`` is imported (it picks its value class at
    import time); the spawned workers inherit the variable.
    """
    path = Path(tempfile.mkdtemp(prefix="cmek-proxy-metrics-"))
    os.environ[MULTIPROC_ENV] = str(path)
    try:
        yield path
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(path, ignore_errors=True)


def reserve_port(listen: Listen) -> socket.socket:
    """Bind (without listening) the S3 address with SO_REUSEPORT; the workers share it."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        listen.host, listen.port, type=socket.SOCK_STREAM
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        scheme = "https" if listen.tls else "http"
        hint = " (another process listens there; choose another port)" if exc.errno == 98 else ""
        raise CmekError(
            f"cannot listen for S3 on {scheme}://{listen.host}:{listen.port}: {exc.strerror}{hint}"
        ) from None
    return sock


# --------------------------------------------------------------------------- the workers


def _worker_main(
    config: Config, index: int, conn: Connection, log_level: str, log_format: str
) -> None:
    """Entry point of a worker process (spawned): serve S3 until SIGTERM."""
    from proxy.logs import configure
    from proxy.loop import run

    configure(log_format, log_level)  # type: ignore[arg-type]
    # Ctrl-C reaches the whole process group; the parent turns it into one orderly SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    try:
        run(_serve_worker(config, conn))
    finally:
        conn.close()


def _die_with_parent() -> None:
    """A parent killed outright (SIGKILL) must not leave workers serving on its port: the
    kernel sends this worker SIGTERM when the parent dies (Linux ``PR_SET_PDEATHSIG``)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the request took
        os.kill(os.getpid(), signal.SIGTERM)


async def _serve_worker(config: Config, conn: Connection) -> None:
    from proxy.app import build, start

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        # The parent validated every key before starting any worker.
        running = await start(
            config, build(config, validate_keys=False), admin=False, reuse_port=True
        )
    except CmekError as exc:
        _report(conn, ("error", str(exc)))
        return
    try:
        if not _report(conn, ("ready", os.getpid())):
            stop.set()  # the parent stopped waiting (it is stopping): drain and go
        await stop.wait()
    finally:
        await running.close()  # stop accepting, finish requests in flight within the grace


def _report(conn: Connection, message: tuple[str, object]) -> bool:
    """Tell the parent how the start went; False if it no longer listens. A SIGTERM to the
    parent while this worker starts closes its end of the pipe."""
    try:
        conn.send(message)
    except OSError:  # BrokenPipeError and the like
        return False
    return True


# --------------------------------------------------------------------------- the supervisor


@dataclass
class _Slot:
    index: int
    process: BaseProcess | None = None
    started: float = 0.0
    restarts: int = 0


@dataclass
class Supervisor:
    """Starts, watches, restarts and drains the worker processes of one host."""

    config: Config
    count: int
    log_level: str = "INFO"
    log_format: str = "text"
    _slots: list[_Slot] = field(default_factory=list)
    _stopping: bool = False

    def __post_init__(self) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self._slots = [_Slot(i) for i in range(self.count)]

    async def start(self) -> None:
        """Start every worker and wait until each one listens (or fail naming why)."""
        try:
            for slot in self._slots:
                await self._spawn(slot)
        except BaseException:
            await self.stop()
            raise

    async def _spawn(self, slot: _Slot) -> None:
        parent_end, child_end = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=_worker_main,
            args=(self.config, slot.index, child_end, self.log_level, self.log_format),
            name=f"cmek-proxy-worker-{slot.index}",
            daemon=False,
        )
        proc.start()
        child_end.close()
        slot.process, slot.started = proc, time.monotonic()
        try:
            message = await asyncio.to_thread(_wait_ready, parent_end, proc)
        finally:
            parent_end.close()
        if message is not None:
            raise CmekError(f"worker {slot.index} did not start: {message}")
        log.info("worker %d serving (pid %d)", slot.index, proc.pid)

    def pids(self) -> list[int]:
        return [s.process.pid for s in self._slots if s.process is not None and s.process.pid]

    def not_ready(self) -> list[str]:
        """Why the host is not ready (a worker down), for ``/readyz``; empty when all serve."""
        return [
            f"worker {s.index} is not running"
            for s in self._slots
            if s.process is None or not s.process.is_alive()
        ]

    async def watch(self, restarted: Counter | None = None) -> None:
        """Restart workers that die until ``stop``; ``restarted`` is a prometheus Counter."""
        while not self._stopping:
            await asyncio.sleep(0.25)
            for slot in self._slots:
                proc = slot.process
                if self._stopping or proc is None or proc.is_alive():
                    continue
                _forget_metrics(proc.pid)
                wait = RESTART_DELAY - (time.monotonic() - slot.started)
                if wait > 0:
                    await asyncio.sleep(wait)
                if self._stopping:
                    return
                log.warning(
                    "worker %d (pid %s) exited with %s; starting it again",
                    slot.index,
                    proc.pid,
                    proc.exitcode,
                )
                slot.restarts += 1
                if restarted is not None:
                    restarted.inc()
                try:
                    await self._spawn(slot)
                except CmekError as exc:
                    log.error("%s", exc)

    async def stop(self) -> None:
        """SIGTERM every worker, wait for the drain (grace + a little), then kill stragglers."""
        self._stopping = True
        procs = [s.process for s in self._slots if s.process is not None]
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_grace + 5
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for proc in procs:
            if proc.is_alive():
                log.warning("worker pid %s did not drain in time; killing it", proc.pid)
                proc.kill()
            proc.join(5)
            _forget_metrics(proc.pid)


def _wait_ready(conn: Connection, proc: BaseProcess) -> str | None:
    """None once the worker listens; else why not (its message, or how it exited)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if conn.poll(0.1):
            try:
                kind, value = conn.recv()
            except EOFError:
                break
            return None if kind == "ready" else str(value)
        if not proc.is_alive():
            break
    proc.join(0.5)
    if proc.exitcode is None:
        proc.kill()
        return f"not listening after {READY_TIMEOUT:.0f}s"
    return f"exited with status {proc.exitcode}"


def _forget_metrics(pid: int | None) -> None:
    """Gauges of a dead worker leave the merged view (counters keep their counts)."""
    path = os.environ.get(MULTIPROC_ENV)
    if pid is None or not path:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


# --------------------------------------------------------------------------- the parent


async def serve_workers(
    config: Config, count: int, log_level: str = "INFO", log_format: str | None = None
) -> None:
    """The parent of ``serve --workers N``: admin listener, supervisor, drain on a signal."""
    from proxy.app import Running, build, start, start_admin
    from proxy.control.admin.server import WORKERS_READY

    # Signals are ours from the first moment: a SIGTERM while workers start must still stop
    # them (the default action would leave them running without their parent).
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reservation = reserve_port(config.listen)
    port: int = reservation.getsockname()[1]
    listen = config.listen.model_copy(update={"port": port})
    supervisor = Supervisor(
        config.model_copy(update={"listen": listen}),
        count,
        log_level,
        log_format or config.logging.format,
    )
    running: Running | None = None
    admin_listener: Running | None = None
    watcher: asyncio.Task[None] | None = None
    stopped = asyncio.create_task(stop.wait())
    try:
        proxy = build(config)  # the control process validates every key before workers start
        proxy.admin_app[WORKERS_READY] = supervisor.not_ready
        # keys validated, specs read, prober running; the admin listener (and so /healthz)
        # opens only once the workers listen
        running = await start(config, proxy, s3=False, admin=False)
        starting = asyncio.create_task(supervisor.start())
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()  # a signal came first: the workers started so far are stopped
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return
        starting.result()
        admin_listener = await start_admin(config, proxy)
        s3 = "https" if config.listen.tls else "http"
        admin = "https" if config.admin.tls else "http"
        print(
            f"cmek-proxy: S3 on {s3}://{config.listen.host}:{port}, "
            f"admin on {admin}://{config.admin.host}:{admin_listener.admin_port} "
            f"({count} workers)",
            flush=True,
        )
        watcher = asyncio.create_task(supervisor.watch(proxy.metrics.worker_restarts))
        await stopped
    finally:
        stopped.cancel()
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await supervisor.stop()
        if admin_listener is not None:
            await admin_listener.close()
        if running is not None:
            await running.close()
        reservation.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
