"""The audit trail: a hash chain that ``verify`` and ``cmek-proxy audit verify`` check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.control.audit import GENESIS, AuditLog, Head, line_hash, self_hash, verify
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
        expected = 3  # the edited line itself, not the line after it
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


def test_an_edit_that_rehashes_its_line_is_named_too(tmp_path: Path) -> None:
    """An editor who recomputes the edited line's own hash is still caught, at that line."""
    path = _log(tmp_path, 6)
    lines = path.read_bytes().splitlines(keepends=True)
    entry = json.loads(lines[2])
    entry["bucket"] = "bX"
    entry["hash"] = self_hash(entry)
    lines[2] = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    res = verify(path)
    assert (res.ok, res.broken_line, res.entries) == (False, 3, 2)
    assert "line 3 was edited" in res.reason


def test_lines_without_their_own_hash_still_verify(tmp_path: Path) -> None:
    """Logs written before lines carried ``hash`` keep verifying, and an edit is named."""
    path = _log(tmp_path, 4)
    old = []
    prev = GENESIS
    for raw in path.read_bytes().splitlines():
        entry = {k: v for k, v in json.loads(raw).items() if k != "hash"}
        entry["prev"] = prev
        line = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
        prev = line_hash(line)
        old.append(line + b"\n")
    path.write_bytes(b"".join(old))
    assert verify(path).ok
    old[1] = old[1].replace(b'"b0"', b'"bX"')
    path.write_bytes(b"".join(old))
    assert verify(path).broken_line == 2


def test_truncation_is_found_against_a_recorded_head(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _log(tmp_path, 6)
    log = AuditLog(path)
    head = log.head()
    assert head == Head(6, line_hash(path.read_bytes().splitlines()[-1]))
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:4]))  # cut two entries off the end
    assert verify(path).ok  # the file alone cannot tell
    res = verify(path, head)
    assert (res.ok, res.broken_line) == (False, 5)
    assert "truncated" in res.reason
    assert log.head().entries == 4
    with pytest.raises(SystemExit) as exc:
        main(["audit", "verify", str(path), "--head", f"{head.entries}:{head.last_hash}"])
    assert exc.value.code == 1
    assert "truncated" in capsys.readouterr().err
    # appending more after the recorded head is fine; rewriting the tail is not
    path.write_bytes(b"".join(lines))
    log.append("job.finished", job="verify")
    assert verify(path, head).ok
    main(["audit", "verify", str(path), "--head", f"{head.entries}:{head.last_hash}"])
    assert "reaches the recorded head" in capsys.readouterr().out
    path.write_bytes(b"".join(lines[:5]))
    log.append("job.finished", job="forged")
    res = verify(path, head)
    assert (res.ok, res.broken_line) == (False, 6)


def test_head_metric_survives_an_unreadable_log(tmp_path: Path) -> None:
    """A scrape still answers when the audit log cannot be read (the head is left out)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from proxy.control.audit import AuditHeadCollector

    path = _log(tmp_path, 3)
    registry = CollectorRegistry()
    registry.register(AuditHeadCollector(AuditLog(path)))
    assert b"cmek_audit_entries 3.0" in generate_latest(registry)
    path.unlink()
    path.mkdir()  # reading a directory fails with an OSError other than "not found"
    assert b"cmek_audit_entries" not in generate_latest(registry)
