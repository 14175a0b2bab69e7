"""Attention heads: patterns for a prompt, per-head behaviour detectors and head ablation.

Detectors score every head on a batch of token sequences (by default random tokens whose first half
is repeated, which makes every behaviour measurable at once):

* **previous-token**: mean attention from each query to the position just before it;
* **duplicate-token**: attention mass on earlier occurrences of the query's own token;
* **induction (prefix matching)**: attention mass on keys whose *previous* token is the query's token,
  i.e. on the token that followed an earlier occurrence;
* **copying** (from weights, via the OV circuit's logit effect): embed a token, pass it through the
  head's norm, value and output maps and the final norm and unembedding; the score is how often the
  token's own logit ranks in the top-k of the candidate set; ``copying_eigen`` is the positive
  eigenvalue ratio ``sum(Re lambda) / sum(|lambda|)`` of that token-to-token matrix.

``*_excess`` variants subtract the mass the head gives the same (query, key) cells when the content
is replaced by fresh random tokens: a head that merely attends to a window of recent positions gets a
prefix-matching score by coincidence of offsets, but no excess. Scores are in [0, 1] (eigen ratio and
excess in [-1, 1]). An induction head scores high on both induction and
copying; a previous-token head feeds it through K-composition.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.errors import ConfigError, ShapeError
from mechscope.model.tokens import special_ids, special_prefix, text_mask
from mechscope.results import Result
from mechscope.sites import Site

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel, Inputs
    from mechscope.model.hooks import HookContext

DETECTORS = (
    "previous_token",
    "duplicate_token",
    "duplicate_token_excess",
    "induction",
    "induction_excess",
    "copying",
    "copying_eigen",
)


class PatternResult(Result):
    """``pattern [layer, head, query_pos, key_pos]`` of one prompt; :meth:`plot` has a head selector."""

    method = "attention_patterns"

    def plot(self, name: str | None = None, *, reduce: Sequence[str] = ("batch",), title: str | None = None) -> Any:
        """An interactive heatmap of one head's pattern, with a dropdown over every (layer, head)."""
        if name not in (None, "pattern"):
            return super().plot(name, reduce=reduce, title=title)
        import plotly.graph_objects as go

        pattern = self["pattern"].float()
        n_layers, n_heads = pattern.shape[:2]
        q_labels = self.labels.get("query_pos", [str(i) for i in range(pattern.shape[2])])
        k_labels = self.labels.get("key_pos", [str(i) for i in range(pattern.shape[3])])
        layer_names = self.labels.get("layer", [str(i) for i in range(n_layers)])
        fig = go.Figure()
        buttons = []
        n_traces = n_layers * n_heads
        for li in range(n_layers):
            for h in range(n_heads):
                idx = li * n_heads + h
                fig.add_trace(
                    go.Heatmap(
                        z=pattern[li, h].tolist(),
                        x=k_labels,
                        y=q_labels,
                        zmin=0,
                        zmax=1,
                        colorscale="Blues",
                        visible=idx == 0,
                        name=f"L{layer_names[li]}H{h}",
                    )
                )
                visible = [i == idx for i in range(n_traces)]
                buttons.append({"label": f"L{layer_names[li]}H{h}", "method": "update", "args": [{"visible": visible}]})
        fig.update_layout(
            title=title or "attention pattern (query x key)",
            updatemenus=[{"buttons": buttons, "direction": "down", "x": 1.0, "y": 1.15}],
            xaxis_title="key position",
            yaxis_title="query position",
        )
        fig.update_yaxes(autorange="reversed")
        return fig


