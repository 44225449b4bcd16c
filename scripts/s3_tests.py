"""Run a subset of ceph/s3-tests against a backend, bare and through cmek-proxy, and compare.

Called by ``scripts/s3-tests.sh`` (which fetches s3-tests and its venv); see docs/CONFORMANCE.md.
Runs with the project's Python (it starts moto, rclone, radosgw and the proxy with the test
helpers in ``tests/``); s3-tests itself runs in its own venv, as a subprocess.

Every server listens on 127.0.0.1 ephemeral ports and is stopped by its own PID. Each run (bare,
proxy) gets a fresh backend so that one run's leftovers cannot change the other's results.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.servers import (  # noqa: E402
    REGION,
    Server,
    free_port,
    moto_server,
    rclone_binary,
    start_process,
)

# --------------------------------------------------------------------------- selection
# s3tests/functional/test_s3.py, restricted to what the proxy touches: objects, buckets,
# listings, multipart, ranges, copies, conditional requests, checksums (and the ACL and
# anonymous-access tests that live among them). Whole feature areas that are configuration
# passed through as is (lifecycle, logging, policies, CORS, website, object lock, tagging,
# versioning) or that the proxy manages itself (server-side encryption) are left out.
EXCLUDED_MARKERS = [
    "lifecycle",
    "lifecycle_expiration",
    "lifecycle_transition",
    "cloud_transition",
    "cloud_restore",
    "target_by_bucket",
    "bucket_logging",
    "bucket_logging_cleanup",
    "fails_without_logging_rollover",
    "bucket_policy",
    "bucket_encryption",
    "encryption",
    "sse_s3",
    "object_lock",
    "tagging",
    "s3select",
    "s3website",
    "object_ownership",
    "storage_class",
    "iam_account",
    "iam_user",
    "delete_marker",
]
EXCLUDED_KEYWORDS = [
    "lifecycle",
    "logging",
    "policy",
    "cors",
    "website",
    "sse",
    "encrypt",
    "_enc",
    "object_lock",
    "tagging",
    "version",
    "restore",
    "transition",
    "ownership",
    "public_access_block",
    "block_public",
    "storage_class",
    "select",
    "torrent",
    "sns",
]
# Tests left out by name: none yet (add here, with the reason, tests that hang a backend).
EXCLUDED_TESTS: dict[str, str] = {}

TEST_FILE = "s3tests/functional/test_s3.py"

# Users of s3tests.conf. The proxy gets each as a client key; bare backends accept them too.
USERS = {
    "main": ("S3TMAINACCESSKEY0001", "s3t-main-secret-key-0000000000000000000000"),
    "alt": ("S3TALTACCESSKEY00002", "s3t-alt-secret-key-00000000000000000000000"),
    "tenant": ("S3TTENANTACCESSKEY03", "s3t-tenant-secret-key-00000000000000000000"),
}
# The proxy's own credential on the backend (rclone and moto: any key the backend accepts).
BACKEND_USER = ("S3TBACKENDACCESSKEY4", "s3t-backend-secret-key-0000000000000000000")


def selection_args() -> list[str]:
    markers = " or ".join(EXCLUDED_MARKERS)
    keywords = " or ".join(EXCLUDED_KEYWORDS + list(EXCLUDED_TESTS))
    return [TEST_FILE, "-m", f"not ({markers})", "-k", f"not ({keywords})"]


# --------------------------------------------------------------------------- backends
class Backend:
    """A running backend: its URL and, per s3tests user, the credential that reaches it."""

    def __init__(self, name: str, url: str, users: dict[str, tuple[str, str]]) -> None:
        self.name = name
        self.url = url
        self.users = users  # main/alt/tenant -> (access key, secret key)
        self.proxy_user = users["main"]  # what the proxy signs its backend requests with
        self.tenant_name = "testx"
        self.envelope_store = "metadata"
        self.revive: Any = None  # restarts a crashed backend (radosgw); True if it had to
        self.revived = 0


@contextlib.contextmanager
def start_backend(kind: str, workdir: Path) -> Iterator[Backend]:
    logdir = workdir / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    if kind == "moto":
        # moto accepts any key: every user is the same (default) account.
        with moto_server(logdir) as srv:
            b = Backend("moto", srv.url, dict(USERS))
            b.proxy_user = BACKEND_USER
            yield b
    elif kind == "rclone":
        with rclone_serve(workdir / "data", logdir) as srv:
            b = Backend("rclone", srv.url, {**USERS})
            b.proxy_user = BACKEND_USER
            b.envelope_store = "sidecar"  # rclone serve s3 keeps user metadata in memory only
            yield b
    elif kind == "ceph":
        with ceph_backend(workdir, logdir) as b:
            yield b
    else:
        raise SystemExit(f"unknown backend {kind!r}: moto, rclone or ceph")


@contextlib.contextmanager
def rclone_serve(root: Path, logdir: Path) -> Iterator[Server]:
    """``rclone serve s3 --metadata`` with one auth key per s3tests user and the proxy's."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [rclone_binary(), "serve", "s3", "--metadata", "--addr", f"127.0.0.1:{port}"]
    for ak, sk in [*USERS.values(), BACKEND_USER]:
        argv += ["--auth-key", f"{ak},{sk}"]
    argv += ["--config", "/dev/null", str(root)]
    srv = start_process("rclone", argv, f"http://127.0.0.1:{port}", logdir)
    try:
        yield srv
    finally:
        srv.stop()


