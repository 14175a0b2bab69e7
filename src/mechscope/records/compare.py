"""Side-by-side comparison of runs: metrics, the config keys that differ, and provenance that differs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mechscope.errors import ConfigError
from mechscope.records.store import RunRecord, RunStore


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """Runs in the order asked; rows are (name, one value per run or None where a run lacks it)."""

    runs: tuple[RunRecord, ...]
    metrics: tuple[tuple[str, tuple[float | None, ...]], ...]
    config: tuple[tuple[str, tuple[Any, ...]], ...]
    provenance: tuple[tuple[str, tuple[Any, ...]], ...]

    def table(self) -> str:
        """A Markdown table of the metrics, then one of the differing config and provenance entries."""
        head = "| metric | " + " | ".join(f"{r.name} ({r.id})" for r in self.runs) + " |"
        rule = "|---|" + "---|" * len(self.runs)
        lines = [head, rule]
        lines += [f"| {name} | " + " | ".join(_fmt(v) for v in values) + " |" for name, values in self.metrics]
        differing = [*self.config, *self.provenance]
        if differing:
            lines += ["", head.replace("| metric |", "| differs |", 1), rule]
            lines += [f"| {name} | " + " | ".join(_fmt(v) for v in values) + " |" for name, values in differing]
        return "\n".join(lines)


def compare(store: RunStore, run_ids: Sequence[str]) -> Comparison:
    """Compare two or more runs of `store` (metrics are each metric's last value)."""
    ids = list(dict.fromkeys(run_ids))
    if len(ids) < 2:
        raise ConfigError(f"compare needs two or more distinct run ids; got {list(run_ids)}")
    runs = tuple(store.get(i) for i in ids)
    names = sorted({m for r in runs for m in r.metrics})
    metrics = tuple((m, tuple(r.metric(m) if m in r.metrics else None for r in runs)) for m in names)
    return Comparison(
        runs=runs,
        metrics=metrics,
        config=_differing([_flatten(r.config) for r in runs], prefix="config."),
        provenance=_differing([_provenance(r) for r in runs], prefix=""),
    )


def _provenance(run: RunRecord) -> dict[str, Any]:
    found: dict[str, Any] = {
        "method": run.method,
        "seed": run.seed,
        "git_commit": run.git_commit,
        **{f"version.{k}": v for k, v in run.versions.items()},
    }
    for i, m in enumerate(run.models):
        found[f"model[{i}].source"] = m.source
        found[f"model[{i}].fingerprint"] = m.fingerprint
        found[f"model[{i}].weights_sha256"] = m.weights_sha256[:16]
    return found


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _differing(entries: list[dict[str, Any]], *, prefix: str) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    keys = sorted({k for e in entries for k in e})
    rows = []
    for key in keys:
        values = tuple(e.get(key) for e in entries)
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1:
            rows.append((f"{prefix}{key}", values))
    return tuple(rows)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


__all__ = ["Comparison", "compare"]
