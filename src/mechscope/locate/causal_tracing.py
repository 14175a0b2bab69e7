"""Causal tracing (Meng et al. 2022, ROME): where does the model recall a fact about a subject?

The subject tokens' input embeddings are corrupted with Gaussian noise (``noise`` x the standard
deviation of the embedding matrix, 3 by default), which destroys the model's prediction of the
answer. Then single clean states are restored into the corrupted run -- a layer's hidden state
(``resid``: the residual stream leaving the layer), or a window of ``window`` consecutive layers' MLP
outputs (``mlp``) or attention outputs (``attn``) centred on the layer, at one position -- and the
probability of the correct token is measured. A state whose restoration brings the probability back
carries the fact. ROME finds MLPs at the subject's last token in early-middle layers.

Each prompt is traced with ``samples`` independent noise draws (the batch), and every restoration runs
through the batched patching engine (:mod:`mechscope.locate._engine`) -- or, with ``method="loop"``,
one full forward per restoration (the reference).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.locate._engine import Variant, run_batched, run_loop
from mechscope.locate.metrics import token_prob
from mechscope.model.hooks import HookContext, HookFn
from mechscope.model.partial import base_run
from mechscope.results import Result
from mechscope.sites import Site, SiteLike

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

#: Restored state kinds and the site each restores.
TRACE_SITES: dict[str, str] = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}
#: Position classes of :func:`trace_facts` (ROME's Figure 1 rows).
POSITION_CLASSES = ("first_subject", "middle_subject", "last_subject", "first_after", "further", "last")
#: The position classes inside the subject.
SUBJECT_CLASSES = POSITION_CLASSES[:3]


@dataclass(frozen=True, kw_only=True)
class TracingConfig:
    """Options of :func:`causal_trace`.

    Attributes:
        noise: noise standard deviation as a multiple of the embedding matrix's standard deviation.
        samples: independent noise draws per prompt (averaged).
        window: layers restored together for ``mlp`` and ``attn`` (centred on the row's layer and cut at
            the model's ends; None: a fifth of the depth, ``max(1, n_layers // 5)``, ROME's 10 of 48 layers).
        kinds: which states to restore: ``resid``, ``mlp``, ``attn``.
        seed: seed of the noise.
        method: ``batched`` or ``loop`` (one full forward per restoration; the reference).
        chunk_size: restorations per forward in the batched method.
    """

    noise: float = 3.0
    samples: int = 10
    window: int | None = None
    kinds: tuple[str, ...] = ("resid", "mlp", "attn")
    seed: int = 0
    method: str = "batched"
    chunk_size: int = 32

    def __post_init__(self) -> None:
        if not 0 < self.noise < float("inf"):
            raise ConfigError(f"noise must be > 0 (a multiple of the embedding std); got {self.noise}")
        if self.samples < 1:
            raise ConfigError(f"samples must be >= 1; got {self.samples}")
        if self.window is not None and self.window < 1:
            raise ConfigError(f"window must be >= 1 or None; got {self.window}")
        bad = [k for k in self.kinds if k not in TRACE_SITES]
        if bad or not self.kinds:
            raise ConfigError(f"kinds must be a non-empty subset of {sorted(TRACE_SITES)}; got {list(self.kinds)}")
        if self.method not in ("batched", "loop"):
            raise ConfigError(f"method must be 'batched' or 'loop'; got {self.method!r}")
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1; got {self.chunk_size}")


@dataclass(frozen=True)
class PeakEstimate:
    """Where restoring a kind recovers the most, with its uncertainty over noise draws (one prompt) or
    over prompts (a summary).

    Attributes:
        layer, position: the peak (a position index, or a position class for a summary).
        effect: the mean indirect effect there; ``stderr`` its standard error (0 with one draw).
        layers: every layer (same position) whose mean effect is within two paired standard errors of
            the peak's: the peak is only known to lie among them.
        frequency: the fraction of bootstrap resamples (of the draws or prompts) whose peak is this cell.
        n: the number of noise draws or prompts.
    """

    layer: int
    position: int | str
    effect: float
    stderr: float
    layers: tuple[int, ...]
    frequency: float
    n: int

    def describe(self) -> str:
        """One line, e.g. ``layer 4 @ 7: effect 0.31 +- 0.04 (peak in 82% of resamples; layers 3-6 tie)``."""
        span = f"layer {self.layers[0]}" if len(self.layers) == 1 else f"layers {self.layers[0]}-{self.layers[-1]}"
        return (
            f"layer {self.layer} @ {self.position}: effect {self.effect:.4f} +- {self.stderr:.4f} "
            f"(peak in {100 * self.frequency:.0f}% of {self.n}-sample resamples; {span} within 2 s.e.)"
        )


def peak_estimate(
    samples: Float[Tensor, "n layer col"], columns: Sequence[int | str], *, n_boot: int = 1000, seed: int = 0
) -> PeakEstimate:
    """The peak of the mean of `samples` over its first axis (NaN: missing), with its standard error, the
    layers within two paired standard errors of it, and how often bootstrap resamples agree."""
    if n_boot < 1:
        raise ConfigError(f"n_boot must be >= 1; got {n_boot}")
    x = samples.double()
    mean = torch.nanmean(x, 0)
    flat = int(torch.nan_to_num(mean, nan=float("-inf")).argmax())
    layer, col = divmod(flat, x.shape[2])
    column = x[:, :, col]  # [n, layer]
    have = ~column[:, layer].isnan()
    peak = column[have, layer]
    n = int(have.sum())

    def stderr(v: Tensor) -> float:
        v = v[~v.isnan()]
        return float(v.std() / len(v) ** 0.5) if len(v) > 1 else 0.0

    within = [
        other
        for other in range(x.shape[1])
        if other == layer or float(torch.nanmean(peak - column[have, other])) <= 2 * stderr(peak - column[have, other])
    ]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.shape[0], (n_boot, x.shape[0]), generator=gen)
    boot = torch.nan_to_num(torch.nanmean(x[idx], 1), nan=float("-inf")).flatten(1).argmax(-1)  # [n_boot]
    return PeakEstimate(
        layer=layer,
        position=columns[col],
        effect=float(mean[layer, col]),
        stderr=stderr(peak),
        layers=tuple(within),
        frequency=float((boot == flat).double().mean()),
        n=n,
    )


class TracingResult(Result):
    """Per restored kind, ``[layer, pos]`` probability of the target with that state restored, and
    ``<kind>_samples [layer, pos, sample]`` per noise draw; ``clean`` and ``corrupt`` (0-d): the
    probability in the clean and the noised run (``corrupt_samples [sample]`` per draw)."""

    method = "causal_trace"

    def default_tensor(self) -> str:
        return str(self.config["kinds"][0])

    def effect(self, kind: str) -> Float[Tensor, "layer pos"]:
        """Indirect effect: restored probability minus the corrupted one."""
        return self[kind] - self["corrupt"]

    def peak(self, kind: str, positions: Sequence[int] | None = None) -> tuple[int, int, float]:
        """``(layer, position, effect)`` where restoring `kind` recovers the most, over all positions or
        only `positions` (e.g. ``[max(config["subject_positions"])]``: ROME's early site)."""
        effect = self.effect(kind)
        n_pos = effect.shape[1]
        cols = list(range(n_pos)) if positions is None else [int(p) for p in positions]
        if not cols or any(not -n_pos <= p < n_pos for p in cols):
            raise ConfigError(f"expected positions within 0..{n_pos - 1} (or negative from the end), got {positions}")
        cols = [p % n_pos for p in cols]
        flat = int(effect[:, cols].argmax())
        layer, j = divmod(flat, len(cols))
        return layer, cols[j], float(effect[layer, cols[j]])

    def peak_estimate(
        self, kind: str, positions: Sequence[int] | None = None, *, n_boot: int = 1000, seed: int = 0
    ) -> PeakEstimate:
        """:meth:`peak` with its uncertainty over the noise draws: standard error, the layers that tie
        with it within two standard errors, and how often bootstrap resamples of the draws agree."""
        if f"{kind}_samples" not in self.tensors:
            raise ConfigError(f"this result has no per-draw samples of {kind!r} (saved by an older mechscope)")
        effect = self[f"{kind}_samples"] - self["corrupt_samples"]  # [layer, pos, sample]
        n_pos = effect.shape[1]
        cols = list(range(n_pos)) if positions is None else [int(p) for p in positions]
        if not cols or any(not -n_pos <= p < n_pos for p in cols):
            raise ConfigError(f"expected positions within 0..{n_pos - 1} (or negative from the end), got {positions}")
        cols = [p % n_pos for p in cols]
        return peak_estimate(effect[:, cols].permute(2, 0, 1), cols, n_boot=n_boot, seed=seed)


def _noise_hook(positions: list[int], noise: Tensor) -> HookFn:
    def fn(activation: Tensor, _ctx: HookContext) -> Tensor:
        out = activation.clone()
        out[:, positions] = out[:, positions] + noise.to(out.device, out.dtype)
        return out

    return fn


def default_window(n_layers: int) -> int:
    """Layers restored together by default: a fifth of the depth (ROME: 10 of GPT-2 XL's 48), at least 1."""
    return max(1, n_layers // 5)


def _window(layer: int, window: int, n_layers: int) -> list[int]:
    """The layers restored for row `layer`: `window` layers centred on it, cut at the model's ends (as
    ROME does). Near the ends the window shrinks instead of shifting, so every row restores a different
    set of layers (a shifted window would make the first ``window // 2`` rows identical)."""
    lo = max(0, layer - window // 2)
    return list(range(lo, min(n_layers, layer + window - window // 2)))


def causal_trace(
    model: HookedModel,
    prompt: str | Tensor,
    subject: str | Sequence[int],
    target: str | int | None = None,
    config: TracingConfig | None = None,
    *,
    progress: bool = False,
) -> TracingResult:
    """Trace one prompt: noise `subject` (a substring of `prompt`, or its token positions), restore states.

    `target` is the answer token (a single-token string or an id; default: the clean run's top token).
    """
    cfg = config or TracingConfig()
    ids = model.to_tokens(prompt)["input_ids"] if isinstance(prompt, str) else prompt.reshape(1, -1)
    ids = ids.to(model.device)
    n_pos = int(ids.shape[1])
    if isinstance(subject, str):
        if not isinstance(prompt, str):
            raise ConfigError("a subject substring needs a text prompt; pass token positions with token ids")
        subject_pos = model.find_positions(prompt, subject)
    else:
        subject_pos = sorted({int(p) % n_pos for p in subject})
        if not subject_pos or any(not -n_pos <= int(p) < n_pos for p in subject):
            raise ConfigError(f"subject positions must be a non-empty list in [{-n_pos}, {n_pos}); got {list(subject)}")
    clean_ids = ids.expand(cfg.samples, -1)
    clean_logits = model(clean_ids)
    if target is None:
        target_id = int(clean_logits[0, -1].argmax())
    elif isinstance(target, str):
        target_id = model.to_single_token(target)
    else:
        target_id = int(target)
        if not 0 <= target_id < model.dims.d_vocab:
            raise ConfigError(f"target must be a token id in [0, {model.dims.d_vocab}); got {target_id}")

    def metric(logits: Tensor) -> Tensor:
        return token_prob(logits, target_id)

    n_layers = model.dims.n_layers
    window = cfg.window or default_window(n_layers)
    kind_sites = {kind: TRACE_SITES[kind] for kind in cfg.kinds}
    sites = [Site(site, layer) for site in kind_sites.values() for layer in range(n_layers)]
    std = float(model.weights.W_E.float().std())
    gen = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn(cfg.samples, len(subject_pos), model.dims.d_model, generator=gen) * (cfg.noise * std)
    noise_hooks: dict[SiteLike, HookFn] = {Site("hook_embed"): _noise_hook(subject_pos, noise)}
    inputs = {"input_ids": clean_ids, "attention_mask": torch.ones_like(clean_ids)}
    clean = base_run(model, inputs, sites)
    corrupt = base_run(model, inputs, sites, hooks=noise_hooks)
    variants: list[Variant] = []
    for kind, site_kind in kind_sites.items():
        for layer in range(n_layers):
            layers = [layer] if kind == "resid" else _window(layer, window, n_layers)
            for pos in range(n_pos):
                masks = {}
                for restored in layers:
                    site = Site(site_kind, restored)
                    acts = clean.cache[site.name]
                    mask = torch.zeros(1, *acts.shape[1:], dtype=torch.bool, device=acts.device)
                    mask[:, pos] = True
                    masks[site] = mask
                variants.append(Variant(masks))
    sources = {site: clean.cache[site.name] for site in sites}
    if cfg.method == "loop":
        flat = run_loop(
            model,
            corrupt,
            sources,
            variants,
            metric,
            base_hooks=noise_hooks,
            progress=progress,
            per_row=True,
            desc="causal tracing",
        )
    else:
        base_acts = {site: corrupt.cache[site.name] for site in sites}
        flat = run_batched(
            model,
            corrupt,
            sources,
            variants,
            metric,
            base_acts=base_acts,
            chunk_size=cfg.chunk_size,
            progress=progress,
            per_row=True,
            desc="causal tracing",
        )
    grids = flat.reshape(len(kind_sites), n_layers, n_pos, cfg.samples)  # one column per noise draw
    tokens = model.to_str_tokens(ids[0]) if model.tokenizer is not None else [str(t) for t in ids[0].tolist()]
    tensors: dict[str, Tensor] = {kind: grids[i].mean(-1) for i, kind in enumerate(kind_sites)}
    tensors.update({f"{kind}_samples": grids[i] for i, kind in enumerate(kind_sites)})
    corrupt_rows = metric(corrupt.logits).float()
    tensors["clean"] = metric(clean.logits).float().mean()
    tensors["corrupt"] = corrupt_rows.mean()
    tensors["corrupt_samples"] = corrupt_rows
    record: dict[str, Any] = {
        "kinds": list(kind_sites),
        "noise": cfg.noise,
        "noise_std": cfg.noise * std,
        "samples": cfg.samples,
        "window": window,
        "windows": {str(layer): _window(layer, window, n_layers) for layer in range(n_layers)},
        "seed": cfg.seed,
        "method": cfg.method,
        "subject_positions": subject_pos,
        "target": target_id,
        "model_type": model.dims.model_type,
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    return TracingResult(
        tensors=tensors,
        axes={
            **{kind: ("layer", "pos") for kind in kind_sites},
            **{f"{kind}_samples": ("layer", "pos", "sample") for kind in kind_sites},
            "clean": (),
            "corrupt": (),
            "corrupt_samples": ("sample",),
        },
        labels={
            "layer": [str(i) for i in range(n_layers)],
            "pos": [f"{i}:{t}" for i, t in enumerate(tokens)],
            "sample": [str(i) for i in range(cfg.samples)],
        },
        config=record,
    )


def position_classes(subject: Sequence[int], n_pos: int) -> list[str]:
    """ROME's class of every position: subject first/middle/last token, first token after, further, last."""
    first, last = min(subject), max(subject)
    out = []
    for p in range(n_pos):
        if p == n_pos - 1:
            out.append("last")
        elif p == last:
            out.append("last_subject")
        elif p == first:
            out.append("first_subject")
        elif first < p < last:
            out.append("middle_subject")
        elif p == last + 1:
            out.append("first_after")
        elif p > last:
            out.append("further")
        else:
            out.append("before")
    return out


class TracingSummary(Result):
    """Average indirect effect per kind over many traced prompts, ``[layer, position_class]``
    (ROME's position classes), and ``<kind>_prompts [prompt, layer, position_class]`` per prompt (NaN
    where a prompt has no position of a class); ``count [position_class]``: prompts per class."""

    method = "causal_trace_summary"

    def default_tensor(self) -> str:
        return str(self.config["kinds"][0])

    def peak(self, kind: str, classes: Sequence[str] | None = None) -> tuple[int, str, float]:
        """``(layer, position class, mean effect)`` of the largest average effect of `kind`, over every
        position class or only `classes` (e.g. the subject's: where ROME's early site is)."""
        names = list(POSITION_CLASSES) if classes is None else list(classes)
        unknown = [c for c in names if c not in POSITION_CLASSES]
        if not names or unknown:
            raise ConfigError(f"expected position classes from {list(POSITION_CLASSES)}, got {classes}")
        cols = [POSITION_CLASSES.index(c) for c in names]
        grid = self[kind][:, cols]
        flat = int(torch.nan_to_num(grid, nan=float("-inf")).argmax())
        layer, j = divmod(flat, grid.shape[1])
        return layer, names[j], float(grid[layer, j])

    def peak_estimate(
        self, kind: str, classes: Sequence[str] | None = None, *, n_boot: int = 1000, seed: int = 0
    ) -> PeakEstimate:
        """:meth:`peak` with its uncertainty over the prompts: standard error, the layers that tie with it
        within two paired standard errors, and how often bootstrap resamples of the prompts agree."""
        names = list(POSITION_CLASSES) if classes is None else list(classes)
        unknown = [c for c in names if c not in POSITION_CLASSES]
        if not names or unknown:
            raise ConfigError(f"expected position classes from {list(POSITION_CLASSES)}, got {classes}")
        if f"{kind}_prompts" not in self.tensors:
            raise ConfigError(f"this summary has no per-prompt effects of {kind!r} (saved by an older mechscope)")
        cols = [POSITION_CLASSES.index(c) for c in names]
        return peak_estimate(self[f"{kind}_prompts"][:, :, cols], names, n_boot=n_boot, seed=seed)


def trace_facts(
    model: HookedModel,
    prompts: Sequence[str],
    subjects: Sequence[str],
    targets: Sequence[str | int | None] | None = None,
    config: TracingConfig | None = None,
    *,
    progress: bool = False,
) -> TracingSummary:
    """Trace many facts and average the indirect effects by ROME's position classes (`progress`: a bar)."""
    if len(prompts) != len(subjects) or (targets is not None and len(targets) != len(prompts)):
        raise ConfigError(
            f"prompts, subjects (and targets) must have equal lengths; got {len(prompts)}, {len(subjects)}"
            + ("" if targets is None else f", {len(targets)}")
        )
    if not prompts:
        raise ConfigError("trace_facts needs at least one prompt")
    cfg = config or TracingConfig()
    n_layers, n_cls = model.dims.n_layers, len(POSITION_CLASSES)
    sums = {kind: torch.zeros(n_layers, n_cls) for kind in cfg.kinds}
    per_prompt = {kind: torch.full((len(prompts), n_layers, n_cls), float("nan")) for kind in cfg.kinds}
    count = torch.zeros(n_cls)
    gaps = []
    from mechscope.locate._engine import progress_bar

    pairs = list(zip(prompts, subjects, strict=True))
    for i, (prompt, subject) in enumerate(progress_bar(pairs, progress, "causal tracing")):
        result = causal_trace(model, prompt, subject, None if targets is None else targets[i], cfg)
        classes = position_classes(result.config["subject_positions"], result[cfg.kinds[0]].shape[1])
        gaps.append(float(result["clean"] - result["corrupt"]))
        for c, name in enumerate(POSITION_CLASSES):
            cols = [p for p, cls in enumerate(classes) if cls == name]
            if not cols:
                continue
            count[c] += 1
            for kind in cfg.kinds:
                value = result.effect(kind)[:, cols].mean(-1).float().cpu()
                sums[kind][:, c] += value
                per_prompt[kind][i, :, c] = value
    tensors: dict[str, Tensor] = {kind: s / count.clamp(min=1) for kind, s in sums.items()}
    for kind in cfg.kinds:
        tensors[kind][:, count == 0] = float("nan")
    tensors["count"] = count
    tensors.update({f"{kind}_prompts": per_prompt[kind] for kind in cfg.kinds})
    return TracingSummary(
        tensors=tensors,
        axes={
            **{kind: ("layer", "position_class") for kind in cfg.kinds},
            **{f"{kind}_prompts": ("prompt", "layer", "position_class") for kind in cfg.kinds},
            "count": ("position_class",),
        },
        labels={
            "layer": [str(i) for i in range(n_layers)],
            "position_class": list(POSITION_CLASSES),
            "prompt": [str(i) for i in range(len(prompts))],
        },
        config={
            "kinds": list(cfg.kinds),
            "n_prompts": len(prompts),
            "mean_clean_minus_corrupt": sum(gaps) / len(gaps),
            "noise": cfg.noise,
            "samples": cfg.samples,
            "window": cfg.window or default_window(n_layers),
            "model_type": model.dims.model_type,
            "dtype": str(model.dtype).removeprefix("torch."),
        },
    )


__all__ = [
    "POSITION_CLASSES",
    "SUBJECT_CLASSES",
    "TRACE_SITES",
    "PeakEstimate",
    "TracingConfig",
    "TracingResult",
    "TracingSummary",
    "causal_trace",
    "default_window",
    "peak_estimate",
    "position_classes",
    "trace_facts",
]
