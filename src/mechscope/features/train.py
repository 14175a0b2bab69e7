"""Training an SAE on collected activations: Adam, unit-norm decoder rows, dead-feature accounting.

Loss: mean squared reconstruction error summed over the input dimensions, plus for ``relu`` SAEs
``l1_coefficient`` x the sum of feature activations weighted by their decoder norms (so the penalty
cannot be dodged by shrinking the encoder and growing the decoder). Inputs are scaled once by a constant
so that their mean squared norm is ``d_in`` (hyper-parameters then transfer across sites and models);
the scale is folded back into the biases at the end, so the returned SAE works on raw activations.
``b_dec`` starts at the data mean. Deterministic given the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import ConfigError, ShapeError
from mechscope.features.sae import SAEConfig, SparseAutoencoder


@dataclass(frozen=True, kw_only=True)
class SAETrainConfig:
    """Optimisation settings of :func:`train_sae`."""

    steps: int = 2000
    batch_size: int = 512
    lr: float = 1e-3
    l1_coefficient: float = 5.0  # relu only; on inputs normalised to mean squared norm d_in
    warmup: int = 50
    seed: int = 0
    log_every: int = 100

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.l1_coefficient < 0:
            raise ConfigError(f"expected steps, batch_size >= 1, lr > 0 and l1_coefficient >= 0; got {self}")


def _scaled(name: str, x: Tensor, width: int) -> tuple[Tensor, float]:
    """`x` as fp32 scaled to mean squared norm `width`, and the scale."""
    if x.ndim != 2 or x.shape[1] != width:
        raise ShapeError(f"expected {name} of shape [tokens, {width}], got {tuple(x.shape)}")
    x = x.float()
    if not torch.isfinite(x).all():
        raise ConfigError(f"{name} contain NaN or inf")
    scale = float((width / x.pow(2).sum(-1).mean().clamp(min=1e-12)).sqrt())
    return x * scale, scale


def train_sae(
    activations: Float[Tensor, "tokens d_in"],
    config: SAEConfig,
    train: SAETrainConfig | None = None,
    targets: Float[Tensor, "tokens d_out"] | None = None,
) -> tuple[SparseAutoencoder, list[dict[str, Any]]]:
    """Train an SAE of `config` on `activations` (a transcoder: to reconstruct `targets`, the out-site's
    activations at the same tokens); returns it and a log (loss, mse, l0 per logged step)."""
    cfg = train or SAETrainConfig()
    if config.transcoder != (targets is not None):
        raise ConfigError(
            "a transcoder needs targets (its out-site's activations) and an SAE none; "
            f"got transcoder={config.transcoder} with targets {'given' if targets is not None else 'missing'}"
        )
    data, scale_in = _scaled("activations", activations, config.d_in)
    if targets is None:
        goal, scale_out = data, scale_in
    else:
        if targets.shape[0] != activations.shape[0]:
            raise ShapeError(f"expected one target per activation, got {targets.shape[0]} and {activations.shape[0]}")
        goal, scale_out = _scaled("targets", targets, config.width_out)
    sae = SparseAutoencoder(config, seed=cfg.seed)
    with torch.no_grad():
        sae.b_dec.copy_(goal.mean(0))
        if config.transcoder:
            # Tie the encoder to the decoder through the best linear map M from inputs to targets
            # (least squares on a sample): feature i starts by detecting the input that M sends along
            # its decoder row, as an SAE's tied initialisation does when M is the identity.
            sample = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(cfg.seed))[:8192]
            xc, yc = data[sample] - data[sample].mean(0), goal[sample] - goal[sample].mean(0)
            linear = torch.linalg.lstsq(xc, yc).solution  # [d_in, d_out]
            w_enc = linear @ sae.W_dec.T
            sae.W_enc.copy_(w_enc / w_enc.norm(dim=0, keepdim=True).clamp(min=1e-8))
    optimiser = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(cfg.seed)
    fired = torch.zeros(config.d_sae, dtype=torch.bool)
    log: list[dict[str, Any]] = []
    with torch.enable_grad():  # callers may be inside torch.no_grad() (the demo, evaluation loops)
        for step in range(cfg.steps):
            for group in optimiser.param_groups:
                group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
            rows = torch.randint(0, data.shape[0], (cfg.batch_size,), generator=gen)
            recon, f = sae(data[rows])
            mse = (recon - goal[rows]).pow(2).sum(-1).mean()
            loss = mse
            if config.activation == "relu":
                loss = loss + cfg.l1_coefficient * (f * sae.W_dec.norm(dim=-1)).sum(-1).mean() / config.d_in**0.5
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            sae.normalise_decoder()
            fired |= (f > 0).any(0)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                l0 = float((f > 0).float().sum(-1).mean())
                log.append(
                    {"step": step + 1, "loss": loss.item(), "mse": mse.item(), "l0": l0, "ever_fired": int(fired.sum())}
                )
    with torch.no_grad():
        # Undo the scalings x_s = a x (inputs) and y_s = b y (reconstructed site; b = a for an SAE). relu
        # and top-k are positively homogeneous, so features f / b, from W_enc a / b and biases / b, decode
        # through the same unit rows into y_hat_s / b.
        sae.W_enc.mul_(scale_in / scale_out)
        sae.b_enc.div_(scale_out)
        sae.b_dec.div_(scale_out)
    return sae, log


__all__ = ["SAETrainConfig", "train_sae"]
