"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer"): many facts, spread over several MLPs.

For each request, optimise a change ``delta_i`` of the residual stream after the last edited layer at
the subject's last token so that the target follows (target ``z_i = h_i + delta_i``). Then, layer by
layer from the first, take the remaining gap ``r_i = (z_i - h_i) / (layers left)`` and the subjects'
keys ``K`` at that layer and write all requests at once with the batch least-squares update

    Delta = R K^T (lambda C + K K^T)^-1

which balances hitting the new keys' values against leaving ordinary keys (covariance ``C``) alone.
Hidden states and keys are recomputed after each layer's update, so later layers close what is left.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.steer.editing import _batch as eb
from mechscope.steer.editing.records import EditRecord, add_to_mlp_out, mlp_out_name
from mechscope.steer.editing.requests import EditError, EditRequest, check_requests
from mechscope.steer.editing.rome import kl_texts
from mechscope.steer.editing.stats import StatsConfig, check_stats, second_moments


@dataclass(frozen=True, kw_only=True)
class MEMITConfig:
    """Options of :func:`memit` (see :class:`~mechscope.steer.editing.rome.ROMEConfig` for the shared ones).

    Args:
        layers: the MLPs to edit, in order (None: the first half of the network, at least one layer).
        mom2_weight: lambda, how strongly ordinary keys (covariance ``C``) are protected.
    """

    layers: tuple[int, ...] | None = None
    steps: int = 40
    lr: float = 0.5
    kl_factor: float = 0.0625
    kl_prompts: tuple[str, ...] = ("{} is a",)
    weight_decay: float = 0.01
    clamp_norm_factor: float = 4.0
    stop_prob: float = 0.95
    mom2_weight: float = 1e3
    n_prefixes: int = 2
    prefix_len: int = 8
    stats: StatsConfig = field(default_factory=StatsConfig)

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
            if not self.layers or any(not isinstance(x, int) or x < 0 for x in self.layers):
                raise ConfigError(f"MEMITConfig.layers must be non-negative layer indices; got {self.layers!r}")
            if list(self.layers) != sorted(set(self.layers)):
                raise ConfigError(f"MEMITConfig.layers must be increasing without repeats; got {self.layers!r}")
        for name in ("steps", "prefix_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"MEMITConfig.{name} must be a positive integer; got {getattr(self, name)!r}")
        if not isinstance(self.n_prefixes, int) or self.n_prefixes < 0:
            raise ConfigError(f"MEMITConfig.n_prefixes must be >= 0; got {self.n_prefixes!r}")
        for name in ("lr", "clamp_norm_factor", "mom2_weight"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ConfigError(f"MEMITConfig.{name} must be a finite number > 0; got {getattr(self, name)!r}")
        for name in ("kl_factor", "weight_decay"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ConfigError(f"MEMITConfig.{name} must be a finite number >= 0; got {getattr(self, name)!r}")
        if not 0 < self.stop_prob <= 1:
            raise ConfigError(f"MEMITConfig.stop_prob must be in (0, 1]; got {self.stop_prob!r}")

    def resolved_layers(self, model: Any) -> tuple[int, ...]:
        n = model.dims.n_layers
        layers = self.layers if self.layers is not None else tuple(range(max(1, n // 2)))
        if n < 2:
            raise ConfigError("MEMIT needs a model with at least 2 layers")
        if max(layers) >= n - 1:
            raise ConfigError(
                f"MEMITConfig.layers={layers} but this model has layers 0..{n - 1}, and the last edited layer must "
                "be followed by another (the prompt's last token reads the subject through attention)"
            )
        return layers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _refuse_conflicts(requests: Sequence[EditRequest]) -> None:
    """Two requests for the same subject and prompt with different targets cannot both hold after one edit."""
    first: dict[tuple[str, str], int] = {}
    for i, request in enumerate(requests):
        key = (request.prompt, request.subject)
        j = first.setdefault(key, i)
        if j != i and requests[j].target != request.target:
            raise EditError(
                f"requests {j} and {i} ask the same prompt {request.prompt!r} about {request.subject!r} for different "
                f"targets ({requests[j].target!r} and {request.target!r}); one edit cannot make both true -- keep one"
            )


def memit(
    model: Any,
    requests: Sequence[EditRequest],
    config: MEMITConfig | None = None,
    *,
    mom2: dict[int, Tensor] | None = None,
    cache_dir: str | None = None,
    progress: bool = False,
) -> EditRecord:
    """Apply all `requests` at once in place; returns the :class:`EditRecord` (``revert`` undoes all).

    `mom2` overrides the key statistics per layer. Inputs are validated before any weight changes.
    """
    config = config or MEMITConfig()
    requests = list(requests)
    check_requests(model.tokenizer, requests)
    _refuse_conflicts(requests)
    layers = config.resolved_layers(model)
    stats = dict(mom2) if mom2 is not None else {}
    unused = sorted(set(stats) - set(layers))
    if unused:
        raise EditError(f"mom2 has statistics for layers {unused}, which this edit does not touch; it edits {layers}")
    missing = [layer for layer in layers if layer not in stats]
    if missing:
        stats.update(second_moments(model, missing, config=config.stats, cache_dir=cache_dir, progress=progress))
    for layer in layers:
        check_stats(stats[layer], layer, model.dims.d_mlp)
    names = [mlp_out_name(model, layer) for layer in layers]
    record = EditRecord.capture(model, names, "memit", requests=requests, fingerprint=model.fingerprint())
    n = len(requests)
    z_layer = layers[-1]
    site = f"blocks.{z_layer}.hook_resid_post"
    prefixes = eb.context_prefixes(model, config.n_prefixes, config.prefix_len)
    with torch.no_grad():
        key_rows = eb.build_rows(model, requests, prefixes, with_target=False)
        h0 = eb.resid_at_subject(model, z_layer, key_rows, n)
    rows = eb.build_rows(model, requests, prefixes, with_target=True)
    kl_rows = eb.build_rows(model, requests, [[]], with_target=False, texts=kl_texts(config.kl_prompts))
    opts = eb.OptimiseOptions(
        config.steps, config.lr, config.kl_factor, config.weight_decay, config.clamp_norm_factor, config.stop_prob
    )

    def install(fn: Callable[[Tensor, Any], Tensor]) -> Any:
        return model.hooks({site: lambda act, _ctx: fn(act, None)})

    try:
        delta, losses = eb.optimise_delta(
            model, n, model.dims.d_model, rows, kl_rows, install, h0.float().norm(dim=-1), opts
        )
        targets = h0 + delta.to(h0)
        gaps: list[float] = []
        for i, layer in enumerate(layers):
            with torch.no_grad():
                current = eb.resid_at_subject(model, z_layer, key_rows, n)
                residual = (targets - current) / (len(layers) - i)  # [n, d_model]
                gaps.append(float((targets - current).norm(dim=-1).mean()))
                keys = eb.subject_keys(model, layer, key_rows, n)  # [n, d_mlp]
                c = stats[layer].to(torch.float64)
                a = config.mom2_weight * c + keys.T @ keys
                update = residual.T @ torch.linalg.solve(a, keys.T).T  # [d_model, d_mlp]
                if not bool(torch.isfinite(update).all()):
                    raise EditError(f"the MEMIT update of layer {layer} is not finite; check the key statistics")
                add_to_mlp_out(model, layer, update)
    except BaseException:
        record.finish(model)
        record.revert(model, check=False)
        raise
    record.finish(model)
    with torch.no_grad():
        final_gap = float((targets - eb.resid_at_subject(model, z_layer, key_rows, n)).norm(dim=-1).mean())
    record.info = {
        "layers": list(layers),
        "config": config.to_dict(),
        "losses": losses,
        "gaps": [*gaps, final_gap],
        "delta_norm_mean": float(delta.norm(dim=-1).mean()),
    }
    return record


__all__ = ["MEMITConfig", "memit"]
