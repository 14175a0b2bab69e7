"""Interventions through an SAE's features: splice the SAE into the forward pass, or clamp features.

- :class:`SAESplice`: the site's activation is replaced by the SAE's reconstruction (what
  :func:`mechscope.features.downstream_loss` measures); with ``keep_error=True`` the reconstruction error
  is added back, an exact identity.
- :class:`FeatureClamp`: features are set to given values (0 ablates them; a large value steers
  towards what they represent), keeping the reconstruction error, so that *only* the clamped features
  change: the activation moves by ``(new - old) * W_dec[feature]`` and by nothing else. Clamping a
  feature to the value it already has is the identity. ``positions`` limits the clamp to some positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mechscope.errors import ConfigError, ShapeError
from mechscope.features.evals import splice_hook
from mechscope.features.sae import SparseAutoencoder
from mechscope.model.hooks import HookContext, HookFn
from mechscope.sites import Site, SiteLike
from mechscope.steer.intervention import Intervention, axis_size, check_finite

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel


def _checked_site(model: HookedModel, sae: SparseAutoencoder, site: SiteLike) -> Site:
    chosen = model.site(site)
    if chosen.axes[:2] != ("batch", "pos") or len(chosen.axes) != 3:
        raise ShapeError(f"expected a site with one vector per token (batch, pos, d), got {chosen.name} {chosen.axes}")
    width = axis_size(model, chosen.axes[-1])
    if width is not None and width != sae.config.d_in:
        raise ShapeError(f"the SAE reads d_in={sae.config.d_in} but {chosen.name} has width {width}")
    return chosen


class SAESplice(Intervention):
    """Replace `site` by the SAE's reconstruction while active."""

    kind = "sae_splice"

    def __init__(self, model: HookedModel, sae: SparseAutoencoder, site: SiteLike, *, keep_error: bool = False):
        super().__init__(model)
        self.sae, self.site, self.keep_error = sae, _checked_site(self.model, sae, site), keep_error

    def hook_plan(self) -> dict[Site, list[HookFn]]:
        return {self.site: [splice_hook(self.sae, keep_error=self.keep_error)]}

    def describe(self) -> str:
        return f"SAE spliced at {self.site.name}" + (" (with its error term)" if self.keep_error else "")


class FeatureClamp(Intervention):
    """Set SAE features to fixed values at `site` (all positions, or `positions`) while active."""

    kind = "feature_clamp"

    def __init__(
        self,
        model: HookedModel,
        sae: SparseAutoencoder,
        site: SiteLike,
        values: Mapping[int, float],
        *,
        positions: Sequence[int] | None = None,
    ) -> None:
        super().__init__(model)
        self.sae, self.site = sae, _checked_site(self.model, sae, site)
        if not values:
            raise ConfigError("expected at least one feature to clamp, got none")
        bad = [f for f in values if not isinstance(f, int) or not 0 <= f < sae.config.d_sae]
        if bad:
            raise ConfigError(f"expected feature indices in [0, {sae.config.d_sae}), got {bad}")
        self.features = list(values)
        self.values = torch.tensor([check_finite(f"clamp value of feature {f}", values[f]) for f in self.features])
        self.positions = None if positions is None else list(positions)

    def hook_plan(self) -> dict[Site, list[HookFn]]:
        sae, idx, values, positions = self.sae, self.features, self.values, self.positions

        def fn(activation: Tensor, _ctx: HookContext) -> Tensor:
            f = sae.encode(activation)  # [batch, pos, d_sae]
            new = f.clone()
            new[..., idx] = values.to(new)
            if positions is not None:
                n_pos = f.shape[1]
                bad = [p for p in positions if not -n_pos <= p < n_pos]
                if bad:
                    raise ConfigError(f"clamp positions {bad} are out of range for {n_pos} positions")
                chosen = torch.zeros(n_pos, dtype=torch.bool, device=f.device)
                chosen[positions] = True
                new = torch.where(chosen[None, :, None], new, f)
            return activation + (sae.decode(new) - sae.decode(f)).to(activation.dtype)

        return {self.site: [fn]}

    def describe(self) -> str:
        pairs = ", ".join(f"{f}={float(v):g}" for f, v in zip(self.features, self.values, strict=True))
        return f"clamp SAE features {pairs} at {self.site.name}"


def clamp_features(
    model: HookedModel,
    sae: SparseAutoencoder,
    site: SiteLike,
    values: Mapping[int, float],
    *,
    positions: Sequence[int] | None = None,
) -> FeatureClamp:
    """``with clamp_features(model, sae, "blocks.1.hook_resid_post", {17: 0.0}): ...`` ablates feature 17."""
    return FeatureClamp(model, sae, site, values, positions=positions)


__all__ = ["FeatureClamp", "SAESplice", "clamp_features"]
