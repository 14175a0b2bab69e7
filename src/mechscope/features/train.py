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


def train_sae(
    activations: Float[Tensor, "tokens d_in"],
    config: SAEConfig,
    train: SAETrainConfig | None = None,
) -> tuple[SparseAutoencoder, list[dict[str, Any]]]:
    """Train an SAE of `config` on `activations`; returns it and a log (loss, mse, l0 per logged step)."""
    cfg = train or SAETrainConfig()
    if activations.ndim != 2 or activations.shape[1] != config.d_in:
        raise ShapeError(f"expected activations of shape [tokens, d_in={config.d_in}], got {tuple(activations.shape)}")
    data = activations.float()
    if not torch.isfinite(data).all():
        raise ConfigError("activations contain NaN or inf")
    scale = float((config.d_in / data.pow(2).sum(-1).mean()).sqrt())
    data = data * scale
    sae = SparseAutoencoder(config, seed=cfg.seed)
    with torch.no_grad():
        sae.b_dec.copy_(data.mean(0))
    optimiser = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(cfg.seed)
    fired = torch.zeros(config.d_sae, dtype=torch.bool)
    log: list[dict[str, Any]] = []
    for step in range(cfg.steps):
        for group in optimiser.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
        batch = data[torch.randint(0, data.shape[0], (cfg.batch_size,), generator=gen)]
        recon, f = sae(batch)
        mse = (recon - batch).pow(2).sum(-1).mean()
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
        # Undo the input scaling x_s = s x. relu and top-k are positively homogeneous, so dividing both
        # biases by s gives features f / s on raw inputs, decoded by the same unit rows into x_hat_s / s.
        sae.b_dec.div_(scale)
        sae.b_enc.div_(scale)
    return sae, log


__all__ = ["SAETrainConfig", "train_sae"]
