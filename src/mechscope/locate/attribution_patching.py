"""Attribution patching (AtP) and AtP* (Kramár et al. 2024): patching effects to first order.

AtP estimates the effect on a metric of patching a component from the source run into the base run
by a first-order Taylor expansion at the base run: ``(a_source - a_base) . dM/da``. One forward of the
source, one forward + backward of the base give the estimates of every head, neuron and residual
position at once. The estimate is exact when the metric is linear in the patched quantity.

AtP* adds two corrections. **QK fix**: patching a head's queries or keys acts through the attention
softmax, where a linear estimate fails when attention saturates; AtP* recomputes the head's attention
pattern exactly with the patched queries (or keys) and only linearises from the pattern on. **GradDrop**:
gradients of different paths can cancel; AtP* repeats the backward pass once per layer with the
gradient through that layer's output dropped and averages the absolute estimates (an estimate of the
magnitude of the effect, robust to cancellation).

:func:`atp_vs_exact` compares AtP with exact activation patching of the same cells: rank correlation
and the cells where they disagree most.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.locate._engine import metric_positions, progress_bar
from mechscope.locate._reads import spread, unembedding_only
from mechscope.locate.patching import activation_patch, check_pair, tokens_of
from mechscope.metrics import Metric, metric_reads, resolve_positions, score
from mechscope.model.hooks import HookContext, HookFn
from mechscope.results import Result
from mechscope.sites import Site, SiteLike

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel, Inputs

#: Node types AtP scores, and the site each is read from.
NODE_SITES: dict[str, str] = {"heads": "attn.hook_z", "neurons": "mlp.hook_post", "resid": "hook_resid_pre"}
DIRECTIONS = ("denoising", "noising")


@dataclass(frozen=True, kw_only=True)
class AtPConfig:
    """Options of :func:`attribution_patch`.

    Attributes:
        nodes: node types to score: ``heads`` ([layer, head]), ``neurons`` ([layer, neuron]),
            ``resid`` ([layer, pos] of the residual stream entering each layer).
        direction: ``denoising`` (base = corrupt, source = clean) or ``noising`` (the reverse).
        per_position: also score heads per position (``heads_pos`` [layer, head, pos]).
        qk_fix: AtP*: score each head's queries, keys and values (``q``, ``k``, ``v`` [layer, head]),
            with the attention pattern recomputed exactly for query and key patches.
        grad_drop: AtP*: add ``<node>_graddrop`` tensors, the GradDrop magnitude estimates.
    """

    nodes: tuple[str, ...] = ("heads", "neurons", "resid")
    direction: str = "denoising"
    per_position: bool = False
    qk_fix: bool = False
    grad_drop: bool = False

    def __post_init__(self) -> None:
        bad = [n for n in self.nodes if n not in NODE_SITES]
        if bad or not self.nodes:
            raise ConfigError(f"nodes must be a non-empty subset of {sorted(NODE_SITES)}; got {list(self.nodes)}")
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"direction must be one of {DIRECTIONS}; got {self.direction!r}")


class AtPResult(Result):
    """AtP estimates of the metric change per node (``heads``, ``neurons``, ``resid``; with AtP*
    also ``q``, ``k``, ``v`` and ``*_graddrop``); ``base`` and ``source`` (0-d): the unpatched metrics."""

    method = "attribution_patch"

    def default_tensor(self) -> str:
        return next(iter(n for n in ("heads", "neurons", "resid") if n in self.tensors))


def _metric_mean(metric: Metric, logits: Tensor, mask: Tensor) -> Tensor:
    """The batch mean of `metric`, each row scored at its last real token of `mask` (keeps gradients)."""
    return score(metric, logits, mask)


def _declared_positions(metric: Metric, inputs: dict[str, Tensor]) -> list[int] | None:
    """The positions a metric that declares its reads (:class:`mechscope.metrics.Reads`) reads here."""
    declared = metric_reads(metric)
    if declared is None:
        return None
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    shape_only = torch.empty(()).expand(ids.shape[0], ids.shape[1], 1)  # resolve_positions reads its shape
    pos = resolve_positions(shape_only, declared.position, mask)
    return [pos % ids.shape[1]] if isinstance(pos, int) else sorted({int(p) for p in pos.tolist()})


def _grads(
    model: HookedModel,
    inputs: dict[str, Tensor],
    metric: Metric,
    sites: list[Site],
    extra: dict[SiteLike, HookFn] | None = None,
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor], Tensor]:
    """Metric, activations, d metric / d activation at `sites` and logits (one forward + backward).

    A metric that declares the positions it reads gets only those logits (the unembedding and its
    backward are the costly part of a small model's pass); the others are NaN in the returned logits."""
    mask = inputs["attention_mask"]
    keep = _declared_positions(metric, inputs)
    hooks: dict[SiteLike, HookFn] = dict(extra or {})
    if keep is None:
        with model.hooks(hooks):
            result = model.run_with_grads(inputs, lambda logits: _metric_mean(metric, logits, mask), sites)
        return result.loss, *_split(result, sites), result.logits
    n_pos = int(inputs["input_ids"].shape[1])
    with unembedding_only(model, keep), model.hooks(hooks):
        result = model.run_with_grads(inputs, lambda kept: _metric_mean(metric, spread(kept, keep, n_pos), mask), sites)
    return result.loss, *_split(result, sites), spread(result.logits, keep, n_pos)


def _split(result: Any, sites: list[Site]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    return {s.name: result.activations[s.name] for s in sites}, {s.name: result.gradients[s.name] for s in sites}


def attribution_patch(
    model: HookedModel,
    clean: Inputs,
    corrupt: Inputs,
    metric: Metric,
    config: AtPConfig | None = None,
    *,
    progress: bool = False,
) -> AtPResult:
    """AtP (and with ``qk_fix``/``grad_drop``, AtP*) estimates of every node's patching effect.

    Estimates are of the change ``M(patched) - M(base)`` averaged over the batch, where the base run is
    the corrupt one when denoising. Cost: one forward of the source run and one forward + backward of
    the base run (plus one eager forward for the QK fix and one forward + backward per layer for GradDrop;
    `progress` shows a bar over GradDrop's layers).
    """
    cfg = config or AtPConfig()
    clean_t, corrupt_t = tokens_of(model, clean), tokens_of(model, corrupt)
    check_pair(clean_t, corrupt_t)
    base_t, source_t = (corrupt_t, clean_t) if cfg.direction == "denoising" else (clean_t, corrupt_t)
    n_layers = model.dims.n_layers
    kinds = [NODE_SITES[n] for n in cfg.nodes]
    if cfg.qk_fix:
        kinds += ["attn.hook_q", "attn.hook_k", "attn.hook_v"]
    sites = [model.site(Site(kind, layer)) for kind in dict.fromkeys(kinds) for layer in range(n_layers)]
    base_value, acts, grads, base_logits = _grads(model, base_t, metric, sites)
    # The source run only needs the logits the metric reads (the vocabulary projection is costly).
    read = metric_positions(metric, base_logits, base_t["attention_mask"])
    keep = torch.tensor(read, device=base_logits.device)
    kept, source_cache = model.run_with_cache(source_t, sites=sites, logits_to_keep=keep)
    assert kept is not None
    source_logits = torch.full_like(base_logits, float("nan"))
    source_logits[:, read] = kept
    # Differences and products in fp32: in bf16/fp16 a product summed over batch and positions loses digits.
    delta = {s.name: source_cache[s.name].float() - acts[s.name].float() for s in sites}
    tensors: dict[str, Tensor] = {}
    axes: dict[str, tuple[str, ...]] = {}

    def score(name: str, kind: str, g: dict[str, Tensor], reduce_pos: bool) -> Tensor:
        rows = []
        for layer in range(n_layers):
            site = Site(kind, layer).name
            prod = (delta[site] * g[site].float()).sum(0)  # the gradient of the batch mean carries 1/batch
            if kind in ("attn.hook_z", "attn.hook_q", "attn.hook_k", "attn.hook_v"):
                prod = prod.sum(-1)  # [pos, head]
                rows.append(prod.sum(0) if reduce_pos else prod.T)
            elif kind == "mlp.hook_post":
                rows.append(prod.sum(0))
            else:
                rows.append(prod.sum(-1))  # [pos]
        return torch.stack(rows)

    node_axes = {"heads": ("layer", "head"), "neurons": ("layer", "neuron"), "resid": ("layer", "pos")}
    for node in cfg.nodes:
        tensors[node] = score(node, NODE_SITES[node], grads, reduce_pos=True)
        axes[node] = node_axes[node]
    if cfg.per_position and "heads" in cfg.nodes:
        tensors["heads_pos"] = score("heads_pos", "attn.hook_z", grads, reduce_pos=False)
        axes["heads_pos"] = ("layer", "head", "pos")
    if cfg.qk_fix:
        tensors["v"] = score("v", "attn.hook_v", grads, reduce_pos=True)
        q, k = _qk_fix(model, base_t, metric, source_cache, acts)
        tensors["q"], tensors["k"] = q, k
        axes.update({"q": ("layer", "head"), "k": ("layer", "kv_head"), "v": ("layer", "kv_head")})
    if cfg.grad_drop:
        node_sites = [s for s in sites if s.kind in {NODE_SITES[n] for n in cfg.nodes}]
        totals = {node: torch.zeros_like(tensors[node]) for node in cfg.nodes}
        for g in _graddrop_grads(model, base_t, metric, node_sites, progress=progress):
            for node in cfg.nodes:
                totals[node] += score(node, NODE_SITES[node], g, reduce_pos=True).abs()
        for node in cfg.nodes:
            tensors[f"{node}_graddrop"] = totals[node] / max(1, n_layers - 1)
            axes[f"{node}_graddrop"] = node_axes[node]
    n_pos = int(base_t["input_ids"].shape[1])
    labels = {
        "layer": [str(i) for i in range(n_layers)],
        "head": [f"H{h}" for h in range(model.dims.n_heads)],
        "kv_head": [f"KV{h}" for h in range(model.dims.n_kv_heads)],
        "pos": [str(p) for p in range(n_pos)],
        "neuron": [f"N{i}" for i in range(model.dims.d_mlp)],
    }
    used = {a for ax in axes.values() for a in ax}
    source_value = _metric_mean(metric, source_logits, base_t["attention_mask"]).detach()
    tensors.update(base=base_value.detach(), source=source_value)
    axes.update(base=(), source=())
    return AtPResult(
        tensors=tensors,
        axes=axes,
        labels={k: v for k, v in labels.items() if k in used},
        config={
            "nodes": list(cfg.nodes),
            "direction": cfg.direction,
            "per_position": cfg.per_position,
            "qk_fix": cfg.qk_fix,
            "grad_drop": cfg.grad_drop,
            "model_type": model.dims.model_type,
            "dtype": str(model.dtype).removeprefix("torch."),
        },
    )


class _Gate(torch.autograd.Function):
    """Identity forward; backward scales the gradient by ``open[0]`` (a switch read at backward time)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, switch: list[float]) -> Tensor:
        ctx.switch = switch
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.switch[0], None


def _graddrop_grads(
    model: HookedModel, inputs: dict[str, Tensor], metric: Metric, sites: list[Site], *, progress: bool = False
) -> list[dict[str, Tensor]]:
    """Per layer l, d metric / d activation at `sites` with the gradient through layer l's attention
    and MLP outputs dropped: one forward, then one backward per layer on the same graph (each layer's
    outputs pass through a gate whose gradient switch is flipped between backward passes)."""
    n_layers = model.dims.n_layers
    switches = [[1.0] for _ in range(n_layers)]
    acts: dict[str, Tensor] = {}

    def leaf(activation: Tensor, _ctx: HookContext) -> Tensor:
        return activation.detach().requires_grad_(True)

    def gate(activation: Tensor, ctx: HookContext) -> Tensor:
        assert ctx.layer is not None
        out: Tensor = _Gate.apply(activation, switches[ctx.layer])
        return out

    def keep(activation: Tensor, ctx: HookContext) -> None:
        acts[ctx.name] = activation

    hooks: dict[SiteLike, list[HookFn]] = {Site("hook_embed"): [leaf]}
    if model.adapter.pos_embed is not None:
        hooks[Site("hook_pos_embed")] = [leaf]
    for layer in range(n_layers):
        hooks[Site("hook_attn_out", layer)] = [gate]
        hooks[Site("hook_mlp_out", layer)] = [gate]
    for site in sites:
        hooks.setdefault(site, []).append(keep)
    out = []
    with torch.enable_grad(), model.hooks(hooks):
        loss = _metric_mean(metric, model(inputs), inputs["attention_mask"])
        names = [s.name for s in sites]
        for dropped in progress_bar(range(n_layers), progress, "AtP* GradDrop"):
            for layer, switch in enumerate(switches):
                switch[0] = 0.0 if layer == dropped else 1.0
            grads = torch.autograd.grad(loss, [acts[n] for n in names], retain_graph=True, allow_unused=True)
            out.append({n: torch.zeros_like(acts[n]) if g is None else g.detach() for n, g in zip(names, grads)})
    return out


def _pattern(q: Tensor, k: Tensor, masked: Tensor, scaling: float, softcap: float | None) -> Tensor:
    """One head's attention pattern ``[batch, q, k]`` from its queries and keys (as HF's eager attention)."""
    raw = torch.einsum("bqd,bkd->bqk", q, k) * scaling
    if softcap:
        raw = torch.tanh(raw / softcap) * softcap
    raw = raw.masked_fill(masked, torch.finfo(raw.dtype).min)
    return raw.float().softmax(-1)


def _qk_fix(
    model: HookedModel,
    base: dict[str, Tensor],
    metric: Metric,
    source: Any,
    acts: dict[str, Tensor],
) -> tuple[Float[Tensor, "layer head"], Float[Tensor, "layer kv_head"]]:
    """Query and key effects per head: the exact attention pattern with that head's queries (keys)
    patched, then linear from the pattern on. Keys shared by a group of query heads (GQA) add up."""
    d = model.dims
    pattern_sites = [Site("attn.hook_pattern", layer) for layer in range(d.n_layers)]
    score_sites = [Site("attn.hook_attn_scores", layer) for layer in range(d.n_layers)]
    _, pacts, pgrads, _ = _grads(model, base, metric, pattern_sites + score_sites)
    groups = d.n_heads // d.n_kv_heads
    device = next(iter(pgrads.values())).device
    q_out = torch.zeros(d.n_layers, d.n_heads, device=device)
    k_out = torch.zeros(d.n_layers, d.n_kv_heads, device=device)
    for layer in range(d.n_layers):
        attn = model.layer_module(layer, model.adapter.attn)
        scaling = float(getattr(attn, "scaling", d.d_head**-0.5))
        softcap = getattr(attn, "attn_logit_softcapping", None) or getattr(model.config, "attn_logit_softcapping", None)
        scores = pacts[score_sites[layer].name]  # [batch, head, q, k], after softcap and mask
        grad = pgrads[pattern_sites[layer].name]
        masked = scores < torch.finfo(scores.dtype).min / 2
        q_name, k_name = Site("attn.hook_q", layer).name, Site("attn.hook_k", layer).name
        q_base, k_base, q_src, k_src = acts[q_name], acts[k_name], source[q_name], source[k_name]
        for head in range(d.n_heads):
            kv, m, g = head // groups, masked[:, head], grad[:, head].float()
            # Differences of recomputed patterns, so rounding cancels and equal inputs give exactly 0.
            old = _pattern(q_base[:, :, head], k_base[:, :, kv], m, scaling, softcap)
            q_out[layer, head] = ((_pattern(q_src[:, :, head], k_base[:, :, kv], m, scaling, softcap) - old) * g).sum()
            k_out[layer, kv] += ((_pattern(q_base[:, :, head], k_src[:, :, kv], m, scaling, softcap) - old) * g).sum()
    return q_out, k_out


class AtPComparison(Result):
    """AtP estimates and exact patching effects of the same cells (``atp``, ``exact`` with the
    node's axes); ``config`` holds the Spearman and Pearson correlations and the top disagreements."""

    method = "atp_vs_exact"

    def default_tensor(self) -> str:
        return "exact"


def _ranks(x: Tensor) -> Tensor:
    """Ranks with ties sharing their average rank (as Spearman's correlation needs)."""
    order = x.argsort()
    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, ranks)
    return (sums / counts)[inverse]


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = (a.norm() * b.norm()).item()
    return max(-1.0, min(1.0, (a @ b).item() / denom)) if denom > 0 else float("nan")


def atp_vs_exact(
    model: HookedModel,
    clean: Inputs,
    corrupt: Inputs,
    metric: Metric,
    *,
    node: str = "heads",
    direction: str = "denoising",
    top: int = 10,
    units: Sequence[int] | None = None,
    progress: bool = False,
) -> AtPComparison:
    """Where AtP and exact activation patching disagree, for one node type (``heads``, ``neurons``, ``resid``).

    Exact effects come from the batched :func:`activation_patch` (``units`` restricts neurons, whose
    exact sweep is one patched run per neuron). Reports rank (Spearman) and linear (Pearson)
    correlation and the `top` cells with the largest ``|atp - exact|``.
    """
    if node not in NODE_SITES:
        raise ConfigError(f"node must be one of {sorted(NODE_SITES)}; got {node!r}")
    atp = attribution_patch(model, clean, corrupt, metric, AtPConfig(nodes=(node,), direction=direction))
    kind = {"heads": "heads", "neurons": "neurons", "resid": "resid_pre"}[node]
    exact = activation_patch(model, clean, corrupt, kind, metric, direction=direction, units=units, progress=progress)
    base = exact["corrupt"] if direction == "denoising" else exact["clean"]
    exact_delta = exact["metric"] - base
    estimate = atp[node] if units is None else atp[node][:, list(units)]
    a, e = estimate.flatten().float(), exact_delta.flatten().float()
    spearman, pearson = _pearson(_ranks(a), _ranks(e)), _pearson(a, e)
    axes = exact.axes["metric"]
    worst = (a - e).abs().argsort(descending=True)[:top]
    shape = exact_delta.shape
    disagreements = []
    for flat in worst.tolist():
        index = torch.unravel_index(torch.tensor(flat), shape)
        cell = {ax: exact.labels[ax][int(i)] for ax, i in zip(axes, index)}
        disagreements.append({**cell, "atp": float(a[flat]), "exact": float(e[flat])})
    return AtPComparison(
        tensors={"atp": estimate, "exact": exact_delta},
        axes={"atp": axes, "exact": axes},
        labels={ax: exact.labels[ax] for ax in axes},
        config={
            "node": node,
            "direction": direction,
            "spearman": spearman,
            "pearson": pearson,
            "top_disagreements": disagreements,
            "model_type": model.dims.model_type,
            "dtype": str(model.dtype).removeprefix("torch."),
        },
    )


__all__ = ["AtPComparison", "AtPConfig", "AtPResult", "atp_vs_exact", "attribution_patch"]
