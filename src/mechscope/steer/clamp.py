"""Interventions through an SAE's (or transcoder's) features: splice it into the forward pass, or clamp
features.

- :class:`SAESplice`: the reconstructed site (an SAE's own site, a transcoder's ``out_site``) is
  replaced by the reconstruction (what :func:`mechscope.features.downstream_loss` measures); with
  ``keep_error=True`` the reconstruction error is added back, an exact identity.
- :class:`FeatureClamp`: features are set to given values (0 ablates them; a large value steers
  towards what they represent), keeping the reconstruction error, so that *only* the clamped features
  change: the reconstructed site moves by ``(new - old) * W_dec[feature]`` and by nothing else. Clamping
  a feature to the value it already has is the identity. ``positions`` limits the clamp to some positions.

Both leave each row's first ``unspliced`` real tokens as they are: by default the BOS prefix and at least
the first token (:func:`~mechscope.features.evals.default_unspliced`), the positions an activation store
never trains an SAE on -- the attention sink, whose features mean nothing and whose change every later
token would read. ``unspliced=0`` applies the SAE everywhere. The rows' first tokens are found from each
prompt forward's attention mask (left padding included); generated tokens are never leading.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mechscope.errors import ConfigError, ShapeError
from mechscope.features.evals import default_unspliced, feature_hooks, leaving, splice_hooks
from mechscope.features.sae import SparseAutoencoder
from mechscope.features.store import per_token_site
from mechscope.model.hooks import HookFn
from mechscope.model.tokens import leading_mask
from mechscope.sites import Site
from mechscope.steer.intervention import Intervention, axis_size, check_finite

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel


def check_sites(model: HookedModel, sae: SparseAutoencoder) -> None:
    """The SAE's sites exist in `model`, hold one vector per token and have the SAE's widths."""
    config = sae.config
    if not config.site:
        raise ConfigError("the SAE names no site; build it with SAEConfig(site=...)")
    sae.check_model(model)
    pairs = [(config.site, config.d_in)] + ([(config.out_site, config.width_out)] if config.transcoder else [])
    for name, width in pairs:
        site = per_token_site(model, name)
        actual = axis_size(model, site.axes[-1])
        if actual is not None and actual != width:
            raise ShapeError(f"the SAE expects width {width} at {site.name}, which has width {actual}")


class _ThroughFeatures(Intervention):
    """An intervention through an SAE's features that leaves each row's leading tokens as they are."""

    #: [batch, pos] of the current prompt forward: each row's first `unspliced` real tokens (None: none)
    _leading: Tensor | None = None

    def __init__(self, model: HookedModel, sae: SparseAutoencoder, unspliced: int | None) -> None:
        super().__init__(model)
        check_sites(self.model, sae)
        self.sae = sae
        self.unspliced = default_unspliced(self.model, unspliced)

    def _track_phase(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super()._track_phase(module, args, kwargs)
        mask = self.forward_mask
        self._leading = None if mask is None or not self.unspliced else leading_mask(mask, self.unspliced)

    def _skip(self, activation: Tensor) -> Tensor | None:
        leading = self._leading
        return leading if leading is not None and leading.shape == activation.shape[:2] else None

    def _plan(self, hooks: Mapping[Site, HookFn]) -> dict[Site, list[HookFn]]:
        return {site: [leaving(fn, self._skip)] for site, fn in hooks.items()}

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._leading = None


class SAESplice(_ThroughFeatures):
    """Replace the reconstructed site by the SAE's reconstruction while active (not at each row's first
    `unspliced` tokens: see the module docstring)."""

    kind = "sae_splice"

    def __init__(
        self, model: HookedModel, sae: SparseAutoencoder, *, keep_error: bool = False, unspliced: int | None = None
    ) -> None:
        super().__init__(model, sae, unspliced)
        self.keep_error = keep_error

    def hook_plan(self) -> dict[Site, list[HookFn]]:
        return self._plan(splice_hooks(self.model, self.sae, keep_error=self.keep_error))

    def describe(self) -> str:
        where = self.sae.config.out_site or self.sae.config.site
        return f"SAE spliced at {where}" + (" (with its error term)" if self.keep_error else "")


class FeatureClamp(_ThroughFeatures):
    """Set SAE features to fixed values (all positions, or `positions`; never at each row's first
    `unspliced` tokens) while active."""

    kind = "feature_clamp"

    def __init__(
        self,
        model: HookedModel,
        sae: SparseAutoencoder,
        values: Mapping[int, float],
        *,
        positions: Sequence[int] | None = None,
        unspliced: int | None = None,
    ) -> None:
        super().__init__(model, sae, unspliced)
        if not values:
            raise ConfigError("expected at least one feature to clamp, got none")
        bad = [f for f in values if not isinstance(f, int) or not 0 <= f < sae.config.d_sae]
        if bad:
            raise ConfigError(f"expected feature indices in [0, {sae.config.d_sae}), got {bad}")
        self.features = list(values)
        self.values = torch.tensor([check_finite(f"clamp value of feature {f}", values[f]) for f in self.features])
        if positions is not None:
            seq = [positions] if isinstance(positions, int) else list(positions)
            if not seq or not all(isinstance(p, int) and not isinstance(p, bool) for p in seq):
                raise ConfigError(f"clamp positions must be a non-empty list of ints; got {positions!r}")
            positions = seq
        self.positions = positions

    def hook_plan(self) -> dict[Site, list[HookFn]]:
        sae, idx, values, positions = self.sae, self.features, self.values, self.positions

        def edit(f: Tensor, activation: Tensor, x: Tensor) -> Tensor:  # f: [batch, pos, d_sae]
            new = f.clone()
            new[..., idx] = values.to(new)
            if positions is not None:
                n_pos = f.shape[1]
                bad = [p for p in positions if not -n_pos <= p < n_pos]
                if bad and self.phase == "prompt":  # a generation step reads one new column: -1 is it
                    raise ConfigError(f"clamp positions {bad} are out of range for {n_pos} positions")
                rows = self.row_positions(positions, n_pos)  # a padded batch: each row's own positions
                if rows is None:
                    rows = torch.zeros(n_pos, dtype=torch.bool, device=f.device)
                    rows[[p for p in positions if -n_pos <= p < n_pos]] = True
                new = torch.where(rows.to(f.device)[..., None], new, f)
            return activation + (sae.decode(new, x) - sae.decode(f, x)).to(activation.dtype)

        return self._plan(feature_hooks(self.model, sae, edit))

    def describe(self) -> str:
        pairs = ", ".join(f"{f}={float(v):g}" for f, v in zip(self.features, self.values, strict=True))
        return f"clamp SAE features {pairs} at {self.sae.config.out_site or self.sae.config.site}"


def clamp_features(
    model: HookedModel,
    sae: SparseAutoencoder,
    values: Mapping[int, float],
    *,
    positions: Sequence[int] | None = None,
    unspliced: int | None = None,
) -> FeatureClamp:
    """``with clamp_features(model, sae, {17: 0.0}): ...`` ablates feature 17 at the SAE's site."""
    return FeatureClamp(model, sae, values, positions=positions, unspliced=unspliced)


__all__ = ["FeatureClamp", "SAESplice", "check_sites", "clamp_features"]
