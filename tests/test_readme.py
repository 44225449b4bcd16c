"""The README's tour and Workflows run as written against ``cmek-proxy dev``.

The code blocks (bash and Python) are taken from README.md itself, so a README that drifts
from the product fails here. Dev mode runs on free ports; the documented 8080/8081 in the
blocks are replaced by them, and the blocks run in a fresh directory holding ``.cmek-dev``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import free_port, http_ok, wait_until

README = Path(__file__).resolve().parent.parent / "README.md"
AWS = Path("/usr/bin/aws")

pytestmark = pytest.mark.skipif(
    not AWS.exists(), reason="the tour uses the AWS CLI at /usr/bin/aws (apt-get install awscli)"
)


def blocks(section: str) -> list[tuple[str, str]]:
    """(language, code) of every bash and python block under ``## <section>``."""
    text = README.read_text()
    start = text.index(f"\n## {section}")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end >= 0 else len(text)]
    return re.findall(r"```(bash|python)\n(.*?)```", body, re.S)


def test_readme_has_the_blocks() -> None:
    assert [lang for lang, _ in blocks("A tour")] == ["bash", "python"]
    assert len([1 for lang, _ in blocks("Workflows") if lang == "bash"]) >= 6


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int, int]]:
    work = tmp_path_factory.mktemp("readme")
    port, admin = free_port(), free_port()
    data = work / ".cmek-dev"
    log = (work / "dev.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy.cli",
            "dev",
            "--port",
            str(port),
            "--admin-port",
            str(admin),
            "--data-dir",
            str(data),
        ],
        cwd=work,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        try:
            wait_until(
                lambda: (data / "dev.env").exists() and http_ok(f"http://127.0.0.1:{port}/"),
                60,
                "cmek-proxy dev",
            )
        except TimeoutError:
            raise AssertionError((work / "dev.log").read_text()) from None
        yield work, port, admin
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()


def _env(work: Path) -> dict[str, str]:
    home = work / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
    }
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def _ports(code: str, port: int, admin: int) -> str:
    return code.replace("127.0.0.1:8080", f"127.0.0.1:{port}").replace(
        "127.0.0.1:8081", f"127.0.0.1:{admin}"
    )


def _bash(work: Path, script: str) -> str:
    res = subprocess.run(
        ["bash", "-c", "shopt -s expand_aliases\nset -euo pipefail\n" + script],
        cwd=work,
        env=_env(work),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, f"{script}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}"
    return res.stdout


def _python(work: Path, code: str) -> None:
    env = _env(work)
    for line in (work / ".cmek-dev" / "dev.env").read_text().splitlines():
        name, _, value = line.partition("=")
        env[name] = value
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, f"{code}\n--- stderr\n{res.stderr}"


def test_the_tour(dev: tuple[Path, int, int]) -> None:
    work, port, admin = dev
    (_, shell), (_, python) = blocks("A tour")
    out = _bash(work, _ports(shell, port, admin))
    assert "patient record 42" in out
    assert '"ServerSideEncryption": "aws:kms"' in out
    assert "cmek_kms_requests_total{" in out
    assert "patient record 42" not in (work / ".cmek-dev/backend/demo/records/note.txt").read_text(
        errors="replace"
    )
    _python(work, _ports(python, port, admin))


def test_the_workflows(dev: tuple[Path, int, int]) -> None:
    work, port, admin = dev
    script = "\n".join(code for lang, code in blocks("Workflows") if lang == "bash")
    out = _bash(work, _ports(script, port, admin))
    assert "doctor: all checks passed" in out
    assert "local: " in out and "chmod 600" in out  # whoami's grant for a local key
    assert '"name": "operations/' in out
    assert "rewrapped: " in out
    assert "encrypt-existing s3://records/ (dry run)" in out
    assert "chain intact" in out
    new = f"local://{work}/.cmek-dev/new-key.json"
    assert f'"{new}' in out  # verify --json: every object under the new key
