"""Harmful-head removal: find the smallest set of attention heads whose ablation removes a behaviour.

1. **Locate**: each head alone is mean-ablated (its ``hook_z`` replaced by its mean over every token of
   benign reference prompts) on the prompts that elicit the behaviour; its effect is the drop of the
   behaviour score.
2. **Select**: among the ``pool`` strongest single heads, the head whose *addition* to the set lowers the
   score most is added, step by step (so backup heads that only matter together are found), until the
   score falls to ``config.target``, ``max_heads`` is reached, or no candidate lowers it further; then
   each chosen head is dropped again if the rest still meets the target.
3. **Report**: a :class:`HeadRemovalResult` with every head's single effect, the score curve as heads are
   added, and the chosen set; :meth:`HeadRemovalResult.intervention` rebuilds the ablation so the
   evaluation harness can measure its target and side effects.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from mechscope.errors import ConfigError
from mechscope.results import Result
from mechscope.sites import Site
from mechscope.steer.ablation import Ablation, mean_ablation
from mechscope.steer.intervention import Intervention, check_finite, require_hooked

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

#: The behaviour's strength on the model as it runs now: ``(model, prompts) -> float`` (higher = more).
Score = Callable[["HookedModel", list[str]], float]


@dataclass(frozen=True, kw_only=True)
class HeadRemovalConfig:
    """``target``: the behaviour score to reach; ``max_heads``: the most heads ablated together;
    ``pool``: how many of the strongest single heads are candidates at each greedy step."""

    target: float
    max_heads: int = 8
    pool: int = 16

    def __post_init__(self) -> None:
        check_finite("target", self.target)
        for name in ("max_heads", "pool"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"HeadRemovalConfig.{name} must be a positive int; got {value!r}")


class HeadSetAblation(Intervention):
    """Mean-ablate a set of heads, possibly in several layers (one :class:`Ablation` per layer)."""

    kind = "head_set_ablation"

    def __init__(self, model: HookedModel, heads: Sequence[tuple[int, int]], reference: Sequence[str]) -> None:
        super().__init__(model)
        if not heads:
            raise ConfigError("expected at least one (layer, head) to ablate")
        by_layer: dict[int, list[int]] = {}
        for layer, head in heads:
            by_layer.setdefault(int(layer), []).append(int(head))
        self.heads = sorted((int(layer), int(head)) for layer, head in heads)
        self.children: list[Ablation] = [  # one per layer; their hooks make this one's plan
            mean_ablation(self.model, Site("attn.hook_z", layer), list(reference), over="tokens", heads=hs)
            for layer, hs in sorted(by_layer.items())
        ]

    def describe(self) -> str:
        return "mean ablation of heads " + ", ".join(f"L{layer}H{head}" for layer, head in self.heads)


class HeadRemovalResult(Result):
    """``single_effect [layer, head]``: score drop with that head ablated alone; ``curve [step]``: the score
    with the first k heads of the greedy order (``config["order"]``) ablated (step 0: none);
    ``config["heads"]``: the chosen set after pruning, ``config["scores"]``: the score before and with it."""

    method = "head_removal"

    def default_tensor(self) -> str:
        return "single_effect"

    @property
    def heads(self) -> list[tuple[int, int]]:
        return [(int(layer), int(head)) for layer, head in self.config["heads"]]

    def intervention(self, model: HookedModel, reference: Sequence[str]) -> HeadSetAblation:
        """The chosen heads' ablation on `model` (with the same kind of reference prompts)."""
        return HeadSetAblation(model, self.heads, reference)


def find_harmful_heads(
    model: HookedModel,
    harmful: Sequence[str],
    reference: Sequence[str],
    score: Score,
    config: HeadRemovalConfig,
) -> HeadRemovalResult:
    """Locate the heads carrying `score` on `harmful` prompts and the smallest set whose ablation removes it."""
    model = require_hooked(model)
    for name, texts in (("harmful", harmful), ("reference", reference)):
        if isinstance(texts, str) or not texts:
            raise ConfigError(f"{name} must be a non-empty list of prompts; got {texts!r}")
    if not isinstance(config, HeadRemovalConfig):
        raise ConfigError(f"config must be a HeadRemovalConfig; got {type(config).__name__}")
    prompts = list(harmful)

    def measure(heads: Sequence[tuple[int, int]]) -> float:
        with torch.no_grad(), ExitStack() as stack:
            if heads:
                stack.enter_context(HeadSetAblation(model, heads, reference))
            return float(score(model, prompts))

    before = measure([])
    d = model.dims
    single = torch.zeros(d.n_layers, d.n_heads, dtype=torch.float64)
    for layer in range(d.n_layers):
        for head in range(d.n_heads):
            single[layer, head] = before - measure([(layer, head)])
    ranked = [(i // d.n_heads, i % d.n_heads) for i in single.flatten().argsort(descending=True).tolist()]
    pool = ranked[: config.pool]
    chosen: list[tuple[int, int]] = []
    curve = [before]
    while len(chosen) < config.max_heads and curve[-1] > config.target:
        trials = {cell: measure([*chosen, cell]) for cell in pool if cell not in chosen}
        if not trials:
            break
        best = min(trials, key=lambda cell: trials[cell])
        if trials[best] >= curve[-1]:
            break  # no remaining candidate lowers the score: adding heads would only add side effects
        chosen.append(best)
        curve.append(trials[best])
    chosen_order = list(chosen)
    reached = curve[-1] <= config.target
    if reached:
        for cell in list(chosen):
            rest = [h for h in chosen if h != cell]
            if rest and measure(rest) <= config.target:
                chosen = rest
    after = measure(chosen)
    return HeadRemovalResult(
        tensors={"single_effect": single, "curve": torch.tensor(curve, dtype=torch.float64)},
        axes={"single_effect": ("layer", "head"), "curve": ("step",)},
        labels={"layer": [str(i) for i in range(d.n_layers)], "head": [f"H{h}" for h in range(d.n_heads)]},
        config={
            "heads": [list(h) for h in chosen],
            "scores": {"before": before, "after": after},
            "reached_target": reached,
            "order": [list(h) for h in chosen_order],
            **asdict(config),
            "n_harmful": len(prompts),
            "n_reference": len(reference),
        },
    )


__all__ = ["HeadRemovalConfig", "HeadRemovalResult", "HeadSetAblation", "Score", "find_harmful_heads"]
