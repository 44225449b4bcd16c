"""Collecting measurements and rendering them as JSON and Markdown tables."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TARGETS = ("direct", "proxy", "proxy-default", "peer")
"""``proxy`` runs ``--workers 1``; ``proxy-default`` the default count (or ``--proxy-workers``)."""
RATIOS = (
    ("proxy", "direct"),
    ("proxy", "peer"),
    ("proxy-default", "direct"),
    ("proxy-default", "peer"),
)
PEER_BACKEND = "rclone-dir"


@dataclass
class Series:
    """One row of the table: a metric of a scenario, with values per target (one per repeat)."""

    backend: str
    scenario: str
    params: str
    metric: str
    unit: str
    better: str  # "higher" or "lower"
    values: dict[str, list[float]] = field(default_factory=dict)

    def summary(self, target: str) -> dict[str, float] | None:
        vals = self.values.get(target)
        if not vals:
            return None
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}

    def ratio(self, num: str, den: str) -> float | None:
        a, b = self.summary(num), self.summary(den)
        if a is None or b is None or b["median"] == 0:
            return None
        return a["median"] / b["median"]


@dataclass
class Results:
    """All series of a run, in insertion order, plus run metadata and per-target errors."""

    meta: dict[str, Any] = field(default_factory=dict)
    series: dict[tuple[str, str, str, str], Series] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)

    def add(
        self,
        backend: str,
        scenario: str,
        params: str,
        metric: str,
        unit: str,
        better: str,
        target: str,
        value: float,
    ) -> None:
        key = (backend, scenario, params, metric)
        s = self.series.get(key)
        if s is None:
            s = Series(backend, scenario, params, metric, unit, better)
            self.series[key] = s
        s.values.setdefault(target, []).append(value)

    def to_json(self) -> dict[str, Any]:
        rows = []
        for s in self.series.values():
            rows.append(
                {
                    "backend": s.backend,
                    "scenario": s.scenario,
                    "params": s.params,
                    "metric": s.metric,
                    "unit": s.unit,
                    "better": s.better,
                    "targets": {t: s.summary(t) for t in TARGETS},
                    "values": s.values,
                    "ratios": {f"{a}/{b}": s.ratio(a, b) for a, b in RATIOS},
                }
            )
        return {"meta": self.meta, "errors": self.errors, "rows": rows}


def fmt(x: float) -> str:
    """Three significant figures, no exponent for the usual ranges."""
    if x == 0:
        return "0"
    ax = abs(x)
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    if ax >= 0.01:
        return f"{x:.3f}"
    return f"{x:.2g}"


def _cell(summary: dict[str, float] | None, na: str) -> str:
    if summary is None:
        return na
    if summary["min"] == summary["max"]:
        return fmt(summary["median"])
    return f"{fmt(summary['median'])} ({fmt(summary['min'])}-{fmt(summary['max'])})"


def _ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def render_markdown(res: Results) -> str:
    """One table per backend; cells are ``median (min-max)`` over the measured repeats."""
    lines: list[str] = []
    meta = res.meta
    lines.append("# cmek-proxy benchmark results")
    lines.append("")
    keys = ("started", "command", "host", "load", "loop", "signing_rate", "proxy_workers")
    for k in (*keys, "repeats", "duration_s"):
        if k in meta:
            lines.append(f"- **{k}**: {meta[k]}")
    lines.append("")
    lines.append(
        "Cells: median (min-max) over the measured repetitions; warm-up excluded. "
        "Ratios compare medians. ↑ = higher is better, ↓ = lower is better."
    )
    backends = list(dict.fromkeys(s.backend for s in res.series.values()))
    for b in backends:
        lines.append("")
        lines.append(f"## Backend: {b}")
        lines.append("")
        peer_na = "n/a (peer runs on rclone-dir only)" if b != PEER_BACKEND else "-"
        if b != PEER_BACKEND:
            lines.append(
                "The peer (rclone crypt) stores to a local directory, so it is measured only "
                "with the rclone-dir backend; its column is n/a here."
            )
            lines.append("")
        lines.append(
            "| scenario | params | metric | direct | proxy w=1 | proxy w=default | peer "
            "| w=1/direct | w=1/peer | default/direct | default/peer |"
        )
        lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for s in res.series.values():
            if s.backend != b:
                continue
            arrow = "↑" if s.better == "higher" else "↓"
            lines.append(
                f"| {s.scenario} | {s.params} | {s.metric} ({s.unit}) {arrow} "
                f"| {_cell(s.summary('direct'), '-')} | {_cell(s.summary('proxy'), '-')} "
                f"| {_cell(s.summary('proxy-default'), '-')} "
                f"| {_cell(s.summary('peer'), peer_na)} | "
                + " | ".join(_ratio(s.ratio(a, b)) for a, b in RATIOS)
                + " |"
            )
    if res.errors:
        lines.append("")
        lines.append("## Errors")
        lines.append("")
        for e in res.errors:
            where = " / ".join(e[k] for k in ("backend", "target", "scenario") if k in e)
            lines.append(f"- {where}: {e['error']}")
    lines.append("")
    return "\n".join(lines)


def write(res: Results, out: Path) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``out``; returns both paths."""
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / "results.json", out / "results.md"
    jpath.write_text(json.dumps(res.to_json(), indent=2) + "\n")
    mpath.write_text(render_markdown(res))
    return jpath, mpath
