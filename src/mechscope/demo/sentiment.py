"""Demo loop 3: a sentiment steering vector -- build it, steer with it, measure flips against side effects."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mechscope.demo.common import Section, markdown_rows

COEFFICIENTS = (0.0, 0.35, 0.7, 1.0)


def run(hm: Any, *, seed: int = 0, echo: Callable[[str], Any]) -> Section:
    import plotly.graph_objects as go

    from mechscope.data.contrasts import contrast_texts
    from mechscope.improve import EvaluationConfig, SentimentTask, evaluate
    from mechscope.steer import mean_difference, steer

    section = Section()
    negative, positive = contrast_texts("sentiment", n=32, seed=seed)
    layer = max(0, hm.dims.n_layers - 1)
    vector = mean_difference(hm, negative, positive, layers=layer)
    echo(f"Locate: sentiment vector = mean(negative reviews) - mean(positive reviews) at layer {layer}")
    task = SentimentTask(n_eval=100, n_samples=4, seed=seed)
    sweep = []
    for coefficient in COEFFICIENTS:
        cfg = EvaluationConfig(side_tasks=(), max_new_tokens=8, seed=seed)
        res = evaluate(hm, steer(hm, vector, coefficient), task, cfg)
        sweep.append((coefficient, res))
    strongest = max(sweep, key=lambda cr: cr[1].after("flip_rate"))[0]
    chosen_coefficient = next((c for c, r in sweep if r.after("flip_rate") >= 0.8), strongest)
    full = evaluate(hm, steer(hm, vector, chosen_coefficient), task, EvaluationConfig(max_new_tokens=8, seed=seed))
    echo(
        f"Steer: coefficient {chosen_coefficient}: positive reviews flipped to negative "
        f"{full.after('flip_rate'):.2f} (before {full.before('flip_rate'):.2f}); "
        f"neutral-text KL {full.after('kl_neutral'):.4f}"
    )
    section.metrics = {
        "layer": layer,
        "sweep": [
            {"coefficient": c, "flip_rate": r.after("flip_rate"), "kl_neutral": r.after("kl_neutral")} for c, r in sweep
        ],
        "chosen_coefficient": chosen_coefficient,
        "evaluation": {m: {"before": full.before(m), "after": full.after(m)} for m in full.metrics},
    }
    section.add("section", "3. Sentiment: a steering vector, its dose-response and its side effects")
    section.add(
        "text",
        f"Locate. The steering vector is the difference of mean residual activations (layer {layer}, last "
        f"token) between {len(negative)} negative and {len(positive)} positive training reviews. Steer. It is "
        "added at every position with a coefficient. Improve. Target: the share of held-out positive reviews "
        "whose verdict word turns negative; side effect: KL to the unsteered model on neutral text.",
    )
    fig = go.Figure(
        [
            go.Scatter(x=[c for c, _ in sweep], y=[r.after("flip_rate") for _, r in sweep], name="flip rate"),
            go.Scatter(
                x=[c for c, _ in sweep], y=[r.after("kl_neutral") for _, r in sweep], name="neutral KL", yaxis="y2"
            ),
        ]
    )
    fig.update_layout(
        title="Sentiment steering: coefficient sweep",
        xaxis_title="coefficient",
        yaxis={"title": "flip rate"},
        yaxis2={"title": "neutral-text KL", "overlaying": "y", "side": "right"},
    )
    section.add("figure", fig)
    section.add("text", f"At coefficient {chosen_coefficient} (the smallest that flips at least 80 %, if any):")
    section.add("table", markdown_rows(full.table()))
    section.add("table", markdown_rows(full.samples_table()))
    if chosen_coefficient == 0.0:
        section.add("note", "No coefficient in the sweep flipped the sentiment: the vector did not steer this model.")
    return section


__all__ = ["run"]
