"""What an SAE architecture is, and the registry of them.

An :class:`Architecture` turns pre-activations ``pre = W_enc^T x + b_enc`` into feature activations
(at inference and while training, where some need a straight-through estimator), names its training
penalty, and owns any extra per-feature state (a JumpReLU or BatchTopK threshold). The encoder, decoder,
biases, the decoder-norm constraint, transcoders and skip connections are shared by every architecture
(:class:`~mechscope.features.sae.SparseAutoencoder`); adding an architecture is one file that subclasses
:class:`Architecture` and calls :func:`register_architecture`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import ConfigError

if TYPE_CHECKING:
    from mechscope.features.sae import SAEConfig, SparseAutoencoder


@dataclass(frozen=True)
class SparseCode:
    """Feature activations as the ``k`` (value, index) pairs per token that top-k selections produce:
    decoding touches only those decoder rows (``values [tokens, k]``, ``indices [tokens, k]``). Pairs
    add up (a row padded with zero values is fine)."""

    values: Float[Tensor, "tokens k"]
    indices: Tensor  # [tokens, k] int64

    def dense(self, d_sae: int) -> Float[Tensor, "tokens d_sae"]:
        out = torch.zeros(*self.values.shape[:-1], d_sae, dtype=self.values.dtype, device=self.values.device)
        return out.scatter_add(-1, self.indices, self.values)


class Architecture:
    """One sparsity mechanism (subclass per architecture; instances are stateless)."""

    #: Registry name (``SAEConfig.activation``).
    name: ClassVar[str] = ""
    #: SAELens's ``architecture`` field for this mechanism (how it saves to SAELens's format).
    saelens: ClassVar[str] = ""
    #: Whether the config's ``k`` is used.
    uses_k: ClassVar[bool] = False
    #: Extra per-feature tensors this architecture keeps (name -> trainable).
    extra: ClassVar[dict[str, bool]] = {}

    def validate(self, config: SAEConfig) -> None:
        """Raise :class:`ConfigError` when `config` does not fit this architecture."""
        if self.uses_k and (config.k is None or not 1 <= config.k <= config.d_sae):
            raise ConfigError(f"activation {self.name!r} needs 1 <= k <= d_sae={config.d_sae}, got k={config.k}")
        if not self.uses_k and config.k is not None:
            raise ConfigError(f"k is only used by top-k activations, got k={config.k} with {self.name!r}")

    def init_extra(self, config: SAEConfig) -> dict[str, Tensor]:
        """Initial values of the :attr:`extra` tensors."""
        return {}

    def encode(self, sae: SparseAutoencoder, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        """Feature activations at inference."""
        raise NotImplementedError

    def train_encode(
        self, sae: SparseAutoencoder, pre: Float[Tensor, "tokens d_sae"], train: Any
    ) -> Tensor | SparseCode:
        """Feature activations while training (default: as at inference), dense or as a :class:`SparseCode`."""
        return self.encode(sae, pre)

    def penalty(self, sae: SparseAutoencoder, pre: Tensor, f: Tensor | SparseCode, train: Any) -> Tensor | None:
        """The sparsity term added to the reconstruction loss (None: sparsity is structural)."""
        return None

    def after_step(self, sae: SparseAutoencoder, pre: Tensor, f: Tensor | SparseCode, train: Any) -> None:
        """Update non-gradient state after an optimiser step (BatchTopK's threshold estimate)."""

    def rescale(self, sae: SparseAutoencoder, factor: Tensor) -> None:
        """Feature activations were multiplied by `factor` (per feature or scalar): scale thresholds alike."""
        for name in self.extra:
            extra_tensor(sae, name).data.mul_(factor)


def extra_tensor(sae: SparseAutoencoder, name: str) -> Tensor:
    """The architecture's extra tensor `name` of `sae` (a parameter or buffer)."""
    value = getattr(sae, name)
    if not isinstance(value, Tensor):
        raise ConfigError(f"the SAE has no tensor {name!r}")
    return value


#: name -> architecture; :func:`register_architecture` refuses a second one with a taken name.
_ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(arch: type[Architecture]) -> type[Architecture]:
    """Register an architecture class (usable as a decorator); refuses duplicate names."""
    if not arch.name:
        raise ConfigError(f"architecture {arch.__name__} has no name")
    existing = _ARCHITECTURES.get(arch.name)
    if existing is not None:
        raise ConfigError(f"an SAE architecture named {arch.name!r} is already registered ({type(existing).__name__})")
    _ARCHITECTURES[arch.name] = arch()
    return arch


def get_architecture(name: str) -> Architecture:
    """The registered architecture `name`, or a :class:`ConfigError` listing the registered ones."""
    try:
        return _ARCHITECTURES[name]
    except KeyError:
        raise ConfigError(f"expected activation one of {sorted(_ARCHITECTURES)}, got {name!r}") from None


def architectures() -> list[str]:
    """Names of the registered architectures."""
    return sorted(_ARCHITECTURES)


__all__ = ["Architecture", "SparseCode", "architectures", "extra_tensor", "get_architecture", "register_architecture"]
