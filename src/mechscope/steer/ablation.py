"""Ablation and scaling of any site, head, neuron or position: zero, mean, resample, multiply.

Definitions (applied to the selected entries only; everything else passes through unchanged):

- **zero**: ``a <- 0``.
- **mean**: ``a <- E_ref[a]`` over a reference set of prompts, either per position (``over="batch"``:
  the mean over the reference rows with a text token at each position, so inputs must have the
  reference's length) or over every text token (``over="tokens"``: one value per entry, any length, also
  during generation). The BOS a tokenizer adds is not text: it is left out of the means, and an input
  row's BOS keeps its own activation (it is the same in every prompt, so it is its own mean; Gemma-3's
  is 14x a text token's, so averaging it in, or writing a text mean over it, would swamp the rest).
- **resample**: ``a <- a(x')`` with ``x'`` another prompt of a source set (``pairing="derange"``: a
  seeded permutation without fixed points, so row i never reads source row i; ``"aligned"``: row i
  reads source row i).
- **scale**: ``a <- factor * a`` (``factor=0`` is zero-ablation, 1 the identity).

Reference and source activations are computed when the ablation is built, with whatever
interventions are active at that moment.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from mechscope.errors import ConfigError, ShapeError
from mechscope.model.hooks import HookContext, HookFn
from mechscope.model.tokens import prefix_mask, text_mask
from mechscope.sites import Site, SiteLike
from mechscope.steer.intervention import (
    Artifact,
    Intervention,
    check_finite,
    resolve_sites,
    selection_mask,
    validate_selection,
)

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel, Inputs

AblationMethod = Literal["zero", "mean", "resample", "scale"]
METHODS: tuple[str, ...] = ("zero", "mean", "resample", "scale")
MeanOver = Literal["batch", "tokens"]
Pairing = Literal["derange", "aligned"]


def _ints(name: str, values: int | Sequence[int] | None) -> tuple[int, ...] | None:
    if values is None:
        return None
    seq = (values,) if isinstance(values, int) else tuple(values)
    if not seq or not all(isinstance(v, int) and not isinstance(v, bool) for v in seq):
        raise ConfigError(f"{name} must be an int or a non-empty list of ints; got {values!r}")
    return seq


@dataclass(frozen=True, kw_only=True)
class AblationConfig:
    """Options of :class:`Ablation` (see the module docstring for each method's definition)."""

    method: AblationMethod = "zero"
    heads: tuple[int, ...] | None = None
    neurons: tuple[int, ...] | None = None
    positions: tuple[int, ...] | None = None
    factor: float = 0.0
    over: MeanOver = "batch"
    pairing: Pairing = "derange"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"ablation method must be one of {METHODS}; got {self.method!r}")
        for name in ("heads", "neurons", "positions"):
            object.__setattr__(self, name, _ints(name, getattr(self, name)))
        object.__setattr__(self, "factor", check_finite("factor", self.factor))
        if self.over not in ("batch", "tokens"):
            raise ConfigError(f"over must be 'batch' or 'tokens'; got {self.over!r}")
        if self.pairing not in ("derange", "aligned"):
            raise ConfigError(f"pairing must be 'derange' or 'aligned'; got {self.pairing!r}")


def _derangement(n: int, seed: int) -> Tensor:
    """A seeded permutation of range(n) with no fixed point (identity for n == 1)."""
    if n == 1:
        return torch.zeros(1, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=gen)
        if not bool((perm == torch.arange(n)).any()):
            return perm


def _pos_mask(site: Site, act: Tensor, mask: Tensor) -> Tensor:
    """The [batch, pos] attention mask reshaped to broadcast against a site's activation."""
    shape = [1] * act.ndim
    shape[0], shape[site.pos_axis] = mask.shape
    return mask.to(act.device, act.dtype).view(shape)


