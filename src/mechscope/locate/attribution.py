"""Direct attribution: direct logit attribution (DLA), gradient x input and integrated gradients.

DLA splits the logit (difference) at one position into the direct contributions of components --
embeddings, attention layers or heads (optionally split by the source position they read from), MLP
layers or single neurons, and biases -- through the final norm with its scale frozen at the value the
full residual gets, so the components sum *exactly* to what the model computes (before logit
soft-capping). Gradient x input and integrated gradients (IG) attribute any scalar-per-row metric to
the entries of any site: on the input embeddings, or on a hidden site ("layer IG"). IG satisfies
completeness: its attributions sum to ``f(x) - f(baseline)`` up to the quadrature error, which shrinks
as ``steps`` grows and is reported with the result.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import ConfigError, ShapeError
from mechscope.metrics import Metric, MetricError, Position, last_positions, scoring
from mechscope.metrics import logit_metric as _logit_metric
from mechscope.model.decompose import (
    _token_ids,
    _unembed_direction,
    direct_logit_attribution,
    frozen_norm,
)
from mechscope.model.tokens import special_ids, text_mask
from mechscope.results import Result
from mechscope.sites import Site, SiteLike

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel, Inputs

Tokens = int | str | Sequence[int | str] | Tensor
DLA_MODES = ("layer", "head", "neuron", "position")
#: Last axes that carry features (summed over by default); other axes (heads, keys) are kept.
FEATURE_AXES = ("d_model", "d_head", "d_mlp")


class AttributionResult(Result):
    """Direct logit attribution: ``attribution [component, batch]`` summing to ``logit [batch]``.

    Mode-specific views: ``heads [layer, head, batch]`` (``by="head"``), ``neurons [layer, neuron,
    batch]`` (``by="neuron"``), ``sources [layer, head, src_pos, batch]`` (``by="position"``).
    """

    method = "direct_logit_attribution"

    def default_tensor(self) -> str:
        for name in ("heads", "neurons"):
            if name in self.tensors:
                return name
        return "attribution"

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The `k` components with the largest mean absolute attribution (mean over the batch)."""
        mean = self["attribution"].mean(-1)
        order = mean.abs().argsort(descending=True)[:k]
        names = self.labels["component"]
        return [(names[int(i)], float(mean[i])) for i in order]


class GradientAttribution(Result):
    """Gradient-based attribution of a metric to a site: ``attribution`` over the site's non-feature
    axes (``[batch, pos]`` for residual sites), ``metric [batch]`` = f(x); IG adds
    ``baseline_metric``, ``delta = f(x) - f(baseline)`` and ``error = sum(attribution) - delta``."""

    method = "gradient_attribution"

    def default_tensor(self) -> str:
        return "attribution"


