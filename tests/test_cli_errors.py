"""Every error a user can cause is a one-line message and a documented exit status.

Each test runs the real command line as a subprocess (``python -m proxy.cli``) and checks
stderr names the problem and holds no traceback.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.cli import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_KEY,
    EXIT_RUNTIME,
    EXIT_USAGE,
    build_parser,
)
from proxy.config import Config
from tests.servers import Server, free_port, new_keyfile, proxy_config


def cli(*args: str, prefix: tuple[str, ...] = (), timeout: float = 120) -> tuple[int, str, str]:
    res = subprocess.run(
        [*prefix, sys.executable, "-m", "proxy.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return res.returncode, res.stdout, res.stderr


def assert_message(stderr: str, *needles: str) -> None:
    assert "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in stderr, stderr


def write_config(config: Config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
    return path


@pytest.fixture
def closed_port() -> int:
    return free_port()


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


def test_serve_on_a_port_in_use(tmp_path: Path, busy_port: int, closed_port: int) -> None:
    keyfile = new_keyfile(tmp_path / "k.json")
    cfg = proxy_config(
        f"http://127.0.0.1:{closed_port}", keyfile, listen={"host": "127.0.0.1", "port": busy_port}
    )
    code, _, err = cli("serve", "--config", str(write_config(cfg, tmp_path / "c.yaml")))
    assert code == EXIT_RUNTIME
    assert_message(err, f"cannot listen for S3 on http://127.0.0.1:{busy_port}", "in use")


def test_dev_on_a_port_in_use(tmp_path: Path, busy_port: int) -> None:
    code, _, err = cli("dev", "--port", str(busy_port), "--data-dir", str(tmp_path / "d"))
    assert code == EXIT_RUNTIME
    assert_message(err, f"port {busy_port}", "--port N")
    code, _, err = cli(
        "dev",
        "--port",
        str(free_port()),
        "--admin-port",
        str(busy_port),
        "--data-dir",
        str(tmp_path / "d"),
    )
    assert code == EXIT_RUNTIME
    assert_message(err, f"port {busy_port}", "--admin-port N")


def _no_dac_override() -> tuple[str, ...]:
    """Root reads any file; without CAP_DAC_OVERRIDE it obeys the mode bits like anyone."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a file unreadable")
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search")


def test_unreadable_key_file(tmp_path: Path, closed_port: int) -> None:
    keyfile = new_keyfile(tmp_path / "k.json")
    keyfile.chmod(0)
    cfg = write_config(proxy_config(f"http://127.0.0.1:{closed_port}", keyfile), tmp_path / "c")
    code, _, err = cli("serve", "--config", str(cfg), prefix=_no_dac_override())
    assert code == EXIT_KEY
    assert_message(err, str(keyfile), "not readable")


def test_key_file_that_is_not_a_key_file(tmp_path: Path, closed_port: int) -> None:
    keyfile = tmp_path / "k.json"
    keyfile.write_text("not json")
    cfg = write_config(proxy_config(f"http://127.0.0.1:{closed_port}", keyfile), tmp_path / "c")
    code, _, err = cli("serve", "--config", str(cfg))
    assert code == EXIT_KEY
    assert_message(err, str(keyfile), "not a valid key file")


def test_audit_verify_of_a_missing_file(tmp_path: Path) -> None:
    code, _, err = cli("audit", "verify", str(tmp_path / "nope.jsonl"))
    assert code == EXIT_RUNTIME
    assert_message(err, "nope.jsonl does not exist")


def test_audit_verify_of_a_broken_chain_is_status_1(tmp_path: Path) -> None:
    log = tmp_path / "a.jsonl"
    log.write_text('{"seq": 0, "prev": "x"}\n')
    code, _, err = cli("audit", "verify", str(log))
    assert code == EXIT_FAILED
    assert_message(err, "chain broken at line 1")


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_job_concurrency_must_be_positive(tmp_path: Path, value: str) -> None:
    code, _, err = cli(
        "job", "verify", "--config", str(tmp_path / "c"), "--bucket", "b", "--concurrency", value
    )
    assert code == EXIT_USAGE
    assert_message(err, "--concurrency")