class Ablation(Intervention):
    """Zero, mean, resample or scale the selected entries of `sites` while active."""

    kind = "ablation"
    #: [batch, pos] of the current forward: its rows' BOS (mean ablation leaves them); None when unknown.
    _prefix: Tensor | None = None

    def __init__(
        self,
        model: HookedModel,
        sites: SiteLike | Iterable[SiteLike],
        config: AblationConfig | None = None,
        *,
        reference: Inputs | None = None,
    ) -> None:
        super().__init__(model)
        self.config = config or AblationConfig()
        self.sites = resolve_sites(self.model, sites)
        cfg = self.config
        for site in self.sites:
            validate_selection(self.model, site, heads=cfg.heads, neurons=cfg.neurons)
        needs_reference = cfg.method in ("mean", "resample")
        if needs_reference and reference is None:
            raise ConfigError(f"{cfg.method} ablation needs reference prompts (reference=...); got none")
        if not needs_reference and reference is not None:
            raise ConfigError(f"{cfg.method} ablation takes no reference prompts")
        self.values: dict[Site, Tensor] = {}
        self.rows: Tensor | None = None
        if reference is not None:
            self._compute_reference(reference)

    def _compute_reference(self, reference: Inputs) -> None:
        batch = self.model.prepare_inputs(reference)
        _, cache = self.model.run_with_cache(batch, self.sites)
        mask = batch["attention_mask"]
        cfg = self.config
        if cfg.method == "mean":  # over the text's tokens: the BOS (Gemma's is 14x a token) is left out
            text = text_mask(self.model.tokenizer, batch["input_ids"], mask)
            # per position, a column with no text (the BOS of unpadded prompts) keeps the mean of its BOS
            mask = text if cfg.over == "tokens" else torch.where(text.bool().any(0, keepdim=True), text, mask)
        for site in self.sites:
            act = cache[site.name]
            if cfg.method == "resample":
                if not bool(mask.all()):
                    raise ConfigError(
                        "resample ablation needs source prompts of equal length (no padding); "
                        f"got lengths {mask.sum(-1).tolist()}"
                    )
                self.values[site] = act
                continue
            act = act.float()  # means accumulate in fp32 (bf16/fp16 models); cast back when replacing
            weights = _pos_mask(site, act, mask)
            if cfg.over == "batch":
                count = weights.sum(0)
                if bool((count == 0).any()):
                    raise ConfigError("a reference position is padding in every row; use over='tokens'")
                self.values[site] = (act * weights).sum(0) / count
            else:
                total = (act * weights).sum(dim=(0, site.pos_axis), keepdim=True)
                self.values[site] = (total / weights.sum(dim=(0, site.pos_axis), keepdim=True)).squeeze(0)
        if cfg.method == "resample":
            n_source = int(mask.shape[0])
            self.rows = torch.arange(n_source) if cfg.pairing == "aligned" else _derangement(n_source, cfg.seed)

    # Hooks ------------------------------------------------------------------------------------------
    def _replacement(self, act: Tensor, site: Site) -> Tensor:
        cfg = self.config
        if cfg.method == "zero":
            return torch.zeros_like(act)
        if cfg.method == "scale":
            return act * cfg.factor
        value = self.values[site].to(act.device, act.dtype)
        if cfg.method == "mean":
            if cfg.over == "tokens":
                return value.unsqueeze(0).expand_as(act)
            if value.shape != act.shape[1:]:
                raise ShapeError(
                    f"mean ablation of {site.name}: the reference mean has shape {tuple(value.shape)} (per position); "
                    f"this forward has {tuple(act.shape[1:])}. Use inputs of the reference's length or over='tokens'."
                )
            return value.unsqueeze(0).expand_as(act)
        assert self.rows is not None
        n_source, batch = value.shape[0], act.shape[0]
        if value.shape[1:] != act.shape[1:]:
            raise ShapeError(
                f"resample ablation of {site.name}: source activations have shape {tuple(value.shape[1:])} per row; "
                f"this forward has {tuple(act.shape[1:])}. Resample from prompts of the same length."
            )
        if self.config.pairing == "aligned" and n_source != batch:
            raise ShapeError(f"aligned resampling needs {batch} source rows (one per input row); got {n_source}")
        index = self.rows[torch.arange(batch) % n_source].to(value.device)
        return value.index_select(0, index)

    def _track_phase(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super()._track_phase(module, args, kwargs)
        ids, mask = self.forward_ids, self.forward_mask
        self._prefix = None
        if self.config.method == "mean" and ids is not None and mask is not None:
            self._prefix = prefix_mask(self.model.tokenizer, ids, mask)

    def _hook(self, site: Site) -> HookFn:
        cfg = self.config

        def fn(act: Tensor, _ctx: HookContext) -> Tensor:
            rows = None if cfg.positions is None else self.row_positions(cfg.positions, act.shape[site.pos_axis])
            new = self._replacement(act, site)
            prefix = self._prefix
            if prefix is not None and prefix.shape == (act.shape[0], act.shape[site.pos_axis]):
                new = torch.where(_pos_mask(site, act, prefix).bool(), act, new)  # each row's BOS stays
            columns = None if rows is not None else cfg.positions  # a padded batch: each row's own positions
            mask = selection_mask(site, act.shape, act.device, heads=cfg.heads, positions=columns, neurons=cfg.neurons)
            if rows is not None:
                in_rows = _pos_mask(site, act, rows).bool()
                mask = in_rows if mask is None else mask & in_rows
            return new if mask is None else torch.where(mask, new, act)

        return fn

    def hook_plan(self) -> dict[Site, list[HookFn]]:
        return {site: [self._hook(site)] for site in self.sites}

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._prefix = None

    # Files ------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the ablation (sites, options, reference means or source activations) with the model's
        fingerprint; :meth:`load` rebuilds it for the same model only."""
        record = AblationRecord(
            [s.name for s in self.sites],
            self.config,
            {s.name: v for s, v in self.values.items()},
            self.rows,
            **Artifact.model_info(self.model),
        )
        return record.save(path)

    @classmethod
    def load(cls, path: str | Path, model: HookedModel) -> Ablation:
        """Rebuild a saved ablation on `model` (:class:`ModelMismatchError` for another model)."""
        record = AblationRecord.load(path, model)
        ablation = cls.__new__(cls)
        Intervention.__init__(ablation, model)
        ablation.config = record.config
        ablation.sites = resolve_sites(ablation.model, record.sites)
        ablation.values = {Site.parse(name): v for name, v in record.values.items()}
        ablation.rows = record.rows
        return ablation

    def describe(self) -> str:
        cfg = self.config
        parts = [cfg.method, ",".join(s.name for s in self.sites)]
        for name in ("heads", "neurons", "positions"):
            if getattr(cfg, name) is not None:
                parts.append(f"{name}={list(getattr(cfg, name))}")
        if cfg.method == "scale":
            parts.append(f"factor={cfg.factor}")
        return " ".join(parts)


class AblationRecord(Artifact):
    """The file form of an :class:`Ablation` (see :meth:`Ablation.save`)."""

    kind = "ablation"

    def __init__(
        self,
        sites: list[str],
        config: AblationConfig,
        values: dict[str, Tensor],
        rows: Tensor | None,
        *,
        fingerprint: str,
        model_type: str,
        d_model: int,
    ) -> None:
        super().__init__(fingerprint=fingerprint, model_type=model_type, d_model=d_model)
        self.sites, self.config, self.values, self.rows = list(sites), config, dict(values), rows

    def _parts(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {f"value:{name}": v for name, v in self.values.items()}
        if self.rows is not None:
            tensors["rows"] = self.rows
        options = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()}
        return tensors, {"sites": self.sites, "options": options}

    @classmethod
    def _from_parts(cls, tensors: dict[str, Tensor], config: dict[str, Any], info: dict[str, Any]) -> AblationRecord:
        values = {k.split(":", 1)[1]: v for k, v in tensors.items() if k.startswith("value:")}
        return cls(
            list(config["sites"]),
            AblationConfig(**config["options"]),
            values,
            tensors.get("rows"),
            fingerprint=info["fingerprint"],
            model_type=info["model_type"],
            d_model=int(info["d_model"]),
        )


def _config(method: AblationMethod, **kwargs: object) -> AblationConfig:
    return AblationConfig(method=method, **kwargs)  # type: ignore[arg-type]


def zero_ablation(
    model: HookedModel,
    sites: SiteLike | Iterable[SiteLike],
    *,
    heads: int | Sequence[int] | None = None,
    neurons: int | Sequence[int] | None = None,
    positions: int | Sequence[int] | None = None,
) -> Ablation:
    """Set the selected entries of `sites` to zero."""
    return Ablation(model, sites, _config("zero", heads=heads, neurons=neurons, positions=positions))


def mean_ablation(
    model: HookedModel,
    sites: SiteLike | Iterable[SiteLike],
    reference: Inputs,
    *,
    over: MeanOver = "batch",
    heads: int | Sequence[int] | None = None,
    neurons: int | Sequence[int] | None = None,
    positions: int | Sequence[int] | None = None,
) -> Ablation:
    """Replace the selected entries by their mean over `reference` (per position, or over tokens)."""
    cfg = _config("mean", over=over, heads=heads, neurons=neurons, positions=positions)
    return Ablation(model, sites, cfg, reference=reference)


def resample_ablation(
    model: HookedModel,
    sites: SiteLike | Iterable[SiteLike],
    source: Inputs,
    *,
    pairing: Pairing = "derange",
    seed: int = 0,
    heads: int | Sequence[int] | None = None,
    neurons: int | Sequence[int] | None = None,
    positions: int | Sequence[int] | None = None,
) -> Ablation:
    """Replace the selected entries by those of other prompts (`source`, same length as the inputs)."""
    cfg = _config("resample", pairing=pairing, seed=seed, heads=heads, neurons=neurons, positions=positions)
    return Ablation(model, sites, cfg, reference=source)


def scaling(
    model: HookedModel,
    sites: SiteLike | Iterable[SiteLike],
    factor: float,
    *,
    heads: int | Sequence[int] | None = None,
    neurons: int | Sequence[int] | None = None,
    positions: int | Sequence[int] | None = None,
) -> Ablation:
    """Multiply the selected entries by `factor`."""
    return Ablation(model, sites, _config("scale", factor=factor, heads=heads, neurons=neurons, positions=positions))


__all__ = [
    "METHODS",
    "Ablation",
    "AblationConfig",
    "AblationMethod",
    "AblationRecord",
    "mean_ablation",
    "resample_ablation",
    "scaling",
    "zero_ablation",
]
