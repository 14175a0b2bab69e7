"""JumpReLU (Rajamanoharan et al. 2024): ``f = pre * H(pre - threshold)`` with a learned per-feature
threshold, trained with an L0 penalty. The step function has no useful gradient, so the threshold
learns through straight-through estimators with a rectangle kernel of width ``bandwidth``:

    d/d theta [z H(z - theta)] ~= -(theta / eps) K((z - theta) / eps),   d/d theta H(z - theta) ~= -(1/eps) K(...)

which are kernel-density estimates of the derivatives of the expected loss (tested against finite
differences). The input ``z`` gets the ordinary gradient ``H(z - theta)`` of the first, none from the L0 term."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from mechscope.features.architectures.base import Architecture, SparseCode, extra_tensor, register_architecture

if TYPE_CHECKING:
    from mechscope.features.sae import SAEConfig, SparseAutoencoder

INITIAL_THRESHOLD = 1e-3


def _kernel(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    return ((z - threshold).abs() < bandwidth / 2).to(z.dtype) / bandwidth


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        z, threshold = ctx.saved_tensors
        d_z = grad * (z > threshold)
        d_t = -(threshold * _kernel(z, threshold, ctx.bandwidth) * grad)
        return d_z, d_t.reshape(-1, threshold.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        z, threshold = ctx.saved_tensors
        d_t = -(_kernel(z, threshold, ctx.bandwidth) * grad)
        return torch.zeros_like(z), d_t.reshape(-1, threshold.shape[-1]).sum(0), None


def jumprelu(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """``z * H(z - threshold)`` with the straight-through threshold gradient."""
    return _JumpReLU.apply(z, threshold, bandwidth)  # type: ignore[no-any-return]


def step(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """``H(z - threshold)`` with the straight-through threshold gradient (the L0 penalty's)."""
    return _Step.apply(z, threshold, bandwidth)  # type: ignore[no-any-return]


@register_architecture
class JumpReLU(Architecture):
    name = "jumprelu"
    saelens = "jumprelu"
    extra: ClassVar[dict[str, bool]] = {"threshold": True}

    def init_extra(self, config: SAEConfig) -> dict[str, Tensor]:
        return {"threshold": torch.full((config.d_sae,), INITIAL_THRESHOLD)}

    def encode(self, sae: SparseAutoencoder, pre: Tensor) -> Tensor:
        return pre * (pre > extra_tensor(sae, "threshold"))

    def train_encode(self, sae: SparseAutoencoder, pre: Tensor, train: Any) -> Tensor | SparseCode:
        return jumprelu(pre, extra_tensor(sae, "threshold"), train.bandwidth)

    def penalty(self, sae: SparseAutoencoder, pre: Tensor, f: Tensor | SparseCode, train: Any) -> Tensor | None:
        return train.l0_coefficient * step(pre, extra_tensor(sae, "threshold"), train.bandwidth).sum(-1).mean()

    @torch.no_grad()
    def after_step(self, sae: SparseAutoencoder, pre: Tensor, f: Tensor | SparseCode, train: Any) -> None:
        extra_tensor(sae, "threshold").data.clamp_(min=1e-6)
