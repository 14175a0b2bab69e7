"""What editing at each candidate layer would cost: ROME at every layer a localisation points to, measured.

Causal tracing says where a fact's recall *flows*; it does not say where an edit is *safe*. On
SmolLM2 the MLP peak at the subject's last token led to layer 0, where a ROME edit broke 12 of 14
neighbouring facts (0 of 14 at layer 4). :func:`edit_cost_by_layer` makes the comparison a single call:
for each candidate layer it applies the edit, measures efficacy, paraphrase generalisation and the
neighbourhood (the same relation asked about other subjects, answered by the unedited model), reverts
the edit bit for bit, and returns one :class:`EditCostResult` (``[layer, metric]``) whose
:meth:`~EditCostResult.best` names the layer that makes the edit with the least collateral damage.

:func:`candidate_layers` turns a tracing result into those candidates: every layer whose restoring
effect at the subject's last token is within two standard errors of the peak, plus ``margin`` layers
on each side (the peak's position is only known up to that range).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from mechscope.errors import ConfigError
from mechscope.results import Result

#: Metrics per layer, each measured after the edit (``*_before`` columns are the unedited model's).
COST_METRICS = (
    "efficacy",
    "target_prob",
    "paraphrase",
    "neighbourhood_unchanged",
    "neighbourhood_to_target",
    "neighbourhood_kl",
    "rounds",
)


class EditCostResult(Result):
    """Edit metrics per candidate layer: tensor ``cost [layer, metric]``; labels name the layers and metrics.

    ``config`` holds the request, the edit method and the neighbour prompts used, so a saved result says
    exactly what was measured.
    """

    method: ClassVar[str] = "edit_cost"

    def default_tensor(self) -> str:
        return "cost"

    def column(self, metric: str) -> dict[int, float]:
        """layer -> value of `metric` (one of :data:`COST_METRICS`)."""
        names = self.labels["metric"]
        if metric not in names:
            raise ConfigError(f"unknown edit-cost metric {metric!r}; expected one of {names}")
        values = self.tensors["cost"][:, names.index(metric)]
        return {int(layer): float(v) for layer, v in zip(self.labels["layer"], values, strict=True)}

    def best(self, *, min_efficacy: float = 1.0) -> int | None:
        """The layer whose edit succeeds (efficacy >= `min_efficacy`) with the fewest neighbours turned
        into the target, then the fewest changed at all, then the lowest neighbourhood KL; None if the edit
        succeeds nowhere."""
        efficacy = self.column("efficacy")
        to_target = self.column("neighbourhood_to_target")
        unchanged = self.column("neighbourhood_unchanged")
        kl = self.column("neighbourhood_kl")
        ok = [layer for layer, e in efficacy.items() if e >= min_efficacy]
        if not ok:
            return None
        return min(ok, key=lambda layer: (to_target[layer], -unchanged[layer], kl[layer], layer))

    def table(self) -> str:
        """A plain-text table, one row per layer, the recommended layer marked."""
        best = self.best()
        head = f"{'layer':>6s}{'efficacy':>10s}{'p(target)':>11s}{'paraphr.':>10s}{'nbr kept':>10s}"
        head += f"{'nbr->tgt':>10s}{'nbr KL':>9s}{'rounds':>8s}"
        rows = [head]
        cost = self.tensors["cost"]
        for i, layer in enumerate(self.labels["layer"]):
            v = [float(x) for x in cost[i]]
            mark = "  <- least collateral damage" if best is not None and int(layer) == best else ""
            rows.append(
                f"{layer:>6s}{v[0]:10.2f}{v[1]:11.3f}{_fmt(v[2]):>10s}{v[3]:10.2f}{v[4]:10.2f}{v[5]:9.4f}"
                f"{int(v[6]):8d}{mark}"
            )
        return "\n".join(rows)

    def plot(self, name: str | None = None, *, reduce: Sequence[str] = (), title: str | None = None) -> Any:
        """Lines of efficacy and the neighbourhood metrics against the layer."""
        if name is not None:
            return super().plot(name, reduce=reduce, title=title)
        import plotly.graph_objects as go

        layers = [int(x) for x in self.labels["layer"]]
        fig = go.Figure(
            [
                go.Scatter(x=layers, y=list(self.column(m).values()), mode="lines+markers", name=m)
                for m in ("efficacy", "paraphrase", "neighbourhood_unchanged", "neighbourhood_to_target")
            ]
        )
        request = self.config["request"]
        fig.update_layout(
            title=title or f"edit cost by layer: {request['subject']} -> {request['target']!r}",
            xaxis_title="edited layer",
            yaxis_title="share",
        )
        return fig


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def candidate_layers(trace: Any, *, kind: str = "mlp", margin: int = 1, n_layers: int | None = None) -> list[int]:
    """The layers a causal trace points to for `kind` at the subject's last token: every layer within two
    standard errors of the peak, widened by `margin` on each side, clipped to the layers ROME can edit
    (every one but the last)."""
    if kind not in trace.config["kinds"]:
        raise ConfigError(f"the trace has no {kind!r} kind; it traced {list(trace.config['kinds'])}")
    if not isinstance(margin, int) or margin < 0:
        raise ConfigError(f"margin must be a non-negative int; got {margin!r}")
    last = max(trace.config["subject_positions"])
    estimate = trace.peak_estimate(kind, [last])
    depth = n_layers if n_layers is not None else len(trace.labels["layer"])
    low, high = min(estimate.layers) - margin, max(estimate.layers) + margin
    return list(range(max(0, low), min(depth - 2, high) + 1))


def edit_cost_by_layer(
    model: Any,
    request: Any,
    layers: Sequence[int],
    *,
    config: Any = None,
    neighbourhood: Any = None,
    mom2: dict[int, torch.Tensor] | None = None,
    texts: Sequence[str] | None = None,
    cache_dir: str | None = None,
    progress: bool = False,
) -> EditCostResult:
    """ROME `request` at each of `layers` in turn, measured and reverted; the model ends bit for bit as it began.

    Args:
        model: a :class:`~mechscope.model.hooked.HookedModel`.
        request: an :class:`~mechscope.steer.editing.requests.EditRequest`; its neighbours (other subjects
            under the same relation, with the unedited model's answers) are built once, before any edit,
            unless it has some.
        layers: candidate MLP layers (e.g. :func:`candidate_layers` of a causal trace).
        config: a :class:`~mechscope.steer.editing.rome.ROMEConfig` (its ``layer`` is replaced per layer).
        neighbourhood: a :class:`~mechscope.steer.editing.neighbourhood.NeighbourhoodConfig` (default: 14
            subjects of the edited subject's kind).
        mom2: key statistics per layer; missing layers are computed together, in one pass over `texts`
            (or the model's default text), and cached under `cache_dir`.
    """
    from mechscope.steer.editing.neighbourhood import NeighbourhoodConfig, with_neighbourhood
    from mechscope.steer.editing.requests import EditRequest
    from mechscope.steer.editing.rome import ROMEConfig

    if not isinstance(request, EditRequest):
        raise ConfigError(f"edit_cost_by_layer needs an EditRequest; got {type(request).__name__}")
    n_layers = model.dims.n_layers
    chosen = list(dict.fromkeys(int(x) for x in layers))
    if not chosen:
        raise ConfigError("edit_cost_by_layer needs at least one layer")
    bad = [x for x in chosen if not 0 <= x < n_layers - 1]
    if bad:
        raise ConfigError(
            f"layers must be in 0..{n_layers - 2} for this {n_layers}-layer model (ROME's edited layer must be "
            f"followed by another); got {bad}"
        )
    base = config if config is not None else ROMEConfig()
    near = neighbourhood if neighbourhood is not None else NeighbourhoodConfig()
    request = with_neighbourhood(model, request, near)
    rows = _measure_layers(model, request, chosen, base, mom2 or {}, texts, cache_dir, progress)
    return EditCostResult(
        tensors={"cost": torch.tensor(rows, dtype=torch.float32)},
        axes={"cost": ("layer", "metric")},
        labels={"layer": [str(x) for x in chosen], "metric": list(COST_METRICS)},
        config={
            "request": request.to_dict(),
            "method": "rome",
            "rome": {k: v for k, v in base.__dict__.items() if k not in ("layer", "stats")},
            "n_neighbours": len(request.neighbours),
        },
    )


def _measure_layers(
    model: Any,
    request: Any,
    layers: list[int],
    base: Any,
    mom2: dict[int, torch.Tensor],
    texts: Sequence[str] | None,
    cache_dir: str | None,
    progress: bool,
) -> list[list[float]]:
    """One row of :data:`COST_METRICS` per layer: statistics, edit, measure, revert."""
    from mechscope.steer.editing.metrics import edit_metrics
    from mechscope.steer.editing.rome import rome
    from mechscope.steer.editing.stats import second_moments

    missing = [layer for layer in layers if layer not in mom2]
    if missing:  # every candidate's key statistics in one pass over the text (cached for later runs)
        got = second_moments(
            model,
            missing,
            config=base.stats,
            texts=None if texts is None else list(texts),
            cache_dir=cache_dir,
            progress=progress,
        )
        mom2 = {**mom2, **got}
    rows: list[list[float]] = []
    for layer in tqdm(layers, desc="edit cost", unit="layer", disable=not progress):
        record = rome(model, request, replace(base, layer=layer), mom2=mom2[layer], cache_dir=cache_dir)
        try:
            after = {name: values["after"] for name, values in edit_metrics(model, record=record).summary().items()}
        finally:
            record.revert(model)
        rows.append([after[m] for m in COST_METRICS[:-1]] + [float(record.info["rounds"])])
    return rows


__all__ = ["COST_METRICS", "EditCostResult", "candidate_layers", "edit_cost_by_layer"]
