"""`mechscope demo`: Locate -> Steer -> Improve end to end, written up as one self-contained HTML report.

On a bundled organism (the default) the demo runs three loops on planted mechanisms whose ground truth
is known: the refusal direction (locate by difference of means and ablation scores, remove it by
directional ablation and weight orthogonalisation, measure refusal and side effects); a planted fact
(locate by causal tracing, rewrite with ROME, measure efficacy, generalisation, specificity, revert);
a sentiment steering vector (build, steer, measure flips against neutral-text KL); and features (a
sparse autoencoder, its feature cards, one feature ablated where it fires). On any other
model (without the organisms' vocabulary) it runs the model-agnostic induction-head loop.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mechscope.demo.common import Section
from mechscope.errors import ConfigError

ORGANISM_SECTIONS = ("refusal", "facts", "sentiment", "features", "monitor")
GENERIC_SECTIONS = ("induction",)
ALL_SECTIONS = (*ORGANISM_SECTIONS, *GENERIC_SECTIONS)


def _section_fn(name: str) -> Callable[..., Section]:
    from mechscope.demo import facts, features, induction, monitor, refusal, sentiment

    return {
        "features": features.run,
        "refusal": refusal.run,
        "facts": facts.run,
        "sentiment": sentiment.run,
        "induction": induction.run,
        "monitor": monitor.run,
    }[name]


def default_model() -> tuple[Any, str]:
    """The registry's default organism, loaded."""
    from mechscope.model.loading import load_model
    from mechscope.model.sources.names import DEFAULT_MODEL

    return load_model(DEFAULT_MODEL), DEFAULT_MODEL


@torch.no_grad()
def run_demo(
    model: str | None,
    out: Path,
    *,
    seed: int = 0,
    echo: Callable[[str], Any] = lambda _line: None,
    sections: tuple[str, ...] | None = None,
    runs: str | Path | None = None,
) -> Path:
    """Run the demo and write ``out/report.html`` plus ``out/metrics.json``; returns the report path.

    `sections` defaults to the organism loops when the model has the organisms' vocabulary and to the
    induction loop otherwise. With `runs` (a run store folder) each section is recorded as a run there
    (model fingerprint, seed, metrics, the results it made) and the report links to it.
    """
    from mechscope.improve.tasks import has_organism_vocabulary
    from mechscope.model.loading import load_model
    from mechscope.report.html import Report

    hm, label = (load_model(model), model) if model else default_model()
    organism = has_organism_vocabulary(hm)
    chosen = sections or (ORGANISM_SECTIONS if organism else GENERIC_SECTIONS)
    unknown = [s for s in chosen if s not in ALL_SECTIONS]
    if unknown:
        raise ConfigError(f"unknown demo sections {unknown}; known: {list(ALL_SECTIONS)}")
    needs_organism = [s for s in chosen if s in ORGANISM_SECTIONS]
    if needs_organism and not organism:
        raise ConfigError(
            f"sections {needs_organism} use the organisms' planted tasks, which {label!r} does not know; "
            f"run them on a bundled organism or choose from {list(GENERIC_SECTIONS)}"
        )
    echo(f"model: {label} ({hm.dims.family}, {hm.dims.n_layers} layers, d_model {hm.dims.d_model})")
    report = Report(f"mechscope demo: Locate -> Steer -> Improve on {label}")
    report.text(
        f"Model: {label} ({hm.dims.family}, {hm.dims.n_layers} layers, d_model {hm.dims.d_model}, "
        f"{hm.dims.n_heads} heads). Seed {seed}. Every number below was measured in this run."
    )
    metrics: dict[str, Any] = {"model": label, "seed": seed}
    for name in chosen:
        if runs is None:
            section = _section_fn(name)(hm, seed=seed, echo=echo)
            section.write(report)
        else:
            section = _recorded_section(name, hm, label, seed, echo, report, Path(runs))
        metrics[name] = section.metrics
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    return report.save(out / "report.html")


def _recorded_section(
    name: str, hm: Any, label: str, seed: int, echo: Callable[[str], Any], report: Any, runs: Path
) -> Section:
    """One section inside a recorded run; the report gets a link to the run in the local viewer."""
    import html
    import tempfile

    from mechscope import records

    with records.run(
        f"demo {name}",
        tags=["demo", name],
        store=runs,
        model=hm,
        model_source=label,
        seed=seed,
        config={"section": name, "model": label, "seed": seed},
        method=f"demo.{name}",
    ) as run:
        section = _section_fn(name)(hm, seed=seed, echo=echo)
        run.log_metrics(section.metrics)
        with tempfile.TemporaryDirectory() as tmp:
            figures = [payload for kind, payload in section.parts if kind == "figure"]
            for i, fig in enumerate(figures):
                path = Path(tmp) / f"figure-{i + 1}.json"
                path.write_text(fig.to_json(), encoding="utf-8")
                run.log_file(path, name=f"{name} figure {i + 1}")
    section.write(report)
    url = f"http://127.0.0.1:8765/runs/{run.id}"
    report.blocks.append(
        f"<p class='note'>Recorded as run <a href='{html.escape(url)}'>{html.escape(run.id)}</a> in "
        f"<code>{html.escape(str(runs))}</code>; browse it with <code>mechscope serve --runs "
        f"{html.escape(str(runs))}</code>.</p>"
    )
    echo(f"recorded run {run.id} in {runs}")
    return section


__all__ = ["ALL_SECTIONS", "run_demo"]