# Direct logit attribution -------------------------------------------------------------------------------
def logit_attribution(
    model: HookedModel,
    inputs: Inputs,
    target: Tokens,
    *,
    baseline: Tokens | None = None,
    position: int | Tensor | Sequence[int] | None = None,
    by: Literal["layer", "head", "neuron", "position"] = "head",
) -> AttributionResult:
    """Direct logit attribution of ``logit[target] - logit[baseline]`` at `position`, per component.

    `position` is an int for every row, one index per row, or None: each row's last real token (from
    the attention mask, so a mixed-length padded batch reads every prompt at its own end).

    `by` picks the components: attention and MLP ``layer``s, attention ``head``s (+ per-layer output
    bias), MLP ``neuron``s (+ per-layer output bias; attention per layer), or heads split by the
    ``position`` they read from. In every mode the components sum to the model's logit (difference).
    """
    if by not in DLA_MODES:
        raise ConfigError(f"by must be one of {DLA_MODES}; got {by!r}")
    batch = model.prepare_inputs(inputs)
    n_rows, n_pos = batch["input_ids"].shape
    pos = last_positions(batch["attention_mask"]) if position is None else _positions(position, n_rows, n_pos)
    if by in ("layer", "head"):
        dla = direct_logit_attribution(model, batch, target, baseline=baseline, position=pos, heads=by == "head")
        values, labels = dla.values.float(), list(dla.labels)
    else:
        values, labels = _fine_attribution(model, batch, target, baseline, pos, by)
    # The logit (difference) before final soft-capping, which is what the components sum to.
    _, final_cache = model.run_with_cache(batch, ["ln_final.hook_normalized"])
    normalized = final_cache["ln_final.hook_normalized"]
    rows = torch.arange(n_rows, device=normalized.device)
    with torch.no_grad():
        at = model.module(model.adapter.unembed)(normalized[rows, pos.to(normalized.device)]).float()
    logit = at[rows, _token_ids(model, target, n_rows).to(at.device)]
    if baseline is not None:
        logit = logit - at[rows, _token_ids(model, baseline, n_rows).to(at.device)]
    tensors: dict[str, Tensor] = {"attribution": values.detach().cpu(), "logit": logit.detach().cpu()}
    axes: dict[str, tuple[str, ...]] = {"attribution": ("component", "batch"), "logit": ("batch",)}
    out_labels: dict[str, list[str]] = {"component": labels}
    d = model.dims
    index = {name: i for i, name in enumerate(labels)}
    if by == "head":
        heads = [[index[f"L{i}H{h}"] for h in range(d.n_heads)] for i in range(d.n_layers)]
        tensors["heads"] = tensors["attribution"][torch.tensor(heads)]
        axes["heads"] = ("layer", "head", "batch")
    elif by == "neuron":
        neurons = [[index[f"L{i}N{n}"] for n in range(d.d_mlp)] for i in range(d.n_layers)]
        tensors["neurons"] = tensors["attribution"][torch.tensor(neurons)]
        axes["neurons"] = ("layer", "neuron", "batch")
    elif by == "position":
        src = [[[index[f"L{i}H{h}@{k}"] for k in range(n_pos)] for h in range(d.n_heads)] for i in range(d.n_layers)]
        tensors["sources"] = tensors["attribution"][torch.tensor(src)]
        axes["sources"] = ("layer", "head", "src_pos", "batch")
        out_labels["src_pos"] = [str(k) for k in range(n_pos)]
    if by in ("head", "position"):
        out_labels["head"] = [str(h) for h in range(d.n_heads)]
    out_labels["layer"] = [str(i) for i in range(d.n_layers)]
    config: dict[str, Any] = {
        "by": by,
        "target": _json_tokens(target),
        "baseline": None if baseline is None else _json_tokens(baseline),
        "position": pos.tolist(),
        "model_type": d.model_type,
    }
    return AttributionResult(tensors=tensors, axes=axes, labels=out_labels, config=config)


def _json_tokens(tokens: Tokens) -> Any:
    return tokens.tolist() if isinstance(tokens, Tensor) else tokens


def _positions(position: int | Tensor | Sequence[int], n_rows: int, n_pos: int) -> Tensor:
    """Per-row non-negative position indices, validated."""
    pos = torch.as_tensor(position, dtype=torch.long).reshape(-1)
    if pos.numel() == 1:
        pos = pos.expand(n_rows)
    if pos.shape != (n_rows,):
        raise ShapeError(f"position must be an int or one per batch row ({n_rows},); got shape {tuple(pos.shape)}")
    if bool(((pos < -n_pos) | (pos >= n_pos)).any()):
        raise ShapeError(f"positions {pos.tolist()} are out of range for {n_pos} positions")
    return pos % n_pos


