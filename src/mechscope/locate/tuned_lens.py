"""Tuned lens: a learnt affine translator per layer before the logit lens's final norm and unembedding.

Each translator maps the residual before layer L to ``h + A_L h + b_L`` (stored as one ``Linear``
initialised to the identity, so an untrained tuned lens *is* the logit lens) and is trained to
minimise ``KL(final || lens_L)`` on a stream of text, with the model frozen (Belrose et al., 2023).
Translators save to safetensors with the model's fingerprint and are checked against the model on load.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechscope.errors import ConfigError, ShapeError
from mechscope.io import Envelope, FileSchema, ModelInfo, read_envelope, register_schema, write_envelope
from mechscope.locate.lens import LensResult, Transform, lens_readout, lens_sites, resid_to_logits
from mechscope.metrics import kl_div
from mechscope.model.tokens import packed_rows, text_mask
from mechscope.results import ModelMismatchError, Result

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel, Inputs


def _lens_v1_to_v2(header: dict[str, str]) -> dict[str, str]:
    """Schema 1 kept sizes, provenance and the training log as separate header keys."""
    body = {"training_log": json.loads(header.get("training_log", "{}"))}
    model = {
        "fingerprint": header.get("model_fingerprint", ""),
        "model_type": header.get("model_type", ""),
        "d_model": int(header["d_model"]),
        "n_layers": int(header["n_layers"]),
    }
    return {**header, "kind": "tuned_lens", "body": json.dumps(body), "model": json.dumps(model)}


TUNED_LENS_SCHEMA = register_schema(FileSchema("tuned_lens", 2, "tuned lens", {1: _lens_v1_to_v2}))
FORMAT = TUNED_LENS_SCHEMA.format
SCHEMA_VERSION = TUNED_LENS_SCHEMA.version


class TunedLensResult(LensResult):
    """A :class:`LensResult` read through a tuned lens (same tensors and axes)."""

    method = "tuned_lens"


class LensComparison(Result):
    """Mean ``KL(final || lens)`` per layer for both lenses: ``logit_lens_kl``, ``tuned_lens_kl [layer]``."""

    method = "lens_comparison"

    def default_tensor(self) -> str:
        return "tuned_lens_kl"

    def plot(self, name: str | None = None, *, reduce: Sequence[str] = ("batch",), title: str | None = None) -> Any:
        """Both KL curves on one chart (or one named tensor)."""
        if name is not None:
            return super().plot(name, reduce=reduce, title=title)
        import plotly.graph_objects as go

        layers = self.labels["layer"]
        fig = go.Figure()
        for key, label in (("logit_lens_kl", "logit lens"), ("tuned_lens_kl", "tuned lens")):
            fig.add_trace(go.Scatter(x=layers, y=self[key].tolist(), mode="lines+markers", name=label))
        fig.update_layout(title=title or "KL(final || lens) per layer", xaxis_title="layer", yaxis_title="KL (nats)")
        return fig


@dataclass(frozen=True, kw_only=True)
class TunedLensConfig:
    """Training options of :func:`train_tuned_lens`.

    Attributes:
        steps: optimiser steps.
        lr: Adam learning rate.
        batch_tokens: token positions per step (sampled from the cached windows).
        seq_len: length of the token windows cut from the text stream.
        max_windows: cap on windows read from the stream (their residuals are cached in memory).
        seed: seed of the token sampling.
        validation_fraction: share of the windows (the last ones; at least one when there are two or more)
            held out of training. On them each layer's trained translator is kept only where it reads the
            held-out text better than the translator did before training (for a new lens: the identity,
            the logit lens). Adam moves every weight by about ``lr`` per step even where the gradient is
            noise, and at a layer the logit lens already reads well that walk can only do harm (Gemma-3-270M,
            60 steps of 32 tokens: last layer 0.64 -> 1.81 nats). 0: keep every translator as trained.
    """

    steps: int = 300
    lr: float = 1e-3
    batch_tokens: int = 512
    seq_len: int = 64
    max_windows: int = 64
    seed: int = 0
    validation_fraction: float = 0.125

    def __post_init__(self) -> None:
        for name in ("steps", "batch_tokens", "seq_len", "max_windows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not 0 < self.lr < float("inf"):
            raise ConfigError(f"lr must be a finite number > 0; got {self.lr}")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"validation_fraction must be in [0, 1); got {self.validation_fraction}")


class TunedLens(nn.Module):
    """One affine translator per layer (the final residual is read untranslated)."""

    def __init__(self, d_model: int, n_layers: int, *, model_fingerprint: str = "", model_type: str = "") -> None:
        super().__init__()
        if d_model < 1 or n_layers < 1:
            raise ConfigError(f"d_model and n_layers must be >= 1; got {d_model}, {n_layers}")
        self.d_model, self.n_layers = d_model, n_layers
        self.model_fingerprint, self.model_type = model_fingerprint, model_type
        self.translators = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(n_layers))
        self.reset_to_identity()
        self.training_log: dict[str, Any] = {}

    @classmethod
    def for_model(cls, model: HookedModel) -> TunedLens:
        """An identity-initialised lens shaped for `model` (equal to the logit lens until trained)."""
        lens = cls(
            model.dims.d_model,
            model.dims.n_layers,
            model_fingerprint=model.fingerprint(),
            model_type=model.dims.model_type,
        )
        return lens.to(model.device)

    def reset_to_identity(self) -> None:
        with torch.no_grad():
            for t in self.translators:
                assert isinstance(t, nn.Linear)
                t.weight.copy_(torch.eye(self.d_model))
                t.bias.zero_()

    def forward(self, resid: Float[Tensor, "... d_model"], layer: int) -> Float[Tensor, "... d_model"]:
        """Translate the residual before `layer`; ``layer == n_layers`` (the final residual) is unchanged."""
        if resid.shape[-1] != self.d_model:
            raise ShapeError(f"residual must end in d_model={self.d_model}; got shape {tuple(resid.shape)}")
        if layer == self.n_layers:
            return resid
        if not 0 <= layer < self.n_layers:
            raise ConfigError(f"layer must be in 0..{self.n_layers}; got {layer}")
        t: Any = self.translators[layer]
        return t(resid.to(t.weight.dtype)).to(resid.dtype)  # type: ignore[no-any-return]

    def check_model(self, model: HookedModel) -> None:
        """Raise if `model`'s sizes or architecture differ from the lens's (a fingerprint mismatch is allowed:
        fine-tunes of the same architecture)."""
        if (model.dims.d_model, model.dims.n_layers) != (self.d_model, self.n_layers):
            raise ShapeError(
                f"this tuned lens is for d_model={self.d_model}, n_layers={self.n_layers}; the model has "
                f"d_model={model.dims.d_model}, n_layers={model.dims.n_layers}"
            )
        if self.model_type and self.model_type != model.dims.model_type:
            raise ModelMismatchError(
                f"this tuned lens was trained on a {self.model_type} model ({self.model_fingerprint}); the given "
                f"model is a {model.dims.model_type} ({model.fingerprint()}). Train a lens on this model"
            )

    def save(self, path: str | Path) -> Path:
        """One safetensors file: translator weights + JSON header (model info with sizes, training log)."""
        tensors = {f"translators.{i}.{k}": v for i, t in enumerate(self.translators) for k, v in t.state_dict().items()}
        model = ModelInfo(self.model_fingerprint, self.model_type, d_model=self.d_model, n_layers=self.n_layers)
        body = {"training_log": self.training_log}
        return write_envelope(path, Envelope("tuned_lens", body, tensors, model), TUNED_LENS_SCHEMA)

    @classmethod
    def load(cls, path: str | Path) -> TunedLens:
        envelope = read_envelope(path, TUNED_LENS_SCHEMA)
        info, tensors = envelope.model, envelope.tensors
        if info is None or info.d_model <= 0 or info.n_layers <= 0:
            raise ConfigError(f"{path}: malformed tuned-lens metadata (no model sizes recorded)")
        d_model, n_layers, log = info.d_model, info.n_layers, envelope.body.get("training_log", {})
        lens = cls(
            d_model,
            n_layers,
            model_fingerprint=info.fingerprint,
            model_type=info.model_type,
        )
        state = {k.removeprefix("translators."): v for k, v in tensors.items()}
        try:
            lens.translators.load_state_dict(state)
        except RuntimeError as exc:
            raise ConfigError(
                f"{path}: translator weights do not match d_model={d_model}, n_layers={n_layers}: {exc}"
            ) from exc
        lens.training_log = log
        return lens


def token_windows(
    model: HookedModel, texts: Iterable[str], *, seq_len: int, max_windows: int | None = None
) -> Int[Tensor, "n seq_len"]:
    """`texts` packed into windows of `seq_len` tokens (:func:`~mechscope.model.tokens.packed_rows`: joined by
    EOS, each window starting with the tokenizer's BOS where it adds one to text)."""
    tokenizer = model._tokenizer()
    first: list[str] = []  # the texts read before the first window: fewer than seq_len when there is none

    def tap(items: Iterable[str]) -> Iterator[str]:
        for text in items:
            if len(first) <= seq_len:
                first.append(text)
            yield text

    rows = packed_rows(tokenizer, tap(texts), seq_len)
    windows = [row for _, row in zip(range(max_windows) if max_windows is not None else itertools.count(), rows)]
    if not windows:
        got = sum(len(ids) + 1 for ids in tokenizer(first, add_special_tokens=False)["input_ids"]) if first else 0
        raise ConfigError(f"the text stream has {got} tokens; need at least seq_len={seq_len} with the start token")
    return torch.tensor(windows, dtype=torch.long)


def zoo_texts(seed: int = 0, *, split: str = "train") -> list[str]:
    """Natural-ish text from the zoo's task generators (facts, truth, IOI, sentiment...), shuffled.

    ``split="train"`` gives training documents, ``"eval"`` the held-out splits' prompts + completions,
    so a lens trained on one can be evaluated on the other (the shared :func:`mechscope.data.corpus.zoo_texts`,
    in the tuned lens's own order).
    """
    from mechscope.data.corpus import zoo_texts as organism_texts

    return organism_texts(split, seed, shuffle_key=f"mechscope-tuned-lens:{seed}:{split}")  # type: ignore[arg-type]


def _as_windows(model: HookedModel, data: Iterable[str] | Tensor, cfg: TunedLensConfig) -> Tensor:
    if isinstance(data, Tensor):
        if data.ndim != 2 or data.dtype not in (torch.long, torch.int32, torch.int64):
            raise ShapeError(
                f"token windows must be an integer tensor [n, seq_len]; got {data.dtype} {tuple(data.shape)}"
            )
        return data[: cfg.max_windows].long()
    if isinstance(data, str):
        data = [data]
    return token_windows(model, data, seq_len=cfg.seq_len, max_windows=cfg.max_windows)


def train_tuned_lens(
    model: HookedModel,
    data: Iterable[str] | Tensor,
    *,
    config: TunedLensConfig | None = None,
    lens: TunedLens | None = None,
    progress: bool = False,
) -> TunedLens:
    """Train per-layer translators on `data` (texts, or token windows ``[n, seq_len]``), model frozen.

    Residuals and final next-token distributions of the training windows are computed once and cached;
    each step samples ``batch_tokens`` text positions and minimises the sum over layers of
    ``KL(final || tuned lens)``. Only the translators receive gradients. Then, on the held-out windows
    (``validation_fraction``), each layer keeps its trained translator only where it reads better than
    before training; the log records both held-out KLs and the layers that kept their old translator.
    """
    cfg = config or TunedLensConfig()
    windows = _as_windows(model, data, cfg)
    lens = lens or TunedLens.for_model(model)
    lens.check_model(model)
    n_held = _held_out_windows(len(windows), cfg.validation_fraction)
    train, held = windows[: len(windows) - n_held], windows[len(windows) - n_held :]
    before = copy.deepcopy(lens.translators.state_dict())
    losses, n_tokens = _fit(model, lens, train, cfg, progress)
    lens.training_log = {
        "config": asdict(cfg),
        "n_tokens": n_tokens,
        "loss_first": losses[0],
        "loss_last": sum(losses[-10:]) / len(losses[-10:]),
    }
    if n_held:
        lens.training_log["validation"] = _keep_improved_layers(model, lens, before, held)
    return lens


def _held_out_windows(n_windows: int, fraction: float) -> int:
    """How many of `n_windows` are held out: none for fraction 0 or a single window, else at least one."""
    if fraction == 0 or n_windows < 2:
        return 0
    return min(n_windows - 1, max(1, int(n_windows * fraction)))


#: Windows run per forward while caching training residuals (bounds the transient logits of the forward).
_WINDOWS_PER_FORWARD = 8


def _fit(
    model: HookedModel, lens: TunedLens, windows: Tensor, cfg: TunedLensConfig, progress: bool
) -> tuple[list[float], int]:
    """Adam on the sum over layers of ``KL(final || lens)`` at sampled text positions of `windows`; the
    per-step mean loss per layer and the number of text positions sampled from.

    Only residuals are cached (``[layer + 1, tokens, d_model]``); each step reads the model's own next-token
    distribution at its sampled positions from the final residual (the logit lens's last row, which is the
    model's logits), so memory does not grow with tokens x vocabulary (Gemma-3-270M: 3.8 GB of fp32
    distributions for 56 windows of 64 tokens, none now)."""
    sites = lens_sites(model)
    n_layers = model.dims.n_layers
    resid: Tensor | None = None  # [layer + 1, tokens, d_model], filled a few windows at a time
    for start in range(0, len(windows), _WINDOWS_PER_FORWARD):  # bounded logits per forward
        chunk = windows[start : start + _WINDOWS_PER_FORWARD]
        logits, cache = model.run_with_cache(chunk, sites)
        if resid is None:  # one buffer, so no per-chunk block splits the heap hole the next logits reuse
            first = cache[sites[0]]
            resid = first.new_empty((len(sites), windows.numel(), first.shape[-1]))
        rows = slice(start * windows.shape[1], (start + len(chunk)) * windows.shape[1])
        for i, site in enumerate(sites):
            resid[i, rows] = cache[site].flatten(0, 1)
        del logits, cache  # before the next chunk's forward: one chunk's logits alive at a time
    assert resid is not None
    # positions of the text's tokens: a BOS the tokenizer adds (Gemma's residual there is 14x a token's) is not
    # what a lens reads, and would pull the translators towards it
    pool = text_mask(model.tokenizer, windows, torch.ones_like(windows)).flatten().nonzero().squeeze(1)
    n_tokens = len(pool)
    params = list(lens.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps: Any = range(cfg.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="tuned lens", unit="step")
    losses: list[float] = []
    with torch.enable_grad():
        for _ in steps:
            idx = pool[torch.randint(0, n_tokens, (min(cfg.batch_tokens, n_tokens),), generator=gen)].to(resid.device)
            with torch.no_grad():  # the model's own distribution at these positions: the target
                ref = resid_to_logits(model, resid[n_layers, idx]).float().log_softmax(-1)
            loss = torch.zeros((), device=resid.device)
            for layer in range(n_layers):
                pred = resid_to_logits(model, lens(resid[layer, idx], layer)).float().log_softmax(-1)
                loss = loss + (ref.exp() * (ref - pred)).sum(-1).mean()
            grads = torch.autograd.grad(loss, params)
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            losses.append(float(loss.detach()) / n_layers)
    return losses, int(n_tokens)


def _keep_improved_layers(
    model: HookedModel, lens: TunedLens, before: dict[str, Tensor], held: Tensor
) -> dict[str, Any]:
    """Per layer, restore the translator of `before` where it reads the `held` windows better than the trained
    one; the held-out KLs of both and the restored layers."""
    old = copy.deepcopy(lens)
    old.translators.load_state_dict(before)
    sums, n_tokens, _ = _kl_sums(model, model.prepare_inputs(held), {"before": old, "trained": lens})
    kl_before, kl_trained = (sums[k][:-1] / max(1, n_tokens) for k in ("before", "trained"))
    restored = [layer for layer in range(lens.n_layers) if kl_trained[layer] > kl_before[layer]]
    with torch.no_grad():
        for layer in restored:
            lens.translators[layer].load_state_dict(old.translators[layer].state_dict())
    return {
        "windows": len(held),
        "n_tokens": n_tokens,
        "kl_before": [round(float(v), 6) for v in kl_before],
        "kl_trained": [round(float(v), 6) for v in kl_trained],
        "kept_before": restored,
    }


def tuned_lens(
    model: HookedModel,
    inputs: Inputs,
    lens: TunedLens,
    *,
    positions: Sequence[int] | None = None,
    k: int = 5,
    keep_logits: bool = False,
) -> TunedLensResult:
    """The logit-lens readout with each residual translated by `lens` first."""
    lens.check_model(model)
    result = lens_readout(
        model,
        inputs,
        transform=lambda resid, layer: lens(resid, layer),
        positions=positions,
        k=k,
        keep_logits=keep_logits,
        result_type=TunedLensResult,
        extra_config={"lens_model_fingerprint": lens.model_fingerprint},
    )
    assert isinstance(result, TunedLensResult)
    return result


def _kl_sums(
    model: HookedModel,
    batch: dict[str, Tensor],
    readers: dict[str, Transform | None],
    *,
    max_logits: int = 2**23,
    progress: bool = False,
) -> tuple[dict[str, Tensor], int, int]:
    """Sums over the text tokens of `batch` of ``KL(final || reader)`` per layer ``[n_layers + 1]`` for each
    named reader (None: the logit lens), the number of those tokens and the rows run per chunk. A few rows
    run at a time and each layer's logits are reduced before the next layer's are made (see compare_lenses)."""
    n_rows, n_pos = batch["input_ids"].shape
    rows_per_chunk = max(1, max_logits // max(1, n_pos * model.dims.d_vocab))
    sites = lens_sites(model)
    sums = {key: torch.zeros(len(sites), dtype=torch.float64) for key in readers}
    chunks: Any = range(0, n_rows, rows_per_chunk)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="lens comparison", unit="chunk")
    with torch.no_grad():
        for start in chunks:
            part = {k: v[start : start + rows_per_chunk] for k, v in batch.items()}
            mask = text_mask(model.tokenizer, part["input_ids"], part["attention_mask"])  # the text's tokens
            final, cache = model.run_with_cache(part, sites)  # the model's own logits: the reference
            assert final is not None
            for layer, site in enumerate(sites):
                resid = cache[site]
                for key, reader in readers.items():
                    readout = resid if reader is None else reader(resid, layer)
                    kl = kl_div(resid_to_logits(model, readout), final, attention_mask=mask)
                    sums[key][layer] += float(kl.double().sum())
            del cache, final
    n_tokens = int(text_mask(model.tokenizer, batch["input_ids"], batch["attention_mask"]).sum())
    return sums, n_tokens, rows_per_chunk


def compare_lenses(
    model: HookedModel,
    inputs: Inputs,
    lens: TunedLens,
    *,
    max_logits: int = 2**23,
    progress: bool = False,
) -> LensComparison:
    """Mean ``KL(final || lens)`` per layer for the logit lens and the tuned lens on `inputs`.

    Padding positions (attention mask 0) and the BOS the tokenizer adds are excluded from the means (Gemma's
    BOS residual is 14x a text token's; no lens reading is wanted there). Streams in bounded memory: rows
    run a few at a time and each layer's logits are reduced to KL sums before the next layer's are
    made, so at most about `max_logits` logit entries (rows x positions x vocabulary, float32) are alive
    at once whatever the number of rows, layers or the vocabulary size (a whole-batch readout of a
    30-layer, 49k-vocabulary model over 16 windows of 64 tokens holds 6 GB of logits per lens).
    """
    if max_logits < 1:
        raise ConfigError(f"max_logits must be >= 1; got {max_logits}")
    lens.check_model(model)
    n = model.dims.n_layers
    batch = model.prepare_inputs(inputs)
    sums, n_tokens, rows_per_chunk = _kl_sums(
        model, batch, {"logit": None, "tuned": lens}, max_logits=max_logits, progress=progress
    )
    labels = {"layer": [f"resid_pre {i}" for i in range(n)] + ["final"]}
    config = {
        "n_tokens": n_tokens,
        "model_type": model.dims.model_type,
        "dtype": str(model.dtype).removeprefix("torch."),
        "lens_training": lens.training_log,
        "rows_per_chunk": rows_per_chunk,
    }
    return LensComparison(
        tensors={
            "logit_lens_kl": (sums["logit"] / max(1, n_tokens)).float(),
            "tuned_lens_kl": (sums["tuned"] / max(1, n_tokens)).float(),
        },
        axes={"logit_lens_kl": ("layer",), "tuned_lens_kl": ("layer",)},
        labels=labels,
        config=json.loads(json.dumps(config, default=str)),
    )


__all__ = [
    "LensComparison",
    "TunedLens",
    "TunedLensConfig",
    "TunedLensResult",
    "compare_lenses",
    "token_windows",
    "train_tuned_lens",
    "tuned_lens",
    "zoo_texts",
]
