"""A one-node Ceph cluster with a RADOS Gateway, the production S3 server, for tests.

One monitor, one OSD keeping its objects in memory (``memstore``) and ``radosgw`` on
127.0.0.1 ephemeral ports, all state under ``root``; no systemd, no manager daemon.
Every daemon runs in the foreground as our child and is stopped by its own PID.
Needs the Debian packages ``ceph-mon ceph-osd radosgw`` (scripts/test.sh installs them).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tests.servers import (
    BACKEND_AK,
    BACKEND_SK,
    Server,
    free_port,
    http_ok,
    s3_client,
    wait_until,
)

START_TIMEOUT = 90.0
"""Seconds the whole cluster gets to answer an authenticated ListBuckets."""

BINARIES = ["ceph", "ceph-authtool", "monmaptool", "radosgw-admin"]  # ceph-common
BINARIES += ["ceph-mon", "ceph-osd", "radosgw"]

_CONF = """\
[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {root}/keyring
run dir = {root}/run
admin socket = {root}/run/$cluster-$name.asok
pid file = {root}/run/$cluster-$name.pid
log file = {logdir}/ceph-$name.log
log to stderr = false
err to stderr = true
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon data avail crit = 1
mon warn on pool no redundancy = false
ms async op threads = 2

[mon.a]
mon data = {root}/mon

[osd.0]
osd data = {root}/osd
osd objectstore = memstore
memstore device bytes = 8589934592
osd op num shards = 2
osd op num threads per shard = 1

[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw data = {root}/rgw
rgw thread pool size = 32
rgw gc obj min wait = 60
rgw gc processor period = 60
# Without the metadata cache radosgw keeps no watch on its control objects: a restarted
# radosgw would otherwise stall its first bucket write ~30 s on the dead one's watches.
rgw cache enabled = false
"""

_KEYS = {
    "mon.": ["--cap", "mon", "allow *"],
    "client.admin": ["--cap", "mon", "allow *", "--cap", "osd", "allow *",
                     "--cap", "mgr", "allow *"],
    "osd.0": ["--cap", "mon", "allow profile osd", "--cap", "mgr", "allow profile osd",
              "--cap", "osd", "allow *"],
    "client.rgw": ["--cap", "mon", "allow rw", "--cap", "osd", "allow rwx"],
}  # fmt: skip


class CephError(RuntimeError):
    """The cluster did not come up; the message carries the logs' tails."""


def _check_binaries() -> None:
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        raise CephError(
            f"Ceph is not installed (missing {', '.join(missing)}): "
            "apt-get install ceph-mon ceph-osd radosgw (scripts/test.sh does)"
        )


def _run(argv: Sequence[str], timeout: float = 60) -> str:
    done = subprocess.run(list(argv), capture_output=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise CephError(
            f"{' '.join(argv)} exited {done.returncode}:\n"
            f"{done.stdout.decode(errors='replace')}{done.stderr.decode(errors='replace')}"
        )
    return done.stdout.decode()


def _spawn(name: str, argv: Sequence[str], logdir: Path) -> Server:
    """A daemon in the foreground, its stdout and stderr in ``logdir/ceph-<name>.out.log``."""
    log = logdir / f"ceph-{name}.out.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen(list(argv), stdout=fh, stderr=subprocess.STDOUT)
    return Server(name, proc, "", log)


def _daemon_argv(name: str, conf: Path) -> list[str]:
    argv = {
        "mon": ["ceph-mon", "-i", "a"],
        "osd": ["ceph-osd", "-i", "0"],
        "radosgw": ["radosgw", "-n", "client.rgw"],
    }[name]
    return [*argv, "-f", "-c", str(conf)]


def _tail(path: Path, limit: int = 2500) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no {path.name})"
    return f"--- {path.name}:\n{text[-limit:]}"


def _logs(logdir: Path) -> str:
    """The tails of the daemons' own logs and of their stdout/stderr."""
    return "\n".join(_tail(p) for p in sorted(logdir.glob("ceph-*.log")))


def _wait(check: Callable[[], bool], deadline: float, what: str, daemons: Sequence[Server]) -> None:
    """Until ``check()``, failing at once if a daemon we wait on has exited."""

    def alive_and_ready() -> bool:
        for d in daemons:
            if d.proc.poll() is not None:
                raise CephError(f"{d.name} exited {d.proc.returncode} while waiting for {what}")
        return bool(check())

    wait_until(alive_and_ready, max(deadline - time.monotonic(), 0.1), what)


def _wait_s3(server: Server, daemons: Sequence[Server], deadline: float) -> None:
    """Until an authenticated ListBuckets succeeds."""
    s3 = s3_client(server.url, BACKEND_AK, BACKEND_SK)

    def lists() -> bool:
        if not http_ok(server.url):
            return False
        try:
            s3.list_buckets()
        except Exception:
            return False
        return True

    _wait(lists, deadline, "radosgw ListBuckets", daemons)


def _ceph(conf: Path, *args: str) -> str:
    return _run(["ceph", "-c", str(conf), "--connect-timeout", "10", *args])


@contextmanager
def rgw_server(root: Path, logdir: Path) -> Iterator[Server]:
    """A fresh cluster under ``root``; radosgw's URL serves S3 for BACKEND_AK/BACKEND_SK.

    The :class:`Server` is radosgw's; ``extra["daemons"]`` are all three (radosgw last),
    ``extra["started_in"]`` the seconds the cluster took to come up.
    """
    _check_binaries()
    began = time.monotonic()
    daemons: list[Server] = []
    try:
        try:
            server = _start(root, logdir, daemons, began + START_TIMEOUT)
        except Exception as e:  # whatever failed, say so with the daemons' logs
            raise CephError(f"Ceph RGW did not come up: {e!r}\n{_logs(logdir)}") from None
        server.extra["started_in"] = time.monotonic() - began
        yield server
    finally:
        for d in reversed(daemons):
            d.stop()


def revive(server: Server) -> bool:
    """Restart radosgw on its port if its process has ended; True if it had to.

    radosgw 16.2 aborts on some requests; a proxy already pointed at it carries on.
    """
    if server.proc.poll() is None:
        return False
    conf: Path = server.extra["conf"]
    logdir: Path = server.extra["logdir"]
    server.proc = _spawn("radosgw", _daemon_argv("radosgw", conf), logdir).proc
    try:
        _wait_s3(server, server.extra["daemons"], time.monotonic() + START_TIMEOUT)
    except (CephError, TimeoutError) as e:
        raise CephError(f"radosgw did not come back: {e}\n{_logs(logdir)}") from None
    return True


def _start(root: Path, logdir: Path, daemons: list[Server], deadline: float) -> Server:
    """Configure, start and wait for mon, OSD and radosgw; each is appended to ``daemons``."""
    root.mkdir(parents=True, exist_ok=True)
    logdir.mkdir(parents=True, exist_ok=True)
    for sub in ("run", "mon", "osd", "rgw"):
        (root / sub).mkdir(exist_ok=True)
    fsid, osd_uuid = str(uuid.uuid4()), str(uuid.uuid4())
    mon_port, rgw_port = free_port(), free_port()
    conf = root / "ceph.conf"
    conf.write_text(
        _CONF.format(fsid=fsid, mon_port=mon_port, rgw_port=rgw_port, root=root, logdir=logdir)
    )
    keyring = root / "keyring"  # every daemon's key; the monitor imports them at --mkfs
    for i, (name, caps) in enumerate(_KEYS.items()):
        create = ["--create-keyring"] if i == 0 else []
        _run(["ceph-authtool", str(keyring), *create, "--gen-key", "-n", name, *caps])
    monmap = str(root / "monmap")
    _run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v2:127.0.0.1:{mon_port}]",
          monmap])  # fmt: skip
    _run(["ceph-mon", "-c", str(conf), "-i", "a", "--mkfs", "--monmap", monmap,
          "--keyring", str(keyring)])  # fmt: skip
    daemons.append(_spawn("mon", _daemon_argv("mon", conf), logdir))
    _wait(lambda: _answers(conf), deadline, "ceph-mon", daemons)

    osd_id = _ceph(conf, "osd", "new", osd_uuid).strip()
    if osd_id != "0":
        raise CephError(f"ceph osd new gave id {osd_id!r}, expected 0")
    _run(["ceph-osd", "-c", str(conf), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid])
    daemons.append(_spawn("osd", _daemon_argv("osd", conf), logdir))
    _wait(lambda: _osd_up(conf), deadline, "ceph-osd up", daemons)

    rgw = _spawn("radosgw", _daemon_argv("radosgw", conf), logdir)
    server = Server("ceph", rgw.proc, f"http://127.0.0.1:{rgw_port}", rgw.log)
    server.extra.update(conf=conf, logdir=logdir, daemons=daemons)
    daemons.append(server)
    _wait(lambda: http_ok(server.url), deadline, "radosgw HTTP", daemons)
    _run(["radosgw-admin", "-c", str(conf), "user", "create", "--uid", "cmek-test",
          "--display-name", "cmek-proxy tests", "--access-key", BACKEND_AK,
          "--secret", BACKEND_SK])  # fmt: skip
    _wait_s3(server, daemons, deadline)
    _warm_up(server)
    return server


def _warm_up(server: Server) -> None:
    """The first bucket and object make radosgw create its index and data pools (~3 s)."""
    s3 = s3_client(server.url, BACKEND_AK, BACKEND_SK)
    s3.create_bucket(Bucket="cmek-warm-up")
    s3.put_object(Bucket="cmek-warm-up", Key="k", Body=b"x")
    s3.delete_object(Bucket="cmek-warm-up", Key="k")
    s3.delete_bucket(Bucket="cmek-warm-up")


def _answers(conf: Path) -> bool:
    try:
        _ceph(conf, "mon", "stat")
    except CephError:
        return False
    return True


def _osd_up(conf: Path) -> bool:
    stat = json.loads(_ceph(conf, "osd", "stat", "-f", "json"))
    return int(stat.get("num_up_osds", 0)) >= 1