def _fine_attribution(
    model: HookedModel,
    batch: dict[str, Tensor],
    target: Tokens,
    baseline: Tokens | None,
    pos: Tensor,
    by: str,
) -> tuple[Tensor, list[str]]:
    """Components of the final residual at `pos` split by neuron or by (head, source position)."""
    d, a = model.dims, model.adapter
    n_rows = batch["input_ids"].shape[0]
    sites: list[SiteLike] = ["hook_embed", Site("hook_resid_post", d.n_layers - 1)]
    if a.pos_embed is not None:
        sites.append("hook_pos_embed")
    for i in range(d.n_layers):
        if by == "neuron":
            sites += [Site("mlp.hook_post", i), Site("hook_attn_out", i)]
        else:
            sites += [Site("attn.hook_pattern", i), Site("attn.hook_v", i), Site("hook_mlp_out", i)]
    _, cache = model.run_with_cache(batch, sites)
    rows = torch.arange(n_rows, device=pos.device)

    def at(t: Tensor) -> Tensor:  # [batch, pos, ...] -> [batch, ...] at each row's position
        return t[rows, pos.to(t.device)].float()

    parts: list[Tensor] = [at(cache["hook_embed"])]
    labels = ["embed"]
    if a.pos_embed is not None:
        parts.append(at(cache["hook_pos_embed"]))
        labels.append("pos_embed")
    for i in range(d.n_layers):
        if by == "neuron":
            parts.append(at(cache[Site("hook_attn_out", i)]))
            labels.append(f"L{i} attn")
            w = model.weights.mlp(i)
            w_out, b_out = w["W_out"], w["b_out"]
            assert w_out is not None and b_out is not None
            terms = torch.einsum("bn,nd->nbd", at(cache[Site("mlp.hook_post", i)]), w_out.float())
            bias = b_out.float().expand(n_rows, -1)[None]
            layer_parts = _through_post_norm(model, i, a.post_mlp_norm, torch.cat([terms, bias]))
            parts.extend(layer_parts.unbind(0))
            labels += [f"L{i}N{n}" for n in range(d.d_mlp)] + [f"L{i} mlp bias"]
        else:
            pattern = cache[Site("attn.hook_pattern", i)].float()  # [b, h, q, k]
            a_q = pattern[rows, :, pos.to(pattern.device)]  # [b, h, k]
            v = model.weights._expand(cache[Site("attn.hook_v", i)].float().movedim(2, 0)).movedim(0, 2)  # [b,k,h,dh]
            ov = torch.einsum("bkhe,hed->bkhd", v, model.weights.W_O_layer(i).float())
            terms = torch.einsum("bhk,bkhd->hkbd", a_q, ov).reshape(-1, n_rows, d.d_model)
            bias = model.weights.b_O_layer(i).float().expand(n_rows, -1)[None]
            layer_parts = _through_post_norm(model, i, a.post_attn_norm, torch.cat([terms, bias]))
            parts.extend(layer_parts.unbind(0))
            n_pos = pattern.shape[-1]
            labels += [f"L{i}H{h}@{k}" for h in range(d.n_heads) for k in range(n_pos)] + [f"L{i} attn bias"]
            parts.append(at(cache[Site("hook_mlp_out", i)]))
            labels.append(f"L{i} mlp")
    final = at(cache[Site("hook_resid_post", d.n_layers - 1)])
    stacked = torch.stack(parts)  # [component, batch, d_model]
    normed, norm_bias = frozen_norm(model, model.module(a.final_norm), final, stacked)
    if norm_bias is not None:
        normed = torch.cat([normed, norm_bias.float().expand(n_rows, -1)[None]])
        labels.append("final norm bias")
    direction = _unembed_direction(model, target, n_rows).float()
    if baseline is not None:
        direction = direction - _unembed_direction(model, baseline, n_rows).float()
    values = torch.einsum("cbd,db->cb", normed, direction.to(normed.device))
    b_u = model.weights.b_U.float()
    if bool(b_u.abs().sum() > 0):
        b = b_u[_token_ids(model, target, n_rows).to(b_u.device)]
        if baseline is not None:
            b = b - b_u[_token_ids(model, baseline, n_rows).to(b_u.device)]
        values = torch.cat([values, b[None].to(values.device)])
        labels.append("unembed bias")
    return values, labels


def _through_post_norm(model: HookedModel, layer: int, norm_path: str | None, parts: Tensor) -> Tensor:
    """Pass per-part outputs [part, batch, d_model] through a post-sublayer norm with frozen scale."""
    if norm_path is None:
        return parts
    normed, bias = frozen_norm(model, model.layer_module(layer, norm_path), parts.sum(0), parts)
    if bias is not None:  # pragma: no cover - no supported family has a biased post-norm
        raise ConfigError("attribution through a post-sublayer norm with a bias is not supported")
    return normed.float()


