"""The audit trail: a hash chain that ``verify`` and ``cmek-proxy audit verify`` check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.control.audit import GENESIS, AuditLog, line_hash, verify
from proxy.kms.keys import KeyEvent


def _log(tmp_path: Path, n: int = 5) -> Path:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("spec.created", spec="b", new={"kms_key": "local:///k"})
    for i in range(n - 2):
        log.append("job.started", job="verify", bucket=f"b{i}")
    log.key_event(KeyEvent("revoked", "local:///k", "disabled: gone", 1.0))
    return log.path


def test_chain_links_every_line(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = path.read_bytes().splitlines()
    entries = [json.loads(x) for x in lines]
    assert entries[0]["prev"] == GENESIS
    for before, entry in zip(lines, entries[1:], strict=False):
        assert entry["prev"] == line_hash(before)
    assert [e["seq"] for e in entries] == list(range(len(lines)))
    assert entries[-1]["event"] == "key.revoked"
    assert verify(path).ok and verify(path).entries == len(lines)


@pytest.mark.parametrize("how", ["edit", "delete", "swap", "truncate"])
def test_tampering_is_found_at_the_first_broken_link(tmp_path: Path, how: str) -> None:
    path = _log(tmp_path, 6)
    lines = path.read_bytes().splitlines(keepends=True)
    if how == "edit":
        lines[2] = lines[2].replace(b'"b1"', b'"bX"')
        expected = 4  # line 3 still parses; line 4's prev no longer matches it
    elif how == "delete":
        del lines[2]
        expected = 3
    elif how == "swap":
        lines[2], lines[3] = lines[3], lines[2]
        expected = 3
    else:
        lines[-1] = lines[-1][:-5]
        expected = 6
    path.write_bytes(b"".join(lines))
    res = verify(path)
    assert not res.ok
    assert res.broken_line == expected
    with pytest.raises(SystemExit) as exc:
        main(["audit", "verify", str(path)])
    assert exc.value.code == 1


def test_cli_verify_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _log(tmp_path)
    main(["audit", "verify", str(path)])
    assert "chain intact, 5 entries" in capsys.readouterr().out


def test_appends_continue_the_chain_across_instances(tmp_path: Path) -> None:
    path = _log(tmp_path, 3)
    AuditLog(path).append("job.finished", job="verify")
    assert verify(path).ok and verify(path).entries == 4