class HeadScores(Result):
    """Detector scores ``[layer, head]``, one tensor per name in :data:`DETECTORS`."""

    method = "head_detectors"

    def default_tensor(self) -> str:
        return "induction"

    def top(self, detector: str = "induction", k: int = 3) -> list[tuple[int, int, float]]:
        """The `k` highest-scoring heads for `detector` as (layer, head, score)."""
        scores = self[detector]
        flat = scores.flatten()
        order = flat.argsort(descending=True)[:k]
        n_heads = scores.shape[1]
        return [(int(i) // n_heads, int(i) % n_heads, float(flat[i])) for i in order]


def attention_patterns(
    model: HookedModel, inputs: Inputs, *, layers: Sequence[int] | None = None, row: int = 0
) -> PatternResult:
    """Attention patterns of batch row `row` of `inputs` at `layers` (default: all)."""
    d = model.dims
    chosen = list(range(d.n_layers)) if layers is None else list(layers)
    batch = model.prepare_inputs(inputs)
    n_rows = batch["input_ids"].shape[0]
    if not 0 <= row < n_rows:
        raise ConfigError(f"row must be in 0..{n_rows - 1}; got {row}")
    sites = [model.site(Site("attn.hook_pattern", i)) for i in chosen]
    _, cache = model.run_with_cache(batch, sites)
    pattern = torch.stack([cache[s][row] for s in sites]).float().cpu()
    n_real = int(batch["attention_mask"][row].sum())
    ids = batch["input_ids"][row]
    real = batch["attention_mask"][row].bool()
    if model.tokenizer is not None:
        tokens = [f"{i}:{t}" for i, t in enumerate(model.to_str_tokens(ids[real]))]
    else:
        tokens = [f"{i}:{int(t)}" for i, t in enumerate(ids[real])]
    keep = real.nonzero().flatten().cpu()
    pattern = pattern[:, :, keep][:, :, :, keep]
    labels = {"layer": [str(i) for i in chosen], "query_pos": tokens, "key_pos": tokens}
    config = {"layers": chosen, "row": row, "n_tokens": n_real, "model_type": d.model_type}
    return PatternResult(
        tensors={"pattern": pattern},
        axes={"pattern": ("layer", "head", "query_pos", "key_pos")},
        labels=labels,
        config=config,
    )


@dataclass(frozen=True, kw_only=True)
class HeadDetectorConfig:
    """Options of :func:`detect_heads`.

    Attributes:
        n_sequences: random sequences generated when no tokens are given.
        half_len: length of the random half that is then repeated (sequences are ``2 * half_len``).
        seed: seed of the random tokens and of the copying candidates.
        n_copy_tokens: candidate tokens of the copying score (drawn from the ordinary vocabulary).
        copy_top_k: rank within which a token's own logit counts as copied.
    """

    n_sequences: int = 16
    half_len: int = 20
    seed: int = 0
    n_copy_tokens: int = 200
    copy_top_k: int = 5

    def __post_init__(self) -> None:
        for name in ("n_sequences", "half_len", "n_copy_tokens", "copy_top_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.half_len < 2:
            raise ConfigError(f"half_len must be >= 2 (a repeat needs a previous token); got {self.half_len}")
        if self.copy_top_k > self.n_copy_tokens:
            raise ConfigError(f"copy_top_k ({self.copy_top_k}) must be <= n_copy_tokens ({self.n_copy_tokens})")


def ordinary_token_range(model: HookedModel) -> tuple[int, int]:
    """Ids [lo, hi) after the tokenizer's named special tokens (BOS, EOS, ...; all ids without a tokenizer).
    Random text is drawn from :func:`ordinary_token_ids`, which also leaves out the special tokens inside."""
    lo = 0
    if model.tokenizer is not None:
        special = [int(i) for i in model.tokenizer.all_special_ids]
        lo = max(special) + 1 if special and max(special) < model.dims.d_vocab // 2 else 0
    return lo, model.dims.d_vocab


def ordinary_token_ids(model: HookedModel) -> Int[Tensor, " n"]:
    """Ids of ordinary tokens, from which random text is drawn: :func:`ordinary_token_range` less every special
    token the tokenizer adds (Gemma 3's 6,249 -- its ``<unused>`` slots, turn and image markers: 2.4 % of its
    vocabulary, control or untrained embeddings rather than text) and less ids past the tokenizer's length
    (vocabulary padding: no token at all). Every id without a tokenizer."""
    lo, hi = ordinary_token_range(model)
    tokenizer = model.tokenizer
    if tokenizer is None:
        return torch.arange(lo, hi)
    hi = min(hi, len(tokenizer))
    keep = torch.zeros(model.dims.d_vocab, dtype=torch.bool)
    keep[lo:hi] = True
    keep[torch.tensor([i for i in special_ids(tokenizer) if 0 <= i < len(keep)], dtype=torch.long)] = False
    ids = keep.nonzero().squeeze(1)
    if ids.numel() == 0:
        raise ConfigError(f"the tokenizer leaves no ordinary token id below the model's vocabulary of {len(keep)}")
    return ids


def random_tokens(model: HookedModel, shape: tuple[int, ...], generator: torch.Generator) -> Int[Tensor, "..."]:
    """Ordinary tokens (:func:`ordinary_token_ids`) drawn uniformly with replacement, of `shape`."""
    ids = ordinary_token_ids(model)
    return ids[torch.randint(0, len(ids), shape, generator=generator)]


def repeated_tokens(model: HookedModel, *, n: int = 16, half_len: int = 20, seed: int = 0) -> Int[Tensor, "batch pos"]:
    """`n` sequences of `half_len` uniformly random ordinary tokens followed by the same tokens again, after
    the ids the tokenizer puts before any text (its BOS where it adds one), so the model reads them as it
    reads text: ``[n, len(prefix) + 2 * half_len]``; the halves are the last ``2 * half_len`` positions."""
    half = random_tokens(model, (n, half_len), torch.Generator().manual_seed(seed))
    prefix = special_prefix(model.tokenizer)
    start = torch.tensor(prefix, dtype=torch.long).expand(n, len(prefix))
    return torch.cat([start, half, half], dim=1)


def _behaviour_masks(ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Per-query target keys [batch, q, k] of the attention-based detectors (causal, real tokens only)."""
    n = ids.shape[1]
    real = mask.bool()
    pair = real[:, :, None] & real[:, None, :]
    earlier = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril(-1)[None] & pair
    same = ids[:, :, None] == ids[:, None, :]
    prev_tok = torch.cat([torch.full_like(ids[:, :1], -1), ids[:, :-1]], dim=1)  # token before each key
    follows = (ids[:, :, None] == prev_tok[:, None, :]) & prev_tok[:, None, :].ge(0)
    previous = torch.zeros(n, n, dtype=torch.bool, device=ids.device)
    previous[torch.arange(1, n), torch.arange(n - 1)] = True
    return {
        "previous_token": previous[None] & pair,
        "duplicate_token": same & earlier,
        "induction": follows & earlier,
    }


def _pattern_mass(patterns: list[Tensor], target: Tensor, has: Tensor) -> Tensor:
    """Mean attention mass on `target` keys over the queries in `has`: ``[layer, head]``."""
    per_layer = []
    for pattern in patterns:  # [batch, head, q, k]
        mass = (pattern * target[:, None].to(pattern.dtype)).sum(-1)  # [batch, head, q]
        weight = has[:, None].to(pattern.dtype)
        per_layer.append((mass * weight).sum((0, 2)) / weight.sum((0, 2)))
    return torch.stack(per_layer).cpu()


def _patterns(model: HookedModel, batch: dict[str, Tensor]) -> list[Tensor]:
    sites = [model.site(Site("attn.hook_pattern", i)) for i in range(model.dims.n_layers)]
    _, cache = model.run_with_cache(batch, sites)
    return [cache[s].float() for s in sites]


def _attention_scores(model: HookedModel, batch: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    """Attention-based scores, plus ``*_excess`` scores: the same cells' mass minus what the head gives
    them when the content is replaced by fresh random tokens (its purely positional share)."""
    patterns = _patterns(model, batch)
    ids = batch["input_ids"]
    fresh = random_tokens(model, tuple(ids.shape), torch.Generator().manual_seed(seed + 1))
    special = torch.isin(ids.cpu(), torch.tensor(special_ids(model.tokenizer), dtype=torch.long))  # BOS, turns stay
    fresh = torch.where(special, ids.cpu(), fresh)
    control = _patterns(model, {"input_ids": fresh.to(ids.device), "attention_mask": batch["attention_mask"]})
    masks = _behaviour_masks(ids, batch["attention_mask"])
    out: dict[str, Tensor] = {}
    for name, target in masks.items():
        has = target.any(-1)  # [batch, q]: queries where the behaviour is defined
        if not bool(has.any()):
            raise ConfigError(
                f"the inputs give no query where {name!r} is defined (e.g. induction needs a repeated token); "
                "use repeated_tokens(model) or sequences with repeats"
            )
        out[name] = _pattern_mass(patterns, target, has)
        if name != "previous_token":
            out[f"{name}_excess"] = out[name] - _pattern_mass(control, target, has)
    return out


def copying_scores(
    model: HookedModel,
    *,
    tokens: Sequence[int] | Tensor | None = None,
    top_k: int = 5,
    seed: int = 0,
    n: int = 200,
    progress: bool = False,
) -> tuple[Float[Tensor, "n_layers n_heads"], Float[Tensor, "n_layers n_heads"]]:
    """(top-k copying rate, positive eigenvalue ratio) of every head's OV circuit on candidate `tokens`.

    Each candidate's embedding goes through the layer's input norm, the head's value and output maps
    (and a post-attention norm where the family has one), the final norm and the unembedding; the
    token-to-token logit matrix restricted to the candidates is scored. Only the candidates' columns
    of the unembedding are computed (``n x n`` per head, not ``n x d_vocab``), all heads of a layer at once.
    """
    d, a = model.dims, model.adapter
    if tokens is None:
        ordinary = ordinary_token_ids(model)
        gen = torch.Generator().manual_seed(seed)
        cand = ordinary[torch.randperm(len(ordinary), generator=gen)[:n]]
    else:
        cand = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    if cand.numel() < top_k:
        raise ConfigError(f"need at least top_k={top_k} candidate tokens; got {cand.numel()}")
    cand = cand.to(model.device)
    w_e = model.weights.W_E[cand]  # [n, d_model]
    w_u = model.weights.W_U[:, cand]  # [d_model, n]: only the candidates' logits
    b_u = model.weights.b_U[cand]
    rate = torch.zeros(d.n_layers, d.n_heads)
    eigen = torch.zeros(d.n_layers, d.n_heads)
    final_norm = model.module(a.final_norm)
    layers: Any = range(d.n_layers)
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="copying scores", unit="layer")
    with torch.no_grad():
        for layer in layers:
            x = model.layer_module(layer, a.ln1)(w_e) if a.ln1 is not None else w_e
            w_v = model.weights.W_V_layer(layer)  # [head, d_model, d_head]
            b_v = model.weights._expand(model.weights.qkv(layer)[5])  # [head, d_head]
            w_o = model.weights.W_O_layer(layer)  # [head, d_head, d_model]
            out = torch.einsum("nd,hde->hne", x, w_v) + b_v[:, None]
            out = torch.einsum("hne,hed->hnd", out, w_o)  # [head, n, d_model]
            if a.post_attn_norm is not None:
                out = model.layer_module(layer, a.post_attn_norm)(out)
            normed = final_norm(out)  # [head, n, d_model]
            logits = (normed @ w_u + b_u).float()  # [head, n, n]
            own = logits.diagonal(dim1=-2, dim2=-1)  # [head, n]
            rank = (logits > own[..., None]).sum(-1)
            rate[layer] = (rank < top_k).float().mean(-1).cpu()
            lam = _low_rank_eigvals(normed, w_u, b_u, rank=d.d_head + 8)  # [head, n]
            eigen[layer] = (lam.real.sum(-1) / lam.abs().sum(-1).clamp_min(1e-12)).float().cpu()
    return rate, eigen


def _low_rank_eigvals(
    normed: Float[Tensor, "head n d_model"], w_u: Float[Tensor, "d_model n"], b_u: Float[Tensor, " n"], *, rank: int
) -> Tensor:
    """Eigenvalues of ``normed @ w_u + b_u`` (``[head, n, n]``), in float64, through a rank-`rank` basis.

    A head's OV output has rank <= d_head; norms scale rows and columns and add a mean and a bias term,
    and the unembedding bias adds one more, so the n x n logit matrix has rank <= d_head + 3. Its
    non-zero eigenvalues are those of a small ``rank x rank`` matrix: with ``F = Q B`` (Q orthonormal,
    from F times a fixed random matrix) the eigenvalues of ``F W`` are those of ``B W Q`` and zeros.
    A head whose factorisation is not exact (relative residual above 100 x the input dtype's epsilon)
    falls back to the full matrix.
    """
    f = torch.cat([normed.double(), torch.ones_like(normed[..., :1], dtype=torch.float64)], -1)  # [head, n, d+1]
    w = torch.cat([w_u.double(), b_u.double()[None]], 0)  # [d+1, n]
    n = f.shape[1]
    if rank >= n:
        return torch.linalg.eigvals(f @ w)
    omega = torch.randn(f.shape[-1], rank, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    basis, _ = torch.linalg.qr(f @ omega.to(f.device))  # [head, n, rank]
    coeffs = basis.transpose(-1, -2) @ f  # [head, rank, d+1]
    residual = (f - basis @ coeffs).flatten(1).norm(dim=-1) / f.flatten(1).norm(dim=-1).clamp_min(1e-300)
    small = torch.linalg.eigvals(coeffs @ w @ basis)  # [head, rank]
    lam = torch.cat([small, torch.zeros(f.shape[0], n - rank, dtype=small.dtype, device=small.device)], -1)
    # The inputs carry their dtype's rounding (float32: ~1e-7 relative), so "exact" means within it.
    inexact = (residual > 100 * torch.finfo(normed.dtype).eps).nonzero().flatten()
    if len(inexact):
        lam[inexact] = torch.linalg.eigvals(f[inexact] @ w)
    return lam


def detect_heads(
    model: HookedModel,
    tokens: Inputs | None = None,
    *,
    config: HeadDetectorConfig | None = None,
    progress: bool = False,
) -> HeadScores:
    """Score every head as previous-token, duplicate-token, induction and copying head.

    `tokens` default to :func:`repeated_tokens` (random halves repeated); any inputs with repeated
    tokens work (the detectors average over the queries where a behaviour is defined). `progress`
    shows a bar over the copying scores' layers.
    """
    cfg = config or HeadDetectorConfig()
    d = model.dims
    if tokens is None:
        tokens = repeated_tokens(model, n=cfg.n_sequences, half_len=cfg.half_len, seed=cfg.seed)
    batch = model.prepare_inputs(tokens)
    scores = _attention_scores(model, batch, cfg.seed)
    rate, eigen = copying_scores(model, top_k=cfg.copy_top_k, seed=cfg.seed, n=cfg.n_copy_tokens, progress=progress)
    scores["copying"], scores["copying_eigen"] = rate, eigen
    axes: dict[str, tuple[str, ...]] = {name: ("layer", "head") for name in scores}
    labels = {"layer": [str(i) for i in range(d.n_layers)], "head": [str(h) for h in range(d.n_heads)]}
    config_out: dict[str, Any] = {
        "n_sequences": int(batch["input_ids"].shape[0]),
        "seq_len": int(batch["input_ids"].shape[1]),
        "seed": cfg.seed,
        "n_copy_tokens": cfg.n_copy_tokens,
        "copy_top_k": cfg.copy_top_k,
        "model_type": d.model_type,
    }
    return HeadScores(tensors=scores, axes=axes, labels=labels, config=config_out)


@contextmanager
def ablate_heads(
    model: HookedModel,
    heads: Sequence[tuple[int, int]],
    *,
    mode: Literal["zero", "mean"] = "zero",
    reference: Inputs | None = None,
) -> Iterator[None]:
    """Within the block, replace each (layer, head)'s ``hook_z`` by zero or by its mean over `reference`.

    Mean ablation needs `reference` inputs; the mean is over their rows' text tokens (padding and the
    tokenizer's BOS left out, as every token mean in mechscope: Gemma's BOS is an outlier), accumulated in
    fp32.
    """
    if mode not in ("zero", "mean"):
        raise ConfigError(f"mode must be 'zero' or 'mean'; got {mode!r}")
    d = model.dims
    by_layer: dict[int, list[int]] = {}
    for item in heads:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ConfigError(f"heads must be (layer, head) pairs; got {item!r}")
        layer, head = int(item[0]), int(item[1])
        if not (0 <= layer < d.n_layers and 0 <= head < d.n_heads):
            raise ConfigError(
                f"head ({layer}, {head}) does not exist: layers 0..{d.n_layers - 1}, heads 0..{d.n_heads - 1}"
            )
        by_layer.setdefault(layer, []).append(head)
    means: dict[int, Tensor] = {}
    if mode == "mean":
        if reference is None:
            raise ConfigError("mean ablation needs reference inputs (reference=...)")
        ref = model.prepare_inputs(reference)
        _, cache = model.run_with_cache(ref, [Site("attn.hook_z", i) for i in by_layer])
        text = text_mask(model.tokenizer, ref["input_ids"], ref["attention_mask"]).bool()
        for layer in by_layer:
            z = cache[Site("attn.hook_z", layer)]
            means[layer] = z[text.to(z.device)].float().mean(0)  # [n_heads, d_head]

    def hook_for(layer: int) -> Any:
        idx = torch.tensor(by_layer[layer])

        def fn(z: Tensor, _ctx: HookContext) -> Tensor:
            out = z.clone()
            if mode == "zero":
                out[:, :, idx] = 0
            else:
                out[:, :, idx] = means[layer][idx].to(z.dtype)
            return out

        return fn

    with model.hooks({Site("attn.hook_z", layer): hook_for(layer) for layer in by_layer}):
        yield


def in_context_gain(
    model: HookedModel,
    tokens: Int[Tensor, "batch pos"],
    first_mask: Tensor,
    repeat_mask: Tensor,
) -> dict[str, float]:
    """Mean next-token loss on span tokens at their first and repeated occurrence, and the gain (nats).

    Masks mark the *target* positions (as in ``mechscope.data.tasks.induction``); a target at position
    t is predicted from the logits at t - 1.
    """
    if first_mask.shape != tokens.shape or repeat_mask.shape != tokens.shape:
        raise ShapeError(
            f"masks must have the tokens' shape {tuple(tokens.shape)}; got {tuple(first_mask.shape)} and "
            f"{tuple(repeat_mask.shape)}"
        )
    with torch.no_grad():
        logits = model(tokens).float()[:, :-1]
    targets = tokens[:, 1:].to(logits.device)
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").cpu()
    first = float(losses[first_mask[:, 1:].bool()].mean())
    repeat = float(losses[repeat_mask[:, 1:].bool()].mean())
    return {"loss_first": first, "loss_repeat": repeat, "gain": first - repeat}


__all__ = [
    "DETECTORS",
    "HeadDetectorConfig",
    "HeadScores",
    "PatternResult",
    "ablate_heads",
    "attention_patterns",
    "copying_scores",
    "detect_heads",
    "in_context_gain",
    "ordinary_token_ids",
    "ordinary_token_range",
    "random_tokens",
    "repeated_tokens",
]