# Gradient-based attribution -----------------------------------------------------------------------------
def logit_metric(target: Tokens, baseline: Tokens | None = None, *, position: Position = None) -> Metric:
    """A metric ``logits -> [batch]``: the logit of token id `target` (minus `baseline`) at `position`
    (default: each row's last real token; see :mod:`mechscope.metrics`).

    Ids are one int or one per row (resolve strings first with ``model.to_single_token``).
    """
    return _logit_metric(target, baseline, position=position)  # type: ignore[arg-type]


def _check_metric(metric: Metric, logits: Tensor, mask: Tensor) -> Tensor:
    """`metric(logits)`, one value per row, each row scored at its last real token of `mask` by default."""
    n_rows = logits.shape[0]
    with scoring(mask):
        value = metric(logits)
    if not isinstance(value, Tensor) or value.shape != (n_rows,):
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise MetricError(f"metric must return one value per batch row, a tensor of shape ({n_rows},); got {got}")
    return value


def _attribution_axes(site: Site, shape: torch.Size) -> tuple[tuple[str, ...], bool]:
    """Axes of the attribution tensor for `site`, and whether the last (feature) axis is summed."""
    axes = site.axes
    if len(axes) != len(shape):
        raise ShapeError(f"{site.name} has axes {axes} but its activation has shape {tuple(shape)}")
    if axes[-1] in FEATURE_AXES:
        return axes[:-1], True
    return axes, False


def _forward_with(model: HookedModel, batch: dict[str, Tensor], site: Site, value: Tensor) -> Tensor:
    """Logits of a forward in which `site` is replaced by `value` (gradients flow to `value`)."""

    def replace(activation: Tensor, _ctx: Any) -> Tensor:
        if activation.shape != value.shape:
            raise ShapeError(
                f"{site.name}: baseline/activation shape {tuple(value.shape)} != {tuple(activation.shape)}"
            )
        return value

    with model.hooks({site: replace}):
        return model(batch)  # type: ignore[no-any-return]


def _site_activation(model: HookedModel, batch: dict[str, Tensor], site: Site) -> Tensor:
    _, cache = model.run_with_cache(batch, [site])
    return cache[site.name].float()


