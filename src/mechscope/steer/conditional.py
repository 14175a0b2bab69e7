"""Conditional steering: a detector decides, prompt by prompt, whether an intervention applies.

A :class:`Condition` reads one residual-width site and scores each row ``act @ direction + bias`` (a
direction, a steering vector's direction at that layer, or a linear probe); the condition holds where
the score exceeds ``threshold``. :class:`ConditionalSteering` wraps any intervention (a steering
vector, a profile, an ablation): on the forward that reads the prompt, the detector's hook runs first
and fixes a per-row gate; every hook of the wrapped intervention then keeps its change only on rows
whose gate is open -- rows where the condition is false come out exactly as without the intervention.
Generated tokens keep the gate their prompt set (the batch does not change during ``generate``).

The detector must read a site no later in the forward than the first site the intervention changes
(the same site is fine: the detector reads it first), so it sees the unsteered prompt. ``read="last"``
scores each prompt's last token (found from the forward's attention mask: the last column under left
padding, as ``generate`` pads; an earlier one under right padding); ``read="mean"`` averages the prompt's
text tokens (the attention mask the forward was given, without the BOS the tokenizer adds), as
:func:`~mechscope.steer.vectors.read_activations` and the calibration read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechscope.errors import ConfigError, ShapeError
from mechscope.metrics import last_positions
from mechscope.model.hooks import HookContext, HookFn
from mechscope.model.tokens import text_mask
from mechscope.sites import Site
from mechscope.steer.intervention import Intervention, check_finite

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

Read = Literal["last", "mean"]
#: Sites a condition can read (residual width).
CONDITION_KINDS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")


@dataclass(frozen=True)
class Condition:
    """``act[site] @ direction + bias > threshold`` per row, reading the last position or the mean."""

    site: str
    direction: Float[Tensor, " d_model"]
    bias: float = 0.0
    threshold: float = 0.0
    read: Read = "last"

    def __post_init__(self) -> None:
        site = Site.parse(self.site)
        if site.kind not in CONDITION_KINDS:
            raise ConfigError(f"a condition reads a residual-width site {CONDITION_KINDS}; got {self.site!r}")
        if not isinstance(self.direction, Tensor) or self.direction.ndim != 1:
            got = tuple(self.direction.shape) if isinstance(self.direction, Tensor) else type(self.direction).__name__
            raise ShapeError(f"a condition's direction must be a [d_model] tensor; got {got}")
        if not bool(torch.isfinite(self.direction).all()) or float(self.direction.norm()) == 0.0:
            raise ConfigError("a condition's direction must be finite and non-zero")
        object.__setattr__(self, "site", site.name)
        object.__setattr__(self, "direction", self.direction.detach().float().cpu())
        object.__setattr__(self, "bias", check_finite("bias", self.bias))
        object.__setattr__(self, "threshold", check_finite("threshold", self.threshold))
        if self.read not in ("last", "mean"):
            raise ConfigError(f"read must be 'last' or 'mean'; got {self.read!r}")

    @classmethod
    def from_probe(cls, probe: Any, site: str, *, threshold: float = 0.0, read: Read = "last") -> Condition:
        """A condition from a linear probe with ``weight [d_model]`` and ``bias`` (e.g. ``locate.probes.Probe``)."""
        weight, bias = getattr(probe, "weight", None), getattr(probe, "bias", None)
        if not isinstance(weight, Tensor) or bias is None:
            raise ConfigError(f"expected a linear probe with .weight and .bias; got {type(probe).__name__}")
        return cls(site, weight, float(bias), threshold, read)

    def scores(self, act: Float[Tensor, "batch pos d_model"], mask: Tensor | None = None) -> Float[Tensor, " batch"]:
        """Each row's detector score on one activation of its site (``mask`` [batch, pos]: the tokens to read;
        ``last`` reads each row's last one, ``mean`` averages them; without it, the last column / every one)."""
        if mask is None or tuple(mask.shape) != tuple(act.shape[:2]):
            x = act[:, -1] if self.read == "last" else act.float().mean(1)
        elif self.read == "last":
            last = last_positions(mask.to(act.device))  # each row's last token read
            x = act[torch.arange(act.shape[0], device=act.device), last]
        else:
            w = mask.to(act.device, torch.float32).unsqueeze(-1)
            x = (act.float() * w).sum(1) / w.sum(1).clamp_min(1.0)
        return x.float() @ self.direction.to(x.device) + self.bias


