"""Training an SAE (any registered architecture, transcoders included) from a tensor, an activation
store or any iterator of batches, in bounded memory, with checkpoints that resume after a kill.

Loss: squared reconstruction error summed over the output dimensions (mean over tokens), plus the
architecture's sparsity penalty (L1 weighted by decoder norms for ``relu``, L0 through the
straight-through threshold for ``jumprelu``; none for the top-k family), plus an auxiliary dead-feature
loss (AuxK, Gao et al. 2024): the ``k_aux`` largest pre-activations among features that have not fired
for ``dead_steps`` steps are asked to reconstruct the main reconstruction's error, so dead features get
gradient again. Decoder rows are kept at unit norm after every step. The learning rate warms up linearly
for ``warmup`` steps and decays linearly to zero over the last ``decay_fraction`` of the steps.

Inputs are scaled once by a constant so that their mean squared norm is ``d_in`` (hyper-parameters then
transfer across sites and models; streamed data: estimated on the first ``scale_batches`` batches); the
scale is folded back at the end, so the returned SAE works on raw activations. ``b_dec`` starts at the
data mean. Deterministic given the seed: a run killed at any point and restarted with the same
``checkpoint`` path ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import ConfigError, ShapeError
from mechscope.features.architectures import SparseCode
from mechscope.features.architectures.sparse_grad import select_rows
from mechscope.features.distributed_train import DataParallel, Local
from mechscope.features.sae import SAEConfig, SparseAutoencoder
from mechscope.io import Envelope, FileSchema, read_envelope, register_schema, write_envelope
from mechscope.model import distributed as dist

CHECKPOINT_SCHEMA = register_schema(FileSchema("sae_checkpoint", 1, "SAE training checkpoint"))

#: A batch: inputs ``[tokens, d_in]``, or (inputs, targets ``[tokens, d_out]``) for a transcoder.
Batch = Tensor | tuple[Tensor, Tensor]


@dataclass(frozen=True, kw_only=True)
class SAETrainConfig:
    """Optimisation settings of :func:`train_sae`.

    Attributes:
        steps: optimiser steps.
        batch_size: tokens per step.
        lr: Adam learning rate (peak of the schedule).
        l1_coefficient: ``relu`` only (on inputs normalised to mean squared norm ``d_in``).
        l0_coefficient, bandwidth: ``jumprelu`` only: the L0 penalty and the straight-through kernel width.
        aux_coefficient: weight of the AuxK dead-feature loss (0: off).
        dead_steps: steps without firing after which a feature counts as dead.
        seed: seed of the initialisation and of the batch order.
        log_every: steps between logged entries.
        warmup, decay_fraction: learning-rate schedule (linear warm-up; linear decay over the last fraction).
        scale_batches: batches a stream's input scale and mean are estimated on.
        checkpoint_every: steps between checkpoints (when :func:`train_sae` gets a checkpoint path).
    """

    steps: int = 2000
    batch_size: int = 512
    lr: float = 1e-3
    l1_coefficient: float = 5.0
    l0_coefficient: float = 0.05
    bandwidth: float = 0.05
    aux_coefficient: float = 1 / 32
    dead_steps: int = 200
    warmup: int = 50
    decay_fraction: float = 0.2
    seed: int = 0
    log_every: int = 100
    scale_batches: int = 8
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not 0 < self.lr < float("inf"):
            raise ConfigError(f"expected steps, batch_size >= 1 and a finite lr > 0; got {self}")
        penalties = (self.l1_coefficient, self.l0_coefficient, self.aux_coefficient)
        if not all(0 <= c < float("inf") for c in penalties) or not 0 < self.bandwidth < float("inf"):
            raise ConfigError(f"expected finite non-negative penalty coefficients and bandwidth > 0; got {self}")
        if not 0 <= self.decay_fraction <= 1 or self.warmup < 0 or self.dead_steps < 1:
            raise ConfigError(f"expected 0 <= decay_fraction <= 1, warmup >= 0, dead_steps >= 1; got {self}")
        if self.scale_batches < 1 or self.log_every < 1 or self.checkpoint_every < 1:
            raise ConfigError(f"expected scale_batches, log_every, checkpoint_every >= 1; got {self}")

    def lr_at(self, step: int) -> float:
        """The learning rate of step `step` (0-based)."""
        warm = min(1.0, (step + 1) / max(1, self.warmup))
        decay_steps = self.steps * self.decay_fraction
        start = self.steps - decay_steps
        decay = 1.0 if step < start or decay_steps == 0 else max(0.0, (self.steps - step) / decay_steps)
        return self.lr * warm * decay


# Data ---------------------------------------------------------------------------------------------------------
def _check_batch(batch: Any, config: SAEConfig, where: str) -> tuple[Tensor, Tensor | None]:
    x, y = (batch if isinstance(batch, tuple) else (batch, None)) if not isinstance(batch, list) else tuple(batch)
    if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != config.d_in:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ShapeError(f"expected {where} of shape [tokens, d_in={config.d_in}], got {shape}")
    if x.shape[0] == 0:
        raise ConfigError(f"expected {where} of at least one token; got shape {tuple(x.shape)}")
    if config.transcoder != (y is not None):
        raise ConfigError(
            "a transcoder trains on (inputs, targets) batches and an SAE on inputs alone; "
            f"got transcoder={config.transcoder} with targets {'given' if y is not None else 'missing'}"
        )
    if y is not None and (y.ndim != 2 or y.shape != (x.shape[0], config.width_out)):
        raise ShapeError(f"expected targets of shape [{x.shape[0]}, {config.width_out}], got {tuple(y.shape)}")
    x = x.float()
    if not torch.isfinite(x).all() or (y is not None and not torch.isfinite(y).all()):
        raise ConfigError(f"{where} contain NaN or inf")
    return x, None if y is None else y.float()


def _as_batch(x: Tensor, y: Tensor | None) -> Batch:
    return x if y is None else (x, y)


def _tensor_batches(
    x: Tensor, y: Tensor | None, batch_size: int, gen: torch.Generator, part: slice = slice(None)
) -> Iterator[Batch]:
    """Random rows with replacement, forever (the generator's state is checkpointed); `part`: the rows of
    each batch this rank trains on."""
    while True:
        rows = torch.randint(0, x.shape[0], (batch_size,), generator=gen)[part]
        yield x[rows] if y is None else (x[rows], y[rows])


def _mean_square_scale(total_sq: float, count: int, width: int) -> float:
    return float((width / max(total_sq / max(count, 1), 1e-12)) ** 0.5)


# Checkpoints ------------------------------------------------------------------------------------------------
@dataclass
class _State:
    step: int
    scale_in: float
    scale_out: float
    last_fired: Tensor  # [d_sae] int64: step each feature last fired (-1: never)
    log: list[dict[str, Any]]


def _save_checkpoint(
    path: Path,
    sae: SparseAutoencoder,
    opt: torch.optim.Optimizer,
    gen: torch.Generator | None,
    state: _State,
    fingerprint: dict[str, Any],
) -> None:
    tensors = {f"sae.{k}": v.detach().cpu() for k, v in sae.state_dict().items()}
    opt_state = opt.state_dict()
    for index, slots in opt_state["state"].items():
        for name, value in slots.items():
            tensors[f"adam.{index}.{name}"] = value.cpu() if isinstance(value, Tensor) else torch.tensor(value)
    tensors["last_fired"] = state.last_fired.cpu()
    if gen is not None:
        tensors["generator"] = gen.get_state()
    body = {
        "step": state.step,
        "scale_in": state.scale_in,
        "scale_out": state.scale_out,
        "log": state.log,
        "param_groups": opt_state["param_groups"],
        "settings": fingerprint,
    }
    write_envelope(path, Envelope("sae_checkpoint", body, tensors), CHECKPOINT_SCHEMA)


def _load_checkpoint(
    path: Path,
    sae: SparseAutoencoder,
    opt: torch.optim.Optimizer,
    gen: torch.Generator | None,
    fingerprint: dict[str, Any],
    device: torch.device,
) -> _State:
    envelope = read_envelope(path, CHECKPOINT_SCHEMA)
    body, tensors = envelope.body, envelope.tensors
    if body.get("settings") != fingerprint:
        raise ConfigError(
            f"{path}: checkpoint of another training run (settings {body.get('settings')}); expected {fingerprint}. "
            "Delete it or pass another checkpoint path"
        )
    sae.load_state_dict({k.removeprefix("sae."): v for k, v in tensors.items() if k.startswith("sae.")})
    slots: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("adam."):
            _, index, name = key.split(".", 2)
            slots.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": slots, "param_groups": body["param_groups"]})
    if gen is not None:
        gen.set_state(tensors["generator"])
    return _State(
        int(body["step"]),
        float(body["scale_in"]),
        float(body["scale_out"]),
        tensors["last_fired"].to(device),
        body["log"],
    )


# Training ---------------------------------------------------------------------------------------------------
def train_sae(
    data: Float[Tensor, "tokens d_in"] | Iterable[Batch] | Any,
    config: SAEConfig,
    train: SAETrainConfig | None = None,
    targets: Float[Tensor, "tokens d_out"] | None = None,
    *,
    checkpoint: str | Path | None = None,
    progress: bool = False,
    distributed: bool | None = None,
    device: str | torch.device | None = None,
) -> tuple[SparseAutoencoder, list[dict[str, Any]]]:
    """Train an SAE of `config` on `data`; returns it and a log (loss, mse, l0, dead fraction, lr).

    `data` is a ``[tokens, d_in]`` tensor (a transcoder also takes `targets`, its out-site's activations
    at the same tokens), an :class:`~mechscope.features.store.ActivationStore` (read shuffled at the SAE's
    site(s)), or any iterable of batches (tensors, or (inputs, targets) pairs for a transcoder; it must
    yield the same batches again for a resumed run). With `checkpoint`, the run saves its full state there
    every ``checkpoint_every`` steps and, when the file exists, resumes from it.

    `distributed`: train data-parallel over the ranks of the process group (DistributedDataParallel; each
    rank reads its share, see :mod:`mechscope.features.distributed_train`); None (default): when a group of
    several ranks is initialised. Every rank returns the same SAE; rank 0 writes the checkpoint.

    `device`: where the SAE trains and is returned (batches are moved there as they are read); default:
    the device of a tensor `data`, else the CPU. The initialisation is drawn on the CPU, so a seed gives
    the same starting SAE on every device.
    """
    cfg = train or SAETrainConfig()
    if config.transcoder and config.centre_input:
        raise ConfigError("training a transcoder that subtracts b_dec from its input is not supported")
    sync = _sync(distributed, cfg)
    target = _training_device(data, device)
    batches, gen = _batch_stream(data, config, cfg, targets, sync)
    batches = (_moved(batch, target) for batch in batches)
    sae = SparseAutoencoder(config, seed=cfg.seed).to(target)
    optimiser = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    fingerprint = {"config": asdict(config), "train": asdict(cfg)}
    path = None if checkpoint is None else Path(checkpoint)
    if path is not None and path.is_file():
        state = _load_checkpoint(path, sae, optimiser, gen, fingerprint, target)
        if gen is None:  # an iterable: skip what the interrupted run consumed
            batches = itertools.islice(batches, state.step, None)
    else:
        state, batches = _initialise(sae, batches, config, cfg, sync)
    with torch.enable_grad():  # callers may be inside torch.no_grad() (the demo, evaluation loops)
        _run(sae, optimiser, batches, state, cfg, path, gen, fingerprint, progress, sync)
    _fold_scales(sae, state.scale_in, state.scale_out)
    return sae, state.log


def _training_device(data: Any, device: str | torch.device | None) -> torch.device:
    if device is not None:
        try:
            return torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"device must name a torch device such as 'cpu' or 'cuda:0'; got {device!r}") from exc
    return data.device if isinstance(data, Tensor) else torch.device("cpu")


def _moved(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, tuple):
        return batch[0].to(device), batch[1].to(device)
    return batch.to(device)


def _batch_stream(
    data: Any, config: SAEConfig, cfg: SAETrainConfig, targets: Tensor | None, sync: Local
) -> tuple[Iterator[Batch], torch.Generator | None]:
    """Validated batches (raw scale; this rank's part of each global batch) and, for tensor data, the
    generator whose state is checkpointed."""
    if isinstance(data, Tensor):
        x, y = _check_batch(data if targets is None else (data, targets), config, "activations")
        gen = torch.Generator().manual_seed(cfg.seed)
        return _tensor_batches(x, y, cfg.batch_size, gen, sync.part(cfg.batch_size)), gen
    if targets is not None:
        raise ConfigError("targets go with a tensor of activations; a store or stream carries its own")
    from mechscope.features.store import ActivationStore

    if isinstance(data, ActivationStore):
        sites = (config.site, config.out_site) if config.transcoder else (config.site,)
        data = sync.share(data).batches(cfg.batch_size // sync.world, sites=sites, seed=cfg.seed, epochs=None)
    if not isinstance(data, Iterable):
        raise ConfigError(f"expected a tensor, an ActivationStore or an iterable of batches, got {type(data).__name__}")
    return (_as_batch(*_check_batch(b, config, "batches")) for b in data), None


def _initialise(
    sae: SparseAutoencoder, batches: Iterator[Batch], config: SAEConfig, cfg: SAETrainConfig, sync: Local
) -> tuple[_State, Iterator[Batch]]:
    """Input scales and ``b_dec`` from the first batches (every rank's; put back in front of the stream)."""
    head = list(itertools.islice(batches, cfg.scale_batches))
    if not head:
        raise ConfigError("expected at least one batch of activations, got an empty stream")
    xs = sync.rows(torch.cat([b[0] if isinstance(b, tuple) else b for b in head]))
    ys = sync.rows(torch.cat([b[1] for b in head])) if isinstance(head[0], tuple) else xs  # type: ignore[misc]
    scale_in = _mean_square_scale(float(xs.pow(2).sum()), xs.shape[0], config.d_in)
    scale_out = (
        _mean_square_scale(float(ys.pow(2).sum()), ys.shape[0], config.width_out) if config.transcoder else scale_in
    )
    with torch.no_grad():
        sae.b_dec.copy_(ys.mean(0) * scale_out)
        if config.transcoder:
            # Tie the encoder to the decoder through the least-squares map M from inputs to targets:
            # feature i starts by detecting the input that M sends along its decoder row.
            xc, yc = xs - xs.mean(0), ys - ys.mean(0)
            linear = torch.linalg.lstsq(xc * scale_in, yc * scale_out).solution  # [d_in, d_out]
            w_enc = linear @ sae.W_dec.T
            sae.W_enc.copy_(w_enc / w_enc.norm(dim=0, keepdim=True).clamp(min=1e-8))
    never = torch.full((config.d_sae,), -1, dtype=torch.long, device=sae.b_enc.device)
    state = _State(0, scale_in, scale_out, never, [])
    return state, itertools.chain(head, batches)


def _run(
    sae: SparseAutoencoder,
    opt: torch.optim.Optimizer,
    batches: Iterator[Batch],
    state: _State,
    cfg: SAETrainConfig,
    path: Path | None,
    gen: torch.Generator | None,
    fingerprint: dict[str, Any],
    progress: bool,
    sync: Local,
) -> None:
    from tqdm.auto import tqdm

    arch = sae.architecture
    loss_of = _StepLoss(sae, cfg, sync)
    step = sync.wrap(loss_of)  # DistributedDataParallel across ranks: its forward arms the gradient all-reduce
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not progress or not sync.writes, desc="train SAE")
    while state.step < cfg.steps:
        batch = next(batches, None)
        if batch is None:
            raise ConfigError(f"the batch stream ended after {state.step} of {cfg.steps} steps")
        x, y = batch if isinstance(batch, tuple) else (batch, batch)
        x = x * state.scale_in
        y = x if y is batch else y * state.scale_out
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(state.step)
        loss = step(x, y, state)
        assert loss_of.parts is not None
        mse, code, pre, dead = loss_of.parts
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sae.normalise_decoder()
        arch.after_step(sae, pre.detach(), code.values.detach() if isinstance(code, SparseCode) else code.detach(), cfg)
        sync.after_step(sae)
        state.step += 1
        bar.update(1)
        if state.step % cfg.log_every == 0 or state.step == cfg.steps:
            l0 = float(
                code.values.gt(0).sum(-1).float().mean()
                if isinstance(code, SparseCode)
                else (code > 0).sum(-1).float().mean()
            )
            loss_value, mse_value, l0 = sync.mean([loss.item(), mse.item(), l0])
            state.log.append(
                {
                    "step": state.step,
                    "loss": loss_value,
                    "mse": mse_value,
                    "l0": l0,
                    "dead_fraction": float(dead.float().mean()),
                    "lr": cfg.lr_at(state.step - 1),
                }
            )
            bar.set_postfix(mse=f"{mse_value:.3g}", l0=f"{l0:.1f}")
        if path is not None and sync.writes and (state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps):
            _save_checkpoint(path, sae, opt, gen, state, fingerprint)
    bar.close()


class _StepLoss(torch.nn.Module):
    """One step's loss as a module, so that DistributedDataParallel can wrap it; the other outputs the
    step needs (mse, code, pre-activations, dead mask) are left in :attr:`parts`."""

    def __init__(self, sae: SparseAutoencoder, cfg: SAETrainConfig, sync: Local) -> None:
        super().__init__()
        self.sae = sae
        self.cfg = cfg
        self.sync = sync
        self.parts: tuple[Tensor, Tensor | SparseCode, Tensor, Tensor] | None = None

    def forward(self, x: Tensor, y: Tensor, state: _State) -> Tensor:
        sae, cfg = self.sae, self.cfg
        arch = sae.architecture
        pre = sae.pre_activations(x)
        code = arch.train_encode(sae, pre, cfg)
        recon = sae.decode_sparse(code, x) if isinstance(code, SparseCode) else sae.decode(code, x)
        mse = (recon - y).pow(2).sum(-1).mean()
        loss = mse
        penalty = arch.penalty(sae, pre, code, cfg)
        if penalty is not None:
            loss = loss + penalty
        fired = self.sync.fired(_fired(code, sae.config.d_sae))  # any rank's token fired it
        state.last_fired[fired] = state.step
        dead = (state.step - state.last_fired >= cfg.dead_steps) & (state.step >= cfg.dead_steps)
        if cfg.aux_coefficient > 0 and bool(dead.any()):
            loss = loss + cfg.aux_coefficient * _aux_loss(sae, pre, dead, (y - recon).detach())
        self.parts = (mse, code, pre, dead)
        return loss


def _sync(distributed: bool | None, cfg: SAETrainConfig) -> Local:
    if distributed is False or (distributed is None and dist.world_size() <= 1):
        return Local()
    return DataParallel(cfg.batch_size)


def _fired(code: Tensor | SparseCode, d_sae: int) -> Tensor:
    """``[d_sae]`` bool: features active on some token of the batch."""
    if isinstance(code, SparseCode):
        out = torch.zeros(d_sae, dtype=torch.bool, device=code.values.device)
        out[code.indices[code.values > 0]] = True
        return out
    return (code > 0).any(0)


def _aux_loss(sae: SparseAutoencoder, pre: Tensor, dead: Tensor, error: Tensor) -> Tensor:
    """AuxK: squared error of the top ``k_aux`` dead features' reconstruction of the main error."""
    k_aux = min(int(dead.sum()), max(1, sae.config.width_out // 2))
    indices = pre.detach().masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False).indices
    values = torch.relu(select_rows(pre, indices))  # k_aux <= dead features: all selected are dead; sparse grad
    approx = torch.nn.functional.embedding_bag(indices, sae.W_dec, per_sample_weights=values, mode="sum")
    return (approx - error).pow(2).sum(-1).mean()


@torch.no_grad()
def _fold_scales(sae: SparseAutoencoder, scale_in: float, scale_out: float) -> None:
    """Undo the scalings x_s = a x (inputs) and y_s = b y (reconstructed site; b = a for an SAE). Every
    architecture is positively homogeneous once its thresholds scale too, so features f / b, from W_enc a/b,
    biases / b and thresholds / b, decode through the same unit rows into y_hat_s / b."""
    sae.W_enc.mul_(scale_in / scale_out)
    sae.b_enc.div_(scale_out)
    sae.b_dec.div_(scale_out)
    if sae.config.skip:
        sae.W_skip.mul_(scale_in / scale_out)
    sae.architecture.rescale(sae, torch.tensor(1.0 / scale_out))


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """Step, scales and settings of a checkpoint (for inspection)."""
    body = read_envelope(path, CHECKPOINT_SCHEMA).body
    return {k: body[k] for k in ("step", "scale_in", "scale_out", "settings")} | {
        "log": json.loads(json.dumps(body["log"]))
    }


__all__ = ["CHECKPOINT_SCHEMA", "SAETrainConfig", "checkpoint_info", "train_sae"]