def gradient_x_input(
    model: HookedModel, inputs: Inputs, metric: Metric, *, site: SiteLike = "hook_embed"
) -> GradientAttribution:
    """``activation * d metric / d activation`` at `site`, summed over its feature axis.

    Exact (equal to the metric minus its value at zero) when the metric is linear in the site.
    """
    chosen = model.site(site)
    batch = model.prepare_inputs(inputs)
    x = _site_activation(model, batch, chosen)
    leaf = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = _forward_with(model, batch, chosen, leaf.to(model.dtype))
        value = _check_metric(metric, logits, batch["attention_mask"])
        (grad,) = torch.autograd.grad(value.sum(), leaf, allow_unused=True)
    grad = torch.zeros_like(leaf) if grad is None else grad
    axes, summed = _attribution_axes(chosen, x.shape)
    attribution = (x * grad).sum(-1) if summed else x * grad
    tensors = {"attribution": attribution.detach().cpu(), "metric": value.detach().float().cpu()}
    result_axes = {"attribution": axes, "metric": ("batch",)}
    config = {
        "method": "gradient_x_input",
        "site": chosen.name,
        "model_type": model.dims.model_type,
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    return GradientAttribution(tensors=tensors, axes=result_axes, config=config)


@dataclass(frozen=True, kw_only=True)
class IGConfig:
    """Integrated-gradients options.

    Attributes:
        steps: number of points on the path from the baseline to the input (gradient evaluations).
        rule: quadrature rule. ``"adaptive"`` (default): trapezoid on a grid that starts uniform
            (a quarter of `steps`) and bisects, a batch at a time, the intervals whose local
            completeness error is largest -- the metric's value at every node comes with its gradient,
            so each interval's exact change ``f(a_i+1) - f(a_i)`` is known and the local errors sum to
            the reported completeness error. It converges on paths with sharp features (deep models,
            scale-invariant norms), where fixed rules do not. ``"gauss_legendre"`` (fastest for smooth
            paths), ``"midpoint"`` and ``"trapezoid"`` use fixed nodes.
        batch_steps: interpolation points evaluated per forward pass (memory vs speed).
    """

    steps: int = 64
    rule: Literal["adaptive", "gauss_legendre", "midpoint", "trapezoid"] = "adaptive"
    batch_steps: int = 8

    def __post_init__(self) -> None:
        if self.rule not in IG_RULES:
            raise ConfigError(f"rule must be one of {IG_RULES}; got {self.rule!r}")
        if self.steps < 1 or (self.rule in ("trapezoid", "adaptive") and self.steps < 2):
            raise ConfigError(f"steps must be >= 1 (>= 2 for trapezoid and adaptive); got {self.steps}")
        if self.batch_steps < 1:
            raise ConfigError(f"batch_steps must be >= 1; got {self.batch_steps}")

    def nodes(self) -> tuple[list[float], list[float]]:
        """Quadrature nodes in [0, 1] and weights summing to 1 (the adaptive rule's starting grid)."""
        n = self.steps
        if self.rule == "gauss_legendre":
            x, w = np.polynomial.legendre.leggauss(n)
            return [float(v) for v in (x + 1) / 2], [float(v) for v in w / 2]
        if self.rule == "midpoint":
            return [(i + 0.5) / n for i in range(n)], [1.0 / n] * n
        if self.rule == "adaptive":
            n = max(2, self.steps // 4)
        alphas = [i / (n - 1) for i in range(n)]
        weights = [(0.5 if i in (0, n - 1) else 1.0) / (n - 1) for i in range(n)]
        return alphas, weights


IG_RULES = ("adaptive", "gauss_legendre", "midpoint", "trapezoid")
#: Baselines by name (or pass a tensor of the site's shape).
IG_BASELINES = ("zero", "mean", "pad")


class _Path:
    """Evaluates the metric and its per-entry attribution density ``(x - x') * grad`` at path points."""

    def __init__(
        self, model: HookedModel, batch: dict[str, Tensor], site: Site, x: Tensor, base: Tensor, metric: Metric
    ) -> None:
        self.model, self.batch, self.site, self.x, self.base, self.metric = model, batch, site, x, base, metric
        self.diff = x - base

    def __call__(self, alphas: Sequence[float]) -> tuple[Tensor, Tensor]:
        """``(values [m, batch], densities [m, *x.shape])`` at the path points `alphas`."""
        x, n_rows = self.x, self.x.shape[0]
        a = torch.tensor(list(alphas), dtype=x.dtype, device=x.device)
        m = a.shape[0]
        shape = (m,) + (1,) * x.ndim
        path = (self.base[None] + a.view(shape) * self.diff[None]).reshape(m * n_rows, *x.shape[1:])
        leaf = path.detach().requires_grad_(True)
        big = {k: v.repeat(m, *([1] * (v.ndim - 1))) for k, v in self.batch.items()}
        with torch.enable_grad():
            logits = _forward_with(self.model, big, self.site, leaf.to(self.model.dtype))
            value = _check_metric(self.metric, logits, big["attention_mask"])
            (grad,) = torch.autograd.grad(value.sum(), leaf, allow_unused=True)
        grad = torch.zeros_like(leaf) if grad is None else grad
        density = grad.float().reshape(m, *x.shape) * self.diff[None]
        return value.detach().float().reshape(m, n_rows), density


def _chunks(items: list[float], size: int) -> list[list[float]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _fixed_rule(path: _Path, cfg: IGConfig, bar: Any) -> Tensor:
    alphas, weights = cfg.nodes()
    total = torch.zeros_like(path.x)
    for start in range(0, len(alphas), cfg.batch_steps):
        chunk = alphas[start : start + cfg.batch_steps]
        w = torch.tensor(weights[start : start + len(chunk)], dtype=total.dtype, device=total.device)
        _, density = path(chunk)
        total += (density * w.view(-1, *([1] * total.ndim))).sum(0)
        if bar is not None:
            bar.update(len(chunk))
    return total


def _adaptive_rule(path: _Path, cfg: IGConfig, bar: Any) -> Tensor:
    """Trapezoid on a grid refined where the local completeness error is largest (see :class:`IGConfig`)."""
    alphas, _ = cfg.nodes()
    values: dict[float, Tensor] = {}  # alpha -> metric per row
    dens: dict[float, Tensor] = {}  # alpha -> attribution density

    def evaluate(points: list[float]) -> None:
        for chunk in _chunks(points, cfg.batch_steps):
            v, d = path(chunk)
            for i, alpha in enumerate(chunk):
                values[alpha], dens[alpha] = v[i], d[i]
            if bar is not None:
                bar.update(len(chunk))

    evaluate(alphas)
    rows = path.x.shape[0]
    while len(values) < cfg.steps:
        grid = sorted(values)
        local = []
        for lo, hi in itertools.pairwise(grid):
            trap = (hi - lo) / 2 * (dens[lo].reshape(rows, -1).sum(-1) + dens[hi].reshape(rows, -1).sum(-1))
            local.append(float((trap - (values[hi] - values[lo])).abs().sum()))
        if max(local) == 0.0:
            break
        k = min(cfg.batch_steps, cfg.steps - len(values))
        worst = sorted(range(len(local)), key=lambda i: -local[i])[:k]
        evaluate([(grid[i] + grid[i + 1]) / 2 for i in worst])
    grid = sorted(values)
    total = torch.zeros_like(path.x)
    for lo, hi in itertools.pairwise(grid):
        total += (hi - lo) / 2 * (dens[lo] + dens[hi])
    return total


def integrated_gradients(
    model: HookedModel,
    inputs: Inputs,
    metric: Metric,
    *,
    site: SiteLike = "hook_embed",
    baseline: Float[Tensor, "..."] | Literal["zero", "mean", "pad"] = "mean",
    config: IGConfig | None = None,
    progress: bool = False,
) -> GradientAttribution:
    """Integrated gradients of `metric` with respect to the activation at `site`.

    ``attribution = (x - x') * integral_0^1 d metric(x' + a (x - x')) / dx da``, summed over the
    feature axis. Completeness -- attributions sum to ``f(x) - f(x')`` -- is checked and reported as
    ``error`` per row.

    `baseline` x': ``"mean"`` (default: each row's mean over its text tokens, the BOS left out), ``"pad"`` (the site's
    activation when every token but the special ones -- the BOS stays, as the model needs it -- is the
    tokenizer's pad token, or EOS, BOS), ``"zero"``, or a tensor
    of the site's shape. A zero baseline is degenerate wherever nothing else is added to the residual
    stream (``hook_embed`` of a rotary model such as Llama, any ``resid`` site): every norm is
    scale-invariant but for its epsilon, so near the origin the whole model runs in the epsilon regime
    and the metric oscillates along the path (on SmolLM2, with a total variation 8x its net change);
    the adaptive rule still converges there, with many steps.
    """
    cfg = config or IGConfig()
    chosen = model.site(site)
    batch = model.prepare_inputs(inputs)
    x = _site_activation(model, batch, chosen)
    base = _baseline(x, baseline, chosen, batch["attention_mask"], model=model, batch=batch)
    axes, summed = _attribution_axes(chosen, x.shape)
    n_rows = x.shape[0]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps * (n_rows if cfg.rule == "adaptive" else 1), desc=f"IG on {chosen.name}")
    try:
        if cfg.rule == "adaptive":  # each prompt refines its own grid: a result does not depend on its batch
            rows = [
                _adaptive_rule(
                    _Path(
                        model,
                        {k: v[i : i + 1] for k, v in batch.items()},
                        chosen,
                        x[i : i + 1],
                        base[i : i + 1],
                        metric,
                    ),
                    cfg,
                    bar,
                )
                for i in range(n_rows)
            ]
            total = torch.cat(rows)
        else:
            total = _fixed_rule(_Path(model, batch, chosen, x, base, metric), cfg, bar)
    finally:
        if bar is not None:
            bar.close()
    attribution = total
    with torch.no_grad():
        mask = batch["attention_mask"]
        f_x = _check_metric(metric, model(batch), mask).float()
        f_base = _check_metric(metric, _forward_with(model, batch, chosen, base.to(model.dtype)), mask).float()
    per_row = attribution.reshape(n_rows, -1).sum(-1)
    delta = f_x - f_base
    tensors = {
        "attribution": (attribution.sum(-1) if summed else attribution).detach().cpu(),
        "metric": f_x.cpu(),
        "baseline_metric": f_base.cpu(),
        "delta": delta.cpu(),
        "error": (per_row - delta).detach().cpu(),
    }
    result_axes = {"attribution": axes, **{k: ("batch",) for k in ("metric", "baseline_metric", "delta", "error")}}
    config_out = {
        "method": "integrated_gradients",
        "site": chosen.name,
        "steps": cfg.steps,
        "rule": cfg.rule,
        "baseline": baseline if isinstance(baseline, str) else "tensor",
        "model_type": model.dims.model_type,
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    return GradientAttribution(tensors=tensors, axes=result_axes, config=config_out)


#: Residual-stream kinds: the stream itself, so every downstream norm sees a zero baseline as zero.
_RESID_KINDS = frozenset({"hook_resid_pre", "hook_resid_mid", "hook_resid_post"})


def _norms_see_only(model: HookedModel, site: Site) -> bool:
    """Whether `site` is the whole residual stream (zero there zeroes every norm's input)."""
    if site.kind in _RESID_KINDS:
        return True
    return site.kind == "hook_embed" and model.adapter.pos_embed is None


def _pad_id(model: HookedModel) -> int:
    tokenizer = model.tokenizer
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        value = value if value is not None else getattr(model.config, name, None)
        if isinstance(value, int):
            return value
    raise ConfigError("baseline 'pad' needs a pad, EOS or BOS token id (tokenizer or config); this model has none")


def _baseline(
    x: Tensor,
    baseline: Tensor | str,
    site: Site,
    mask: Tensor,
    *,
    model: HookedModel | None = None,
    batch: dict[str, Tensor] | None = None,
) -> Tensor:
    if isinstance(baseline, str):
        if baseline == "zero":
            if model is not None and _norms_see_only(model, site):
                raise ConfigError(
                    f"a zero baseline at {site.name} is degenerate on this model: nothing else enters the "
                    "residual stream, so along the path from zero every norm runs in its epsilon regime "
                    "(scale-invariant but for epsilon) and the metric spikes and oscillates next to the "
                    "origin; no quadrature converges (SmolLM2: total variation 8x the net change, error "
                    "growing with steps). Use baseline='mean' or 'pad', or pass torch.zeros_like(...) "
                    "explicitly to run it anyway."
                )
            return torch.zeros_like(x)
        if baseline == "mean":  # each row's mean over its text tokens (pads and the tokenizer's BOS left out)
            if model is not None and batch is not None:
                mask = text_mask(model.tokenizer, batch["input_ids"], mask)
            pos_axis = site.pos_axis
            shape = [1] * x.ndim
            shape[0], shape[pos_axis] = mask.shape
            w = mask.to(x.device, x.dtype).reshape(shape)
            return (
                ((x * w).sum(pos_axis, keepdim=True) / w.sum(pos_axis, keepdim=True).clamp_min(1)).expand_as(x).clone()
            )
        if baseline == "pad" and model is not None and batch is not None:
            ids = batch["input_ids"]
            special = torch.tensor(special_ids(model.tokenizer), dtype=ids.dtype)
            start = torch.isin(ids, special.to(ids.device))  # the BOS (and any special token) stays: text is padded
            pad = {**batch, "input_ids": torch.where(start, ids, torch.full_like(ids, _pad_id(model)))}
            return _site_activation(model, pad, site)
        raise ConfigError(f"baseline must be one of {IG_BASELINES} or a tensor; got {baseline!r}")
    if not isinstance(baseline, Tensor):
        raise ConfigError(f"baseline must be one of {IG_BASELINES} or a tensor; got {type(baseline).__name__}")
    if baseline.shape != x.shape:
        raise ShapeError(
            f"baseline for {site.name} must have the activation's shape {tuple(x.shape)} (axes {site.axes}); "
            f"got {tuple(baseline.shape)}"
        )
    return baseline.to(x.device, x.dtype)


__all__ = [
    "DLA_MODES",
    "IG_BASELINES",
    "IG_RULES",
    "AttributionResult",
    "GradientAttribution",
    "IGConfig",
    "gradient_x_input",
    "integrated_gradients",
    "logit_attribution",
    "logit_metric",
]
