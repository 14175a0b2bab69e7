"""Circuit comparison: which components of two models play the same role in one task.

The same discovery runs on both models: activation patching of every attention head (over all
positions), one prompt at a time, so each head gets an *effect profile* -- its effect on the task's
metric across the task's prompts. Heads of model A and B are then matched by the cosine similarity of
their profiles (sign, size and which prompts they matter on), among the `top` most important heads of
each model. The models may differ in architecture and size; they need the same prompts, tokenised by
each model's own tokenizer, and a metric per model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.locate.patching import activation_patch
from mechscope.results import Result
from mechscope.steer.intervention import require_hooked

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

#: Metric for one prompt: ``(prompt index) -> (logits [1, pos, d_vocab] -> [1] or scalar)``.
RowMetric = Callable[[int], Callable[[Tensor], Tensor]]


def effect_profiles(
    model: HookedModel,
    clean: Sequence[str],
    corrupt: Sequence[str],
    metric: RowMetric,
    *,
    direction: str = "noising",
) -> Float[Tensor, "layer head prompt"]:
    """Each head's patching effect (patched metric minus the unpatched base run's) on every prompt pair."""
    model = require_hooked(model)
    if isinstance(clean, str) or len(clean) != len(corrupt) or len(clean) < 2:
        raise ConfigError(
            f"expected at least 2 clean prompts and as many corrupted ones; got {len(clean)} and {len(corrupt)}"
        )
    out = []
    for i in range(len(clean)):
        pair = clean[i : i + 1], corrupt[i : i + 1]  # one prompt (a list of one text, or a [1, pos] tensor)
        result = activation_patch(model, pair[0], pair[1], "heads", metric(i), direction=direction)
        reference = result["clean"] if direction == "noising" else result["corrupt"]
        out.append(result["metric"] - reference)
    return torch.stack(out, dim=-1).double()


class CircuitComparison(Result):
    """``effect_a [layer_a, head_a]`` and ``effect_b [layer_b, head_b]``: mean effect of each head;
    ``similarity [a_head, b_head]``: profile cosine between the `top` heads of each model (labels
    ``L{layer}H{head}``); ``config["matches"]``: each top head of A with its best match in B."""

    method = "circuit_comparison"

    def default_tensor(self) -> str:
        return "similarity"

    @property
    def matches(self) -> list[dict[str, Any]]:
        return list(self.config["matches"])

    def plot(self, name: str | None = None, *, reduce: Sequence[str] = ("batch",), title: str | None = None) -> Any:
        """Side by side: each model's mean head effects, and the similarity of the top heads' profiles."""
        if name is not None:
            return super().plot(name, reduce=reduce, title=title)
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        names = self.config.get("names", ["A", "B"])
        fig = make_subplots(
            rows=1, cols=3, subplot_titles=[f"{names[0]}: head effect", f"{names[1]}: head effect", "profile cosine"]
        )
        for col, key in ((1, "effect_a"), (2, "effect_b")):
            values = self[key]
            fig.add_trace(
                go.Heatmap(z=values.tolist(), colorscale="RdBu", zmid=0, showscale=col == 2, name=key), row=1, col=col
            )
        fig.add_trace(
            go.Heatmap(
                z=self["similarity"].tolist(),
                x=self.labels["b_head"],
                y=self.labels["a_head"],
                colorscale="RdBu",
                zmid=0,
                zmin=-1,
                zmax=1,
                showscale=False,
            ),
            row=1,
            col=3,
        )
        for col in (1, 2):
            fig.update_xaxes(title_text="head", row=1, col=col)
            fig.update_yaxes(title_text="layer", autorange="reversed", row=1, col=col)
        fig.update_layout(title=title or f"circuit comparison: {names[0]} vs {names[1]}")
        return fig


def _top(effects: Tensor, k: int) -> list[tuple[int, int]]:
    mean = effects.mean(-1).abs().flatten()
    n_heads = effects.shape[1]
    return [(i // n_heads, i % n_heads) for i in mean.argsort(descending=True)[:k].tolist()]


def compare_circuits(
    model_a: HookedModel,
    model_b: HookedModel,
    clean: Sequence[str],
    corrupt: Sequence[str],
    metric_a: RowMetric,
    metric_b: RowMetric,
    *,
    top: int = 8,
    direction: str = "noising",
    names: tuple[str, str] = ("A", "B"),
) -> CircuitComparison:
    """Patch every head of both models on each prompt pair and match heads by their effect profiles."""
    if not isinstance(top, int) or top < 1:
        raise ConfigError(f"top must be a positive int; got {top!r}")
    prof_a = effect_profiles(model_a, clean, corrupt, metric_a, direction=direction)
    prof_b = effect_profiles(model_b, clean, corrupt, metric_b, direction=direction)
    top_a, top_b = _top(prof_a, top), _top(prof_b, top)
    rows_a = torch.stack([prof_a[layer, head] for layer, head in top_a])
    rows_b = torch.stack([prof_b[layer, head] for layer, head in top_b])
    unit_a = rows_a / rows_a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    unit_b = rows_b / rows_b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    similarity = unit_a @ unit_b.T
    label_a = [f"L{layer}H{head}" for layer, head in top_a]
    label_b = [f"L{layer}H{head}" for layer, head in top_b]
    matches = []
    for i, name in enumerate(label_a):
        j = int(similarity[i].argmax())
        matches.append(
            {
                "a": name,
                "b": label_b[j],
                "cosine": float(similarity[i, j]),
                "effect_a": float(rows_a[i].mean()),
                "effect_b": float(rows_b[j].mean()),
            }
        )
    return CircuitComparison(
        tensors={"effect_a": prof_a.mean(-1), "effect_b": prof_b.mean(-1), "similarity": similarity},
        axes={
            "effect_a": ("layer_a", "head_a"),
            "effect_b": ("layer_b", "head_b"),
            "similarity": ("a_head", "b_head"),
        },
        labels={"a_head": label_a, "b_head": label_b},
        config={"matches": matches, "names": list(names), "n_prompts": len(clean), "direction": direction, "top": top},
    )


__all__ = ["CircuitComparison", "RowMetric", "compare_circuits", "effect_profiles"]
