"""The Dockerfile's health check: it parses, runs on the documented config, and works.

No image can be built here, so the HEALTHCHECK instruction is read from the Dockerfile and
its command is run as the image would run it (``cmek-proxy health --config ...``) against a
running proxy, with the documented config file and its documented environment overrides.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.servers import ProxyThread, Server, free_port, new_keyfile, proxy_config

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _healthcheck() -> tuple[dict[str, str], list[str]]:
    (args,) = [rest for word, rest in _instructions() if word == "HEALTHCHECK"]
    options, _, cmd = args.partition("CMD ")
    opts = dict(o.removeprefix("--").split("=", 1) for o in shlex.split(options))
    command = json.loads(cmd)  # exec form: a JSON array, no shell in a slim image
    assert isinstance(command, list)
    return opts, command


def test_healthcheck_has_a_start_period_and_reads_the_served_config() -> None:
    opts, command = _healthcheck()
    assert set(opts) >= {"interval", "timeout", "start-period", "retries"}
    assert int(opts["start-period"].removesuffix("s")) >= 30  # key validation at start-up
    (cmd,) = [rest for word, rest in _instructions() if word == "CMD"]
    served = json.loads(cmd)
    assert served[:2] == ["serve", "--config"]
    assert command[:4] == ["cmek-proxy", "health", "--config", served[2]]
    timeout = float(command[command.index("--timeout") + 1])
    assert timeout < int(opts["timeout"].removesuffix("s"))
    assert "CMEK_ADMIN_PORT" not in DOCKERFILE.read_text()  # no undocumented variable


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    assert command[0] == "cmek-proxy"
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *command[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


def test_healthcheck_command_against_a_running_proxy(moto: Server, tmp_path: Path) -> None:
    _, command = _healthcheck()
    # the documented example config, with the documented environment overrides
    command[3] = str(ROOT / "config" / "serve.example.yaml")
    config = proxy_config(moto.url, new_keyfile(tmp_path / "k.json"))
    with ProxyThread(config) as p:
        assert p.running is not None
        env = {"CMEK_PROXY__ADMIN__PORT": str(p.running.admin_port)}
        res = _run(command, env)
        assert res.returncode == 0, res.stderr
        assert res.stderr == ""
    res = _run(command, env)  # the proxy is gone
    assert res.returncode == 1
    assert f"127.0.0.1:{p.running.admin_port}/healthz" in res.stderr
    assert "Traceback" not in res.stderr
    res = _run(
        command, {"CMEK_PROXY__ADMIN__PORT": str(free_port()), "CMEK_PROXY__ADMIN__HOST": "0.0.0.0"}
    )
    assert res.returncode == 1 and "http://127.0.0.1:" in res.stderr