@pytest.mark.parametrize(
    "text,needle",
    [
        ("clients: []\nbackend: {endpoint: ftp://x, access_key: a, secret_key: b}\n", "clients"),
        ("backend: {endpoint: ftp://x}\n", "backend.endpoint"),
        ("[unclosed\n", "not valid YAML"),
        ("- a list\n", "top level must be a mapping"),
    ],
)
def test_bad_config(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    for command in (["serve"], ["doctor"], ["whoami"], ["job", "verify", "--bucket", "b"]):
        code, _, err = cli(*command, "--config", str(cfg))
        assert code == EXIT_CONFIG, (command, err)
        assert_message(err, needle)


def test_missing_config(tmp_path: Path) -> None:
    code, _, err = cli("serve", "--config", str(tmp_path / "none.yaml"))
    assert code == EXIT_CONFIG
    assert_message(err, "none.yaml does not exist")


def test_unreadable_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("listen: {}\n")
    cfg.chmod(0)
    code, _, err = cli("serve", "--config", str(cfg), prefix=_no_dac_override())
    assert code == EXIT_CONFIG
    assert_message(err, "c.yaml", "not readable")


def test_job_against_an_unreachable_backend(tmp_path: Path, closed_port: int) -> None:
    keyfile = new_keyfile(tmp_path / "k.json")
    url = f"http://127.0.0.1:{closed_port}"
    cfg = write_config(proxy_config(url, keyfile), tmp_path / "c.yaml")
    code, _, err = cli("job", "verify", "--config", str(cfg), "--bucket", "b", "--no-progress")
    assert code == EXIT_RUNTIME
    assert_message(err, f"backend {url}", "unreachable")


def test_admin_without_a_token_and_unreachable(closed_port: int) -> None:
    code, _, err = cli("admin", "list")
    assert code == EXIT_RUNTIME
    assert_message(err, "CMEK_ADMIN_TOKEN")
    code, _, err = cli("admin", "--url", f"http://127.0.0.1:{closed_port}", "--token", "t", "list")
    assert code == EXIT_RUNTIME
    assert_message(err, "unreachable")


@pytest.mark.parametrize(
    "job,flag,owner",
    [
        ("encrypt-existing", "--to", "rewrap"),
        ("verify", "--to", "rewrap"),
        ("rewrap", "--sample", "verify"),
        ("encrypt-existing", "--sample", "verify"),
    ],
)
def test_flags_of_another_job_are_refused(tmp_path: Path, job: str, flag: str, owner: str) -> None:
    code, _, err = cli("job", job, "--config", "c", "--bucket", "b", flag, "x")
    assert code == EXIT_USAGE
    assert_message(err, f"{flag} does not apply to {job}; it is an option of {owner}")
    code, _, err = cli(
        "admin", "--url", "http://x", "--token", "t", "job", job, "--bucket", "b", flag, "0.5"
    )
    assert code == EXIT_USAGE
    assert_message(err, f"{flag} does not apply to {job}")


def test_version() -> None:
    import proxy

    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"cmek-proxy {proxy.__version__}"


def _parsers(p: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield p.prog, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_help_has_no_restructured_text_and_every_option_has_help() -> None:
    missing: list[str] = []
    for prog, parser in _parsers(build_parser()):
        text = parser.format_help()
        assert "``" not in text and ":func:" not in text, (prog, text)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    if not choice.help:
                        missing.append(f"{prog} {choice.dest}")
                continue
            if action.help is None:
                missing.append(f"{prog} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing
    epilog: Any = build_parser().epilog
    for code in (EXIT_FAILED, EXIT_USAGE, EXIT_CONFIG, EXIT_KEY, EXIT_RUNTIME):
        assert f"\n  {code} " in epilog


def test_serve_against_an_unreachable_backend(tmp_path: Path, closed_port: int) -> None:
    """A backend not reachable yet does not stop the start (issue 14): the proxy listens,
    says why it is not ready (specs unread), no traceback."""
    import json
    import re
    import urllib.error
    import urllib.request

    keyfile = new_keyfile(tmp_path / "k.json")
    url = f"http://127.0.0.1:{closed_port}"
    cfg = proxy_config(url, keyfile, specs={"control_bucket": "ctl"}, workers=1)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy.cli",
            "serve",
            "--config",
            str(write_config(cfg, tmp_path / "c.yaml")),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        admin = re.search(r"admin on (http://[\d.]+:\d+)", line)
        assert admin, line
        with pytest.raises(urllib.error.HTTPError) as ready:
            urllib.request.urlopen(admin.group(1) + "/readyz", timeout=10)
        assert ready.value.code == 503
        assert "specs" in json.loads(ready.value.read())["not_ready"]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err


def test_job_on_a_bucket_that_does_not_exist(moto: Server, tmp_path: Path) -> None:
    cfg = write_config(proxy_config(moto.url, new_keyfile(tmp_path / "k.json")), tmp_path / "c")
    code, _, err = cli("job", "verify", "--config", str(cfg), "--bucket", "no-such-bucket-x")
    assert code == EXIT_RUNTIME
    assert_message(err, "NoSuchBucket")


def test_admin_with_a_url_that_is_not_one() -> None:
    code, _, err = cli("admin", "--url", "not-a-url", "--token", "t", "list")
    assert code == EXIT_RUNTIME
    assert_message(err, "admin API at not-a-url")


@pytest.mark.parametrize("args", [["--port", "70000"], ["--admin-port", "-1"], ["--port", "x"]])
def test_dev_with_a_port_that_is_not_one(tmp_path: Path, args: list[str]) -> None:
    code, _, err = cli("dev", *args, "--data-dir", str(tmp_path / "d"))
    assert code == EXIT_USAGE
    assert_message(err, args[0])


def test_keygen_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    code, _, err = cli("keygen", str(tmp_path / "f" / "k.json"))
    assert code == EXIT_KEY
    assert_message(err, f"{tmp_path / 'f'} is not a directory")


def test_job_with_an_empty_bucket_name() -> None:
    code, _, err = cli("job", "verify", "--config", "c", "--bucket", "")
    assert code == EXIT_USAGE
    assert_message(err, "--bucket: must not be empty")