def load_rgw() -> Any:
    """tests/rgw.py (Ceph mon + osd + radosgw), or the file named by $S3_TESTS_RGW_PY."""
    path = os.environ.get("S3_TESTS_RGW_PY")
    if not path:
        try:
            import tests.rgw as rgw  # type: ignore[import-not-found,unused-ignore]
        except ImportError as e:
            raise SystemExit(
                f"ceph backend needs tests/rgw.py (or S3_TESTS_RGW_PY=path/to/rgw.py): {e}"
            ) from None
        return rgw
    import importlib.util

    spec = importlib.util.spec_from_file_location("tests.rgw", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["tests.rgw"] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def ceph_backend(workdir: Path, logdir: Path) -> Iterator[Backend]:
    """Ceph mon + osd (memstore) + radosgw from tests/rgw.py, with the s3tests users.

    Each s3tests user is its own RGW user (the tenant one in tenant ``testx``); the proxy
    signs with the helper's own user (BACKEND_AK). radosgw is restarted if it dies mid-run.
    """
    from tests.servers import BACKEND_AK, BACKEND_SK

    rgw = load_rgw()
    with rgw.rgw_server(workdir / "ceph", logdir) as srv:
        conf = srv.extra["conf"]
        for name, (ak, sk) in USERS.items():
            argv = ["radosgw-admin", "-c", str(conf), "user", "create", "--uid", f"s3t-{name}",
                    "--display-name", f"s3-tests {name}", "--email", f"{name}@example.com",
                    "--access-key", ak, "--secret", sk]  # fmt: skip
            if name == "tenant":
                argv += ["--tenant", "testx"]
            subprocess.run(argv, check=True, capture_output=True, timeout=60)
        b = Backend("ceph", srv.url, dict(USERS))
        b.proxy_user = (BACKEND_AK, BACKEND_SK)
        b.revive = lambda: rgw.revive(srv)
        yield b


# --------------------------------------------------------------------------- proxy
@contextlib.contextmanager
def start_proxy(backend: Backend, workdir: Path) -> Iterator[str]:
    """``python -m proxy serve`` in front of the backend, one client key per s3tests user."""
    from proxy.kms.local import create_key_file

    workdir.mkdir(parents=True, exist_ok=True)
    keyfile = workdir / "keys.json"
    if not keyfile.exists():
        create_key_file(keyfile)
    port, admin = free_port(), free_port()
    ak, sk = backend.proxy_user
    cfg = {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": admin},
        "region": REGION,
        "clients": [{"access_key": a, "secret_key": s} for a, s in USERS.values()],
        "backend": {
            "endpoint": backend.url,
            "region": REGION,
            "access_key": ak,
            "secret_key": sk,
            "envelope_store": backend.envelope_store,
        },
        "encryption": {"default": {"key": f"local://{keyfile}"}},
    }
    path = workdir / "proxy.yaml"
    path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
    srv = start_process(
        "proxy",
        [sys.executable, "-m", "proxy", "serve", "--config", str(path)],
        f"http://127.0.0.1:{admin}/healthz",
        workdir / "logs",
        env={"PYTHONPATH": str(REPO)},
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.stop()


# --------------------------------------------------------------------------- s3tests.conf
def owner_of(endpoint: str, ak: str, sk: str) -> tuple[str, str]:
    """The (ID, DisplayName) the endpoint reports for a credential, for the ACL tests."""
    import boto3
    from botocore.config import Config as BotoConfig

    c = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ak,
        aws_secret_access_key=sk,
        region_name=REGION,
        config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )
    try:
        owner = c.list_buckets().get("Owner") or {}
    except Exception:  # noqa: BLE001 - an endpoint without owners gets placeholders
        owner = {}
    return owner.get("ID", "unknown-id"), owner.get("DisplayName", "unknown")


def write_conf(path: Path, endpoint: str, backend: Backend) -> None:
    host, port = endpoint.removeprefix("http://").split(":")
    cp = configparser.RawConfigParser()
    cp["DEFAULT"] = {"host": host, "port": port, "is_secure": "False", "ssl_verify": "False"}
    cp["fixtures"] = {"bucket prefix": "s3t-{random}-"}
    for name, (ak, sk) in USERS.items():
        uid, display = owner_of(endpoint, ak, sk)
        sec = {
            "display_name": display,
            "user_id": uid,
            "email": f"{name}@example.com",
            "access_key": ak,
            "secret_key": sk,
        }
        if name == "main":
            sec["api_name"] = ""
        if name == "tenant":
            sec["tenant"] = backend.tenant_name
        cp[f"s3 {name}"] = sec
    # configure() requires these sections; IAM tests are not selected.
    for sec in ("iam", "iam root", "iam alt root"):
        cp[sec] = {
            "access_key": "IAMUNUSEDACCESSKEY00",
            "secret_key": "iam-unused-secret-key-000000000000000000",
            "display_name": "unused",
            "user_id": "unused",
            "email": "unused@example.com",
        }
    with open(path, "w") as fh:
        cp.write(fh)


# --------------------------------------------------------------------------- running
def run_pytest(
    label: str,
    endpoint: str,
    backend: Backend,
    workdir: Path,
    args: argparse.Namespace,
    deadline: float,
) -> dict[str, Any]:
    conf = workdir / f"{label}.s3tests.conf"
    write_conf(conf, endpoint, backend)
    log = workdir / f"{label}.reportlog.jsonl"
    log.unlink(missing_ok=True)
    argv = [
        str(args.s3_tests_python),
        "-m",
        "pytest",
        *selection_args(),
        "-p",
        "no:cacheprovider",
        "-p",
        "s3tests_plugin",
        "-q",
        "-rN",
        "--timeout",
        str(args.test_timeout),
        "--report-log",
        str(log),
        *args.pytest_args,
    ]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        "S3TEST_CONF": str(conf),
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    leftovers = workdir / f"{label}.leftovers.jsonl"
    leftovers.unlink(missing_ok=True)
    keys = dict.fromkeys([*backend.users.values(), backend.proxy_user])
    env.update(
        PYTHONPATH=str(REPO / "scripts"),  # s3tests_plugin only (no project code)
        S3TESTS_CLEANUP_ENDPOINT=backend.url,
        S3TESTS_CLEANUP_KEYS=",".join(f"{ak}:{sk}" for ak, sk in keys),
        S3TESTS_LEFTOVERS=str(leftovers),
    )
    remaining = max(30.0, deadline - time.monotonic())
    print(f"== {backend.name} {label}: s3-tests against {endpoint} (up to {remaining:.0f}s)")
    started = time.monotonic()
    timed_out = False
    with open(workdir / f"{label}.pytest.log", "wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=args.s3_tests_dir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_reviving(proc, backend, remaining)
        except BaseException as e:  # the deadline, or SIGTERM / Ctrl-C: stop pytest too
            timed_out = isinstance(e, subprocess.TimeoutExpired)
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if not timed_out:
                raise
    res = parse_reportlog(log)
    res["seconds"] = round(time.monotonic() - started, 1)
    res["timed_out"] = timed_out
    res["exit_code"] = proc.returncode
    res["backend_restarts"] = backend.revived
    notes = (
        [json.loads(x) for x in leftovers.read_text().splitlines()] if leftovers.exists() else []
    )
    res["left_buckets"] = [
        n["test"] for n in notes if n.get("kind", "left_buckets") == "left_buckets"
    ]
    res["versions_fallbacks"] = sum(1 for n in notes if n.get("kind") == "versions_fallback")
    c = res["counts"]
    print(f"   {c}  ({res['seconds']}s{', TIMED OUT' if timed_out else ''})")
    return res


def wait_reviving(proc: subprocess.Popen[bytes], backend: Backend, timeout: float) -> None:
    """Wait for pytest; meanwhile restart the backend if it dies (radosgw aborts on some
    requests), so one crash costs one test, not the rest of the run."""
    end = time.monotonic() + timeout
    while True:
        try:
            proc.wait(min(2.0, max(0.0, end - time.monotonic())))
            return
        except subprocess.TimeoutExpired:
            if time.monotonic() >= end:
                raise
        if backend.revive is not None and backend.revive():
            backend.revived += 1
            print(f"   {backend.name} died and was restarted ({backend.revived})")


def first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:300]
    return ""


def reason_of(rep: dict[str, Any]) -> str:
    lr = rep.get("longrepr")
    if isinstance(lr, dict):
        crash = lr.get("reprcrash") or {}
        if crash.get("message"):
            return first_line(crash["message"])
        chain = lr.get("chain") or []
        if chain and (chain[-1][1] or {}).get("message"):
            return first_line(chain[-1][1]["message"])
    if isinstance(lr, list) and len(lr) == 3:  # skips: [file, line, reason]
        return first_line(str(lr[2]))
    if isinstance(lr, str):
        return first_line(lr)
    return ""


def parse_reportlog(path: Path) -> dict[str, Any]:
    """Outcome per test: failed if any phase failed (setup errors count as failures)."""
    tests: dict[str, dict[str, str]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rep = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if rep.get("$report_type") != "TestReport":
                continue
            name = rep["nodeid"].split("::")[-1]
            t = tests.setdefault(name, {"outcome": "passed", "reason": ""})
            outcome, when = rep["outcome"], rep["when"]
            if outcome == "failed" and t["outcome"] != "failed":
                t["outcome"] = "failed"
                t["phase"] = when
                t["reason"] = (f"[{when}] " if when != "call" else "") + reason_of(rep)
            elif outcome == "skipped" and t["outcome"] == "passed":
                t["outcome"] = "skipped"
                t["reason"] = reason_of(rep)
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for t in tests.values():
        counts[t["outcome"]] += 1
    counts["total"] = len(tests)
    return {"counts": counts, "tests": tests}


def s3_tests_commit(d: Path) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(d), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def compare(bare: dict[str, Any], proxied: dict[str, Any]) -> dict[str, Any]:
    b, p = bare["tests"], proxied["tests"]
    regressions = [
        {"test": n, "phase": p[n].get("phase", "call"), "reason": p[n]["reason"]}
        for n in sorted(b)
        if b[n]["outcome"] == "passed" and n in p and p[n]["outcome"] == "failed"
    ]
    improvements = sorted(
        n for n in b if b[n]["outcome"] == "failed" and n in p and p[n]["outcome"] == "passed"
    )
    not_run = sorted(n for n in b if b[n]["outcome"] == "passed" and n not in p)
    return {
        "pass_bare_fail_proxy": regressions,
        "fail_bare_pass_proxy": improvements,
        "pass_bare_not_run_proxy": not_run,
    }


# --------------------------------------------------------------------------- causes
# Why a test that passes bare fails through the proxy, as analysed (docs/CONFORMANCE.md).
# A failure matching none of these is new: the report lists it as "unclassified".
CAUSES: list[dict[str, Any]] = [
    {
        "id": "anonymous",
        "kind": "expected",
        "what": "unsigned (anonymous) requests are refused with 403 AccessDenied before any "
        "backend call, whatever the ACLs (and whether or not the bucket exists)",
        "match": lambda name, reason, ctx: ctx["anon"],
    },
    {
        "id": "rgw-extension",
        "kind": "expected",
        "what": "tests marked fails_on_aws: RGW behaviour that AWS S3 does not have either "
        "(e.g. HEAD bucket ?read-stats usage headers: 501 NotImplemented from the proxy)",
        "match": lambda name, reason, ctx: (
            "fails_on_aws" in ctx["markers"] and ctx["phase"] == "call"
        ),
    },
    {
        "id": "refused-on-purpose",
        "kind": "expected (documented: README, S3 operations)",
        "what": "operations refused with 501 because they would expose ciphertext "
        "(GetObjectAttributes, Select, torrents) or fight the proxy (PutBucketEncryption)",
        "match": lambda name, reason, ctx: "refuses this on purpose" in reason,
    },
    {
        "id": "part-etag-not-deterministic",
        "kind": "expected (undocumented)",
        "what": "a part uploaded again with the same bytes gets a new ETag (fresh ciphertext), "
        "so completing with the ETag of the earlier upload is InvalidPart; with MD5 ETags "
        "both uploads have the same one",
        "match": lambda name, reason, ctx: "InvalidPart" in reason and "resend" in name,
    },
    {
        "id": "bug-put-ifmatch-unquoted",
        "kind": "BUG",
        "what": "PUT with If-Match: <etag>-c written without quotes is answered 412: the "
        "unquoted client ETag is not mapped back to the backend's (RGW accepts unquoted)",
        "match": lambda name, reason, ctx: (
            name == "test_put_object_ifmatch_good" and "PreconditionFailed" in reason
        ),
    },
    {
        "id": "bug-copy-range-unchecked",
        "kind": "BUG",
        "what": "UploadPartCopy accepts an x-amz-copy-source-range past the source's end or "
        "malformed (bytes=0-21 of 5 bytes, 0-2, bytes=hello-world): S3 answers 400 InvalidRange",
        "match": lambda name, reason, ctx: (
            name.startswith("test_multipart_copy_") and "range" in name and "not raised" in reason
        ),
    },
    {
        "id": "bug-100-continue-before-auth",
        "kind": "BUG (minor)",
        "what": "a PUT with Expect: 100-continue gets 100 Continue before it is authenticated, "
        "then 403 after the client has sent the body; S3 answers 403 at once",
        "match": lambda name, reason, ctx: name == "test_100_continue",
    },
    {
        "id": "one-backend-identity",
        "kind": "expected",
        "what": "every client key reaches the backend as the proxy's one backend user, so "
        "tests that need two owners (alt creating main's bucket) see one",
        "match": lambda name, reason, ctx: (
            "nonowner" in name
            or "not_owned" in name
            or name.startswith(("test_access_bucket_", "test_object_acl_canned_bucketowner"))
            or name == "test_ignore_public_acls"
        ),
    },
    {
        "id": "presigned-expires",
        "kind": "expected (AWS-like, not RGW-like)",
        "what": "SigV4 presigned URLs whose X-Amz-Expires is 0, negative or over 7 days are "
        "refused by the proxy itself with 400 where RGW answers 403 (both refuse); an "
        "OPTIONS on a presigned URL (CORS preflight) gets 403, RGW 400",
        "match": lambda name, reason, ctx: (
            "x_amz_expires" in name or name == "test_object_raw_put_authenticated_expired"
        ),
    },
    {
        "id": "post-object",
        "kind": "expected (undocumented)",
        "what": "browser-form uploads (POST Object with a policy) are not supported: "
        "403 for unsigned POSTs, 501 NotImplemented otherwise",
        "match": lambda name, reason, ctx: name.startswith("test_post_object"),
    },
    {
        "id": "etag-not-md5",
        "kind": "expected (documented: README, ETags)",
        "what": "an encrypted object's ETag is the backend's (MD5 of ciphertext) + '-c', "
        "not the MD5 of the plaintext",
        "match": lambda name, reason, ctx: name in {"test_object_write_check_etag"},
    },
    {
        "id": "bug-304-etag",
        "kind": "BUG",
        "what": "GET answered 304 Not Modified carries the backend's ETag, without the '-c' "
        "suffix the object has everywhere else (HEAD 304 is right)",
        "match": lambda name, reason, ctx: (
            " == " in reason
            and '-c"' in reason.split(" == ", 1)[1]
            and '-c"' not in reason.split(" == ", 1)[0]
        ),
    },
    {
        "id": "bug-upload-blocks-delete-bucket",
        "kind": "BUG",
        "what": "an in-progress multipart upload leaves a hidden .cmek-proxy/uploads/ object: "
        "DeleteBucket answers BucketNotEmpty for a bucket that lists empty",
        "match": lambda name, reason, ctx: (
            "BucketNotEmpty" in reason and (not ctx["sidecar"] or "multipart" in name)
        ),
    },
    {
        "id": "bug-deleteobjects-sidecars",
        "kind": "BUG (sidecar envelopes)",
        "what": "DeleteObjects is passed through without removing the objects' sidecar "
        "envelopes (DeleteObject does remove them): the bucket lists empty but DeleteBucket "
        "answers BucketNotEmpty; s3-tests' cleanup uses DeleteObjects, so nearly every test "
        "that writes an object fails in teardown",
        "match": lambda name, reason, ctx: "BucketNotEmpty" in reason and ctx["sidecar"],
    },
    {
        "id": "bug-complete-retry",
        "kind": "BUG",
        "what": "CompleteMultipartUpload repeated after it succeeded (an SDK retry after a lost "
        "answer) gets 404 NoSuchUpload; S3 answers 200 with the same result",
        "match": lambda name, reason, ctx: (
            "NoSuchUpload" in reason and "CompleteMultipartUpload" in reason
        ),
    },
    {
        "id": "bug-versions-500",
        "kind": "BUG",
        "what": "a backend's 501 NotImplemented (rclone: ListObjectVersions) becomes "
        "500 InternalError (retried by SDKs) instead of being passed on",
        "match": lambda name, reason, ctx: (
            "InternalError" in reason and "ListObjectVersions" in reason
        ),
    },
    {
        "id": "bug-hidden-keys-pagination",
        "kind": "BUG (sidecar envelopes)",
        "what": "listings drop the reserved .cmek-proxy/ entries after the backend has "
        "counted them against max-keys: short or empty truncated pages, NextMarker "
        "'.cmek-proxy/', KeyCount including hidden entries",
        "match": lambda name, reason, ctx: (
            ".cmek-proxy/" in reason
            or (ctx["sidecar"] and name.startswith(("test_bucket_list", "test_multi_object")))
        ),
    },
]


# Reasons naming a bug first, then what is expected, then the name-based heuristic.
_ORDER = [
    "bug-versions-500",
    "bug-deleteobjects-sidecars",
    "bug-upload-blocks-delete-bucket",
    "bug-complete-retry",
    "bug-304-etag",
    "bug-put-ifmatch-unquoted",
    "bug-copy-range-unchecked",
    "bug-100-continue-before-auth",
    "anonymous",
    "one-backend-identity",
    "presigned-expires",
    "rgw-extension",
    "refused-on-purpose",
    "part-etag-not-deterministic",
    "post-object",
    "etag-not-md5",
    "bug-hidden-keys-pagination",
]
CAUSES.sort(key=lambda c: _ORDER.index(c["id"]))


def scan_tests(s3_tests_dir: Path) -> tuple[set[str], dict[str, list[str]]]:
    """From test_s3.py: the tests using an unsigned client, and each test's markers."""
    unsigned: set[str] = set()
    markers: dict[str, list[str]] = {}
    current, pending = None, []
    for line in (s3_tests_dir / TEST_FILE).read_text().splitlines():
        if line.startswith("@pytest.mark."):
            pending.append(line[len("@pytest.mark.") :].split("(")[0].strip())
        elif line.startswith("def test_"):
            current = line[4:].split("(")[0]
            markers[current], pending = pending, []
        elif line.startswith("def "):
            current, pending = None, []
        elif current and "get_unauthenticated_client()" in line:
            unsigned.add(current)
    return unsigned, markers


def classify(regressions: list[dict[str, str]], s3_tests_dir: Path, sidecar: bool) -> None:
    unsigned, markers = scan_tests(s3_tests_dir)
    for r in regressions:
        r["cause"] = "unclassified"
        r["markers"] = " ".join(markers.get(r["test"], []))
        ctx = {
            "anon": r["test"] in unsigned,
            "sidecar": sidecar,
            "markers": r["markers"],
            "phase": r.get("phase", "call"),
        }
        for c in CAUSES:
            if c["match"](r["test"], r["reason"], ctx):
                r["cause"] = c["id"]
                break


# --------------------------------------------------------------------------- report
def write_report(results: Path) -> None:
    """Markdown + JSON over every backend result in the results dir."""
    runs = {}
    for f in sorted(results.glob("*/result.json")):
        runs[f.parent.name] = json.loads(f.read_text())
    (results / "report.json").write_text(json.dumps(runs, indent=2) + "\n")
    md = ["# s3-tests through cmek-proxy", ""]
    md += [
        "| backend | selected | passed bare | passed through proxy | pass bare, fail proxy |"
        " of which only in teardown | fail bare, pass proxy | date | s3-tests commit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        bc, pc = r["bare"]["counts"], r["proxy"]["counts"]
        regs = r["compare"]["pass_bare_fail_proxy"]
        md.append(
            f"| {name} | {bc['total']} | {bc['passed']} | {pc['passed']} |"
            f" {len(r['compare']['pass_bare_fail_proxy'])} |"
            f" {sum(1 for x in regs if x.get('phase') == 'teardown')} |"
            f" {len(r['compare']['fail_bare_pass_proxy'])} | {r['date']} |"
            f" {r['s3_tests_commit'][:10]} |"
        )
    for name, r in runs.items():
        md += ["", f"## {name}", "", f"Command: `{r['command']}`", ""]
        for label in ("bare", "proxy"):
            x = r[label]
            md.append(
                f"* {label}: {x['counts']} in {x['seconds']} s"
                + (" (TIMED OUT: partial)" if x["timed_out"] else "")
            )
            if x.get("versions_fallbacks"):
                md.append(
                    f"  * ListObjectVersions answered 500 InternalError {x['versions_fallbacks']}"
                    " times in s3-tests' cleanup (tolerated there; see bug-versions-500)"
                )
            if x.get("left_buckets"):
                md.append(
                    f"  * {len(x['left_buckets'])} tests left buckets the client could not"
                    " delete (removed on the backend after them): "
                    + ", ".join(f"`{n}`" for n in x["left_buckets"])
                )
        regs = r["compare"]["pass_bare_fail_proxy"]
        md += ["", f"### Pass bare, fail through the proxy ({len(regs)})", ""]
        causes = {c["id"]: c for c in CAUSES}
        for cid in [*causes, "unclassified"]:
            group = [x for x in regs if x.get("cause", "unclassified") == cid]
            if not group:
                continue
            c = causes.get(cid, {"kind": "NEW", "what": "not analysed yet"})
            md += ["", f"**{cid}** ({c['kind']}, {len(group)}): {c['what']}", ""]
            md += ["| test | first line of the failure |", "|---|---|"]
            md += [f"| `{x['test']}` | {_cell(x['reason'])} |" for x in group]
        imp = r["compare"]["fail_bare_pass_proxy"]
        if imp:
            md += ["", f"### Fail bare, pass through the proxy ({len(imp)})", ""]
            md += [", ".join(f"`{n}`" for n in imp)]
        nr = r["compare"]["pass_bare_not_run_proxy"]
        if nr:
            md += ["", f"### Pass bare, not run through the proxy ({len(nr)})", ""]
            md += [", ".join(f"`{n}`" for n in nr)]
    (results / "report.md").write_text("\n".join(md) + "\n")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("backend", choices=["moto", "rclone", "ceph"])
    ap.add_argument("--s3-tests-dir", type=Path, required=True)
    ap.add_argument("--s3-tests-python", type=Path, required=True)
    ap.add_argument("--results", type=Path, default=REPO / "results" / "s3-tests")
    ap.add_argument("--test-timeout", type=int, default=60, help="seconds per test")
    ap.add_argument("--timeout", type=int, default=2400, help="seconds for both runs")
    ap.add_argument(
        "--only",
        choices=["bare", "proxy", "report"],
        help="run one side only, or none (report: recompare and rewrite the report)",
    )
    ap.add_argument("--command", default="", help="the command line, for the report")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    # the outer `timeout` sends SIGTERM: stop the servers on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = ap.parse_args(argv[: len(argv) - len(extra) - (1 if "--" in argv else 0)])
    args.pytest_args = extra  # after --: extra pytest arguments
    deadline = time.monotonic() + args.timeout

    args.results = args.results.resolve()
    out = args.results / args.backend
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"s3tests-{args.backend}-"))
    prev = out / "result.json"
    result: dict[str, Any] = json.loads(prev.read_text()) if args.only and prev.exists() else {}
    if args.only == "report":  # re-read the report logs kept from the last runs
        for label in ("bare", "proxy"):
            kept = {k: v for k, v in result[label].items() if k not in ("counts", "tests")}
            result[label] = {**parse_reportlog(out / f"{label}.reportlog.jsonl"), **kept}
    try:
        for label in ("bare", "proxy"):
            if args.only and label != args.only:
                continue
            run_dir = work / label
            with start_backend(args.backend, run_dir) as backend:
                if label == "bare":
                    # half the time at most, so that a slow bare run leaves the proxy its share
                    half = min(deadline, time.monotonic() + args.timeout / 2)
                    result[label] = run_pytest(label, backend.url, backend, out, args, half)
                else:
                    with start_proxy(backend, run_dir) as url:
                        # the proxy run gets the time the bare run left
                        result[label] = run_pytest(label, url, backend, out, args, deadline)
            logs = out / f"{label}-logs"
            shutil.rmtree(logs, ignore_errors=True)
            shutil.copytree(run_dir / "logs", logs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if "bare" in result and "proxy" in result:
        result.update(
            backend=args.backend,
            date=(args.only == "report" and result.get("date"))
            or dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
            s3_tests_commit=s3_tests_commit(args.s3_tests_dir),
            command=(args.only == "report" and result.get("command"))
            or args.command
            or " ".join(sys.argv),
            selection=selection_args()[1:],
            compare=compare(result["bare"], result["proxy"]),
        )
        classify(
            result["compare"]["pass_bare_fail_proxy"],
            args.s3_tests_dir,
            sidecar=args.backend == "rclone",
        )
    prev.write_text(json.dumps(result, indent=2) + "\n")
    if "compare" in result:
        write_report(args.results)
        print(f"report: {args.results / 'report.md'}")


if __name__ == "__main__":
    main()
