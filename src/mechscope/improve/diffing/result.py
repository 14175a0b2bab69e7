"""DiffResult: every view of a model diff as one plain-data mechscope Result (save, load, plot)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mechscope.errors import ConfigError
from mechscope.results import Result

#: view name -> (tensor ranked, its component axis).
VIEWS: dict[str, tuple[str, str]] = {
    "weights": ("weight_rel", "w_component"),
    "local": ("local_rel", "a_component"),
    "causal": ("causal_effect", "c_component"),
}


class DiffResult(Result):
    """Where a tuned model differs from its base.

    Tensors (those of views that were run):

    - ``weight_rel`` / ``weight_abs [w_component]``: relative and absolute Frobenius norm of each
      component's weight change; ``head_weight_rel [layer, head, matrix]``: per head, W_Q/W_K/W_V/W_O.
    - ``act_total [act_kind, layer]``: RMS of the activation difference relative to the base's, per site.
    - ``local_rel [a_component]``: each component's own change with the base run's inputs.
    - ``lens_tokens`` / ``lens_scores [layer, k]``: tokens the mean difference after each layer pushes up
      (``lens_down_*`` down), through the base model's final norm and unembedding.
    - ``kl [batch, pos]``: ``KL(base || tuned)`` per position (0 at padding); ``real [batch, pos]`` the mask.
    - ``causal_metric`` / ``causal_effect [c_component]``: cross-model patching (the base model receiving
      each component from the tuned model); ``causal_ref [run]``: the unpatched base and tuned metrics.

    ``config`` holds the token strings of the lens (``lens_strings``), the texts and how it was made.
    """

    method = "model_diff"

    def default_tensor(self) -> str:
        return "weight_rel" if "weight_rel" in self.tensors else next(iter(self.tensors))

    def views(self) -> list[str]:
        """The views this result holds, of ``weights``, ``local`` and ``causal``."""
        return [v for v, (t, _) in VIEWS.items() if t in self.tensors]

    def ranking(self, view: str = "weights", top: int | None = None) -> list[tuple[str, float]]:
        """Components by decreasing change in one view: ``weights``, ``local`` or ``causal``."""
        if view not in VIEWS:
            raise ConfigError(f"view must be one of {list(VIEWS)}; got {view!r}")
        tensor, axis = VIEWS[view]
        if tensor not in self.tensors:
            raise ConfigError(f"this diff has no {view!r} view; it has {self.views()}")
        values = self[tensor].tolist()
        order = sorted(range(len(values)), key=lambda i: -abs(values[i]))
        ranked = [(self.labels[axis][i], float(values[i])) for i in order]
        return ranked if top is None else ranked[:top]

    def rank_of(self, component: str, view: str = "weights") -> int:
        """1-based rank of `component` in `view` (1 = changed most)."""
        names = [c for c, _ in self.ranking(view)]
        if component not in names:
            raise ConfigError(f"no component {component!r} in the {view} view; it has {names[:8]}...")
        return names.index(component) + 1

    def lens(self, layer: int = -1, *, pushed: bool = True) -> list[tuple[str, float]]:
        """The tokens the fine-tune pushes up (or down, ``pushed=False``) after `layer`, with their scores."""
        key = "lens" if pushed else "lens_down"
        if f"{key}_scores" not in self.tensors:
            raise ConfigError("this diff has no lens view (run it with texts)")
        strings = self.config[f"{key}_strings"][layer]
        return list(zip(strings, self[f"{key}_scores"][layer].tolist(), strict=True))

    @property
    def kl_mean(self) -> float:
        """Mean ``KL(base || tuned)`` over real positions."""
        real = self["real"]
        return float((self["kl"] * real).sum() / real.sum())

    @property
    def kl_last(self) -> float:
        """Mean ``KL(base || tuned)`` at each text's last real token: on prompts that end where a behaviour
        shows (before a verdict or answer word), the change of that behaviour alone."""
        import torch

        real = self["real"].bool()
        positions = torch.arange(real.shape[1]).expand_as(real)
        last = torch.where(real, positions, -1).max(dim=1).values
        return float(self["kl"][torch.arange(real.shape[0]), last].mean())

    def summary(self, top: int = 5) -> str:
        """A Markdown summary: the top components of each view, the lens of the last layer, the KL."""
        lines = [f"model diff ({self.config.get('n_texts', 0)} texts); mean KL(base||tuned) = {self.kl_mean:.4g}"]
        for view in self.views():
            cells = ", ".join(f"`{c}` {v:.3g}" for c, v in self.ranking(view, top))
            lines.append(f"- {view}: {cells}")
        if "lens_scores" in self.tensors:
            pushed = ", ".join(repr(t) for t, _ in self.lens(-1)[:top])
            lines.append(f"- lens (last layer) pushes: {pushed}")
        return "\n".join(lines)

    def plot(self, name: str | None = None, *, reduce: Sequence[str] = ("batch",), title: str | None = None) -> Any:
        """With no name, one figure of every view (top components per view, activation differences per
        layer, KL by position); with a tensor name, that tensor (as :meth:`Result.plot`)."""
        if name is not None:
            return super().plot(name, reduce=reduce, title=title)
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        panels = [v for v in self.views()] + ["act_total", "kl"]
        panels = [p for p in panels if p in VIEWS or p in self.tensors]
        fig = make_subplots(rows=len(panels), cols=1, subplot_titles=panels, vertical_spacing=0.08)
        for row, panel in enumerate(panels, start=1):
            if panel in VIEWS:
                ranked = self.ranking(panel, 15)
                fig.add_trace(go.Bar(x=[c for c, _ in ranked], y=[v for _, v in ranked], name=panel), row=row, col=1)
            elif panel == "act_total":
                for i, kind in enumerate(self.labels["act_kind"]):
                    fig.add_trace(
                        go.Scatter(
                            x=self.labels["layer"], y=self["act_total"][i].tolist(), name=kind, mode="lines+markers"
                        ),
                        row=row,
                        col=1,
                    )
            else:
                fig.add_trace(
                    go.Heatmap(z=self["kl"].tolist(), colorscale="Reds", showscale=False, name="kl"), row=row, col=1
                )
        fig.update_layout(title=title or "model diff: base vs tuned", height=320 * len(panels), showlegend=True)
        return fig


__all__ = ["VIEWS", "DiffResult"]
