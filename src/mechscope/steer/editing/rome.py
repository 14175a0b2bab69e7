"""ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT"): a rank-one MLP edit.

An MLP output projection ``W`` (values = ``W k``) is read as a linear associative memory. ROME picks the
key ``k*`` the subject produces at its last token (averaged over contexts), finds by optimisation the
change ``delta`` of the projection's output there that makes the model say the target, and writes it
with the minimum-disturbance rank-one update under the key covariance ``C = E[k k^T]``::

    W' = W + delta (C^-1 k*)^T / (k*^T C^-1 k*)

so ``W' k* = W k* + delta`` exactly, while keys uncorrelated with ``k*`` under ``C`` are barely moved.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.steer.editing import _batch as eb
from mechscope.steer.editing.records import EditRecord, add_to_mlp_out, mlp_out_name
from mechscope.steer.editing.requests import EditError, EditRequest, check_requests
from mechscope.steer.editing.stats import StatsConfig, check_stats, second_moments


@dataclass(frozen=True, kw_only=True)
class ROMEConfig:
    """Options of :func:`rome`.

    Args:
        layer: the MLP to edit (None: the first third of the network, ``n_layers // 3``).
        steps, lr: Adam optimisation of the target value.
        kl_factor: weight of KL(original || edited) on ``kl_prompts`` (keeps the subject's other facts).
        kl_prompts: prompts with ``{}`` for the subject whose next-token distribution should not change.
        weight_decay: penalty on ||delta||^2 relative to the original value's norm^2.
        clamp_norm_factor: ||delta|| is at most this times the original value's norm.
        stop_prob: stop optimising once every target token has at least this probability.
        n_prefixes, prefix_len: context prefixes the key and value are averaged over.
        ridge: ``C + ridge * mean(diag C) * I`` is inverted (the empirical C may be singular).
        rounds: at most this many rank-one updates; another round runs (on the edited weights) while the
            target is not the top prediction after every context. The update also moves the layer's
            output at positions other than the subject's, which the value optimisation did not see;
            small models often need a second round to absorb that.
        stats: how the key statistics are computed (cached on disk).
    """

    layer: int | None = None
    steps: int = 40
    lr: float = 0.5
    kl_factor: float = 0.0625
    kl_prompts: tuple[str, ...] = ("{} is a",)
    weight_decay: float = 0.01
    clamp_norm_factor: float = 4.0
    stop_prob: float = 0.95
    n_prefixes: int = 5
    prefix_len: int = 8
    ridge: float = 1e-3
    rounds: int = 3
    stats: StatsConfig = field(default_factory=StatsConfig)

    def __post_init__(self) -> None:
        if self.layer is not None and (not isinstance(self.layer, int) or self.layer < 0):
            raise ConfigError(f"ROMEConfig.layer must be a non-negative layer index or None; got {self.layer!r}")
        for name in ("steps", "prefix_len", "rounds"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"ROMEConfig.{name} must be a positive integer; got {getattr(self, name)!r}")
        if not isinstance(self.n_prefixes, int) or self.n_prefixes < 0:
            raise ConfigError(f"ROMEConfig.n_prefixes must be >= 0; got {self.n_prefixes!r}")
        for name in ("lr", "clamp_norm_factor"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ConfigError(f"ROMEConfig.{name} must be a finite number > 0; got {getattr(self, name)!r}")
        for name in ("kl_factor", "weight_decay", "ridge"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ConfigError(f"ROMEConfig.{name} must be a finite number >= 0; got {getattr(self, name)!r}")
        if not 0 < self.stop_prob <= 1:
            raise ConfigError(f"ROMEConfig.stop_prob must be in (0, 1]; got {self.stop_prob!r}")
        for p in self.kl_prompts:
            if p.count("{}") != 1:
                raise ConfigError(f"each kl_prompt needs exactly one '{{}}' for the subject; got {p!r}")

    def resolved_layer(self, model: Any) -> int:
        layer = model.dims.n_layers // 3 if self.layer is None else self.layer
        if layer >= model.dims.n_layers - 1:
            raise ConfigError(
                f"ROMEConfig.layer={layer} but this model has layers 0..{model.dims.n_layers - 1}, and the edited "
                "layer must be followed by another (the prompt's last token reads the subject through attention)"
            )
        return layer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextmanager
def down_proj_hook(model: Any, layer: int, fn: Callable[[Tensor, Any], Tensor]) -> Iterator[None]:
    """Replace the MLP output projection's output ``o`` by ``fn(o, None)`` inside the block."""
    module = model.layer_module(layer, model.adapter.mlp_down)

    def hook(_m: Any, _args: Any, output: Tensor) -> Tensor:
        return fn(output, None)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def kl_texts(config_prompts: tuple[str, ...]) -> Callable[[EditRequest], list[str]]:
    return lambda req: [p.replace("{}", req.subject) for p in config_prompts]


def solve_inverse(
    mom2: Float[Tensor, "d_mlp d_mlp"], keys: Float[Tensor, "n d_mlp"], ridge: float
) -> Float[Tensor, "n d_mlp"]:
    """``(C + ridge * mean(diag C) I)^-1 k`` for each key, in float64. A regularised C that is singular or
    not positive definite (its Cholesky factorisation fails) is an :class:`EditError`: no least-squares edit."""
    c = mom2.to(torch.float64)
    c = c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    failed = int(torch.linalg.cholesky_ex(c).info)
    if failed:
        raise EditError(
            f"the key statistics C + ridge * mean(diag C) * I (ridge={ridge}) are singular or not positive definite "
            f"(the Cholesky factorisation fails at column {failed} of {c.shape[0]}); expected a positive definite "
            "matrix: raise ROMEConfig.ridge (default 1e-3) or recompute the statistics from more text"
        )
    return torch.linalg.solve(c, keys.to(c).T).T


def rome(
    model: Any,
    request: EditRequest,
    config: ROMEConfig | None = None,
    *,
    mom2: Tensor | None = None,
    cache_dir: str | None = None,
    progress: bool = False,
) -> EditRecord:
    """Apply one ROME edit in place and return its :class:`EditRecord` (``record.revert(model)`` undoes it).

    `mom2` overrides the cached key statistics of the edited layer (``[d_mlp, d_mlp]``). Every input is
    validated before any weight changes; on any error the model is left exactly as it was.
    """
    config = config or ROMEConfig()
    if not isinstance(request, EditRequest):
        raise EditError(f"rome edits one EditRequest; got {type(request).__name__} (use memit for several)")
    check_requests(model.tokenizer, [request])
    layer = config.resolved_layer(model)
    if mom2 is None:
        mom2 = second_moments(model, [layer], config=config.stats, cache_dir=cache_dir, progress=progress)[layer]
    check_stats(mom2, layer, model.dims.d_mlp)
    name = mlp_out_name(model, layer)
    record = EditRecord.capture(model, [name], "rome", requests=[request], fingerprint=model.fingerprint())

    prefixes = eb.context_prefixes(model, config.n_prefixes, config.prefix_len)
    key_rows = eb.build_rows(model, [request], prefixes, with_target=False)
    rows = eb.build_rows(model, [request], prefixes, with_target=True)
    kl_rows = eb.build_rows(model, [request], [[]], with_target=False, texts=kl_texts(config.kl_prompts))
    opts = eb.OptimiseOptions(
        config.steps, config.lr, config.kl_factor, config.weight_decay, config.clamp_norm_factor, config.stop_prob
    )
    losses: list[list[float]] = []
    norms: list[float] = []
    try:
        for _ in range(config.rounds):
            delta, round_losses = _one_round(model, layer, mom2, key_rows, rows, kl_rows, opts, config.ridge)
            losses.append(round_losses)
            norms.append(float(delta.norm()))
            if eb.targets_on_top(model, rows):
                break
    except BaseException:
        record.finish(model)
        record.revert(model, check=False)
        raise
    record.finish(model)
    record.info = {
        "layer": layer,
        "config": config.to_dict(),
        "losses": losses,
        "delta_norms": norms,
        "rounds": len(losses),
        "success": eb.targets_on_top(model, rows),
    }
    return record


def _one_round(
    model: Any,
    layer: int,
    mom2: Tensor,
    key_rows: eb.Rows,
    rows: eb.Rows,
    kl_rows: eb.Rows,
    opts: eb.OptimiseOptions,
    ridge: float,
) -> tuple[Tensor, list[float]]:
    """Key, value optimisation and one rank-one update of the current weights; returns (delta, losses)."""
    with torch.no_grad():
        k_star = eb.subject_keys(model, layer, key_rows, 1)[0]
        values: dict[str, Tensor] = {}

        def grab(out: Tensor, _r: Any) -> Tensor:
            values["v"] = out[torch.arange(out.shape[0]), key_rows.subject].detach()
            return out

        with down_proj_hook(model, layer, grab):
            model.forward(key_rows.inputs)
        base_norm = values["v"].float().norm(dim=-1).mean().reshape(1)

    def install(fn: Callable[[Tensor, Any], Tensor]) -> Any:
        return down_proj_hook(model, layer, fn)

    delta, losses = eb.optimise_delta(model, 1, model.dims.d_model, rows, kl_rows, install, base_norm, opts)
    c_inv_k = solve_inverse(mom2, k_star[None], ridge)[0]
    denom = float(c_inv_k @ k_star.to(c_inv_k))
    if not denom > 0:
        raise EditError(
            f"k*^T C^-1 k* = {denom:.3g} is not positive for layer {layer}; the key statistics do not cover this "
            "subject's key (recompute them on more text or raise ridge)"
        )
    update = torch.outer(delta[0].to(torch.float64), c_inv_k) / denom
    if not bool(torch.isfinite(update).all()):
        raise EditError("the ROME update is not finite; check the key statistics and the request")
    add_to_mlp_out(model, layer, update)
    return delta, losses


__all__ = ["ROMEConfig", "rome", "solve_inverse"]