class ConditionalSteering(Intervention):
    """Apply `intervention` only on the rows where `condition` holds on the prompt."""

    kind = "conditional"

    def __init__(self, intervention: Intervention, condition: Condition) -> None:
        if not isinstance(intervention, Intervention):
            raise ConfigError(f"expected a mechscope Intervention to gate; got {type(intervention).__name__}")
        if not isinstance(condition, Condition):
            raise ConfigError(f"expected a Condition; got {type(condition).__name__}")
        super().__init__(intervention.model)
        self.site = self.model.site(condition.site)
        if condition.direction.shape[0] != self.model.dims.d_model:
            raise ShapeError(
                f"the condition's direction has {condition.direction.shape[0]} entries; the model has "
                f"d_model={self.model.dims.d_model} (a direction made for another model?)"
            )
        plan = intervention.hook_plan()
        early = [s.name for s in plan if s.order < self.site.order]
        if early:
            raise ConfigError(
                f"the condition reads {self.site.name}, after sites the intervention changes ({early}); read a "
                "site no later than the first steered one, so the detector sees the unsteered prompt"
            )
        self.inner = intervention
        self.children = [intervention]
        self.condition = condition
        self.gate: Tensor | None = None
        self.scores: Tensor | None = None
        self._mask: Tensor | None = None

    def _detect(self, act: Tensor, _ctx: HookContext) -> None:
        if self.phase == "prompt":
            self.scores = self.condition.scores(act, self._mask).detach()
            self.gate = self.scores > self.condition.threshold

    def _gated(self, fn: HookFn) -> HookFn:
        def gated(act: Tensor, ctx: HookContext) -> Tensor | None:
            gate = self.gate
            if gate is None or not bool(gate.any()):
                return None
            if gate.shape[0] != act.shape[0]:
                raise ShapeError(
                    f"the condition was decided for {gate.shape[0]} rows; this forward has {act.shape[0]} "
                    "(conditional steering needs the prompt's batch during generation)"
                )
            new = fn(act, ctx)
            if new is None:
                return None
            keep = gate.to(act.device).view(-1, *([1] * (act.ndim - 1)))
            return torch.where(keep, new, act)

        return gated

    def hook_plan(self) -> dict[Site, list[HookFn]]:
        plan: dict[Site, list[HookFn]] = {self.site: [self._detect]}
        for site, fns in self.inner.hook_plan().items():
            plan.setdefault(site, []).extend(self._gated(fn) for fn in fns)
        return plan

    def _track_phase(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super()._track_phase(module, args, kwargs)
        if self.phase == "prompt":
            ids, mask = self.forward_ids, self.forward_mask
            # as read_activations reads: text tokens (embeddings in: the mask as given)
            self._mask = mask if ids is None or mask is None else text_mask(self.model.tokenizer, ids, mask)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.gate = None
        self._mask = None

    def describe(self) -> str:
        c = self.condition
        return f"{self.inner.describe()} where {c.site} . direction + {c.bias:g} > {c.threshold:g} ({c.read})"


def conditional(intervention: Intervention, condition: Condition) -> ConditionalSteering:
    """``with conditional(steer(model, vec, 4.0), Condition("blocks.2.hook_resid_pre", topic_dir)): ...``"""
    return ConditionalSteering(intervention, condition)


def calibrate_threshold(
    model: HookedModel,
    condition: Condition,
    positive: Sequence[str],
    negative: Sequence[str],
) -> Condition:
    """The same condition with its threshold midway between the mean scores of `positive` (the condition
    holds) and `negative` prompts, read the way :class:`ConditionalSteering` reads them (left padding)."""
    from mechscope.steer.vectors import read_activations

    site = model.site(condition.site)
    if not positive or not negative:
        raise ConfigError("calibrate_threshold needs positive and negative prompts")
    means = []
    for texts in (positive, negative):
        act = read_activations(model, list(texts), [site], read=condition.read)[site]
        means.append(float((act @ condition.direction.to(act.device) + condition.bias).mean()))
    if means[0] <= means[1]:
        raise ConfigError(
            f"the direction does not separate the prompts: mean score {means[0]:.4g} on positive vs "
            f"{means[1]:.4g} on negative; flip or re-fit it"
        )
    return Condition(condition.site, condition.direction, condition.bias, (means[0] + means[1]) / 2, condition.read)


__all__ = ["CONDITION_KINDS", "Condition", "ConditionalSteering", "calibrate_threshold", "conditional"]
