"""Dependencies point one way: a module never imports a room above its own.

Rooms, bottom to top (docs/ARCHITECTURE.md draws them):

    base     proxy.errors, proxy.config, proxy.metrics, proxy.reqctx
    1        proxy.crypto (pure format)      proxy.wire (S3 wire protocol)
    2        proxy.kms (providers, key service)   proxy.backend (backend client)
    3        proxy.layer (the encryption layer)
    4        proxy.control (policy, specs, audit, jobs, admin API)
    5        proxy.s3 (the S3 front end)
    top      proxy.app, proxy.cli, proxy.devmode, proxy.workers, proxy.loop, proxy.__main__

A module may import its own room and any room of a lower rank; rooms of the same rank do
not import each other. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "proxy"

GROUPS = {
    "errors": "base",
    "config": "base",
    "metrics": "base",
    "reqctx": "base",
    "app": "top",
    "cli": "top",
    "devmode": "top",
    "logs": "top",
    "workers": "top",
    "loop": "top",
    "__main__": "top",
}
"""Root modules that form one room together."""
RANKS: dict[str, int] = {
    "base": 0,
    "crypto": 1,
    "wire": 1,
    "kms": 2,
    "backend": 2,
    "layer": 3,
    "control": 4,
    "s3": 5,
    "top": 6,
}
MAX_LINES = 500


def _room(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "proxy", module
    room = parts[1] if len(parts) > 1 else "base"
    return GROUPS.get(room, room)


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        out.append((name.removesuffix(".__init__"), path))
    return out


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("proxy")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target == "proxy":  # from proxy import crypto
                found += [(node.lineno, f"proxy.{a.name}") for a in node.names]
            elif target.startswith("proxy."):
                found.append((node.lineno, target))
    return found


def test_every_module_is_in_a_room() -> None:
    rooms = {_room(name) for name, _ in _modules() if name != "proxy"}
    assert rooms <= set(RANKS), f"modules outside the known rooms: {rooms - set(RANKS)}"


def test_imports_point_down() -> None:
    upward = []
    for name, path in _modules():
        if name == "proxy":
            continue
        mine = _room(name)
        for line, target in _imports(path, name):
            theirs = _room(target)
            if theirs != mine and RANKS[theirs] >= RANKS[mine]:
                upward.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}")
    assert not upward, "imports that run upward or sideways:\n" + "\n".join(upward)


@pytest.mark.parametrize("name,path", _modules(), ids=[n for n, _ in _modules()])
def test_rooms_stay_small(name: str, path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (keep modules under {MAX_LINES})"


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: an upward import in a layer module is found."""
    bad = tmp_path / "proxy" / "layer" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("from proxy.s3.handlers import S3Handlers\nfrom . import objects\n")
    found = _imports(bad, "proxy.layer.bad")
    assert [t for _, t in found] == ["proxy.s3.handlers", "proxy.layer"]
    assert RANKS[_room(found[0][1])] > RANKS["layer"]


def test_architecture_names_every_module() -> None:
    """docs/ARCHITECTURE.md stays true: every room and module of proxy/ appears in it."""
    text = (ROOT.parent / "docs" / "ARCHITECTURE.md").read_text()
    missing = []
    for name, path in _modules():
        if path.name == "__init__.py" and path.parent != ROOT:
            room = path.parent.relative_to(ROOT).as_posix() + "/"
            if room not in text and f"`{path.parent.name}/`" not in text:
                missing.append(room)
        elif path.name not in ("__init__.py", "__main__.py"):
            stem = path.stem
            if f"{stem}.py" not in text and f"`{stem}`" not in text:
                missing.append(name)
    assert not missing, f"docs/ARCHITECTURE.md does not mention: {missing}"
