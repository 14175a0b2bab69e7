"""SAELens's on-disk format: a folder with ``cfg.json`` and ``sae_weights.safetensors``.

Written from reading SAELens's source (v3-v6 layouts), not from its code. The mapping:

==========================  ===================================================================
SAELens                     mechscope
==========================  ===================================================================
``architecture``            ``SAEConfig.activation``: ``standard`` -> ``relu`` (or ``topk`` when the
                            older ``activation_fn_str`` says ``topk``), ``topk`` -> ``topk``,
                            ``jumprelu`` -> ``jumprelu``; ``transcoder`` / ``skip_transcoder`` /
                            ``jumprelu_transcoder`` -> a (skip-)transcoder. A ``batchtopk`` SAE is
                            written as ``jumprelu`` with its inference threshold (as SAELens does).
``hook_name``               ``SAEConfig.site``: TransformerLens hook names are mechscope's canonical
                            site names (``blocks.L.hook_resid_post``, ``blocks.L.hook_mlp_out``, ...);
                            read at the top level (v3-v5) or under ``metadata`` / ``meta`` (v6).
``hook_name_out``, d_out    ``SAEConfig.out_site``, ``d_out`` (transcoders)
``k``                       ``SAEConfig.k`` (or ``activation_fn_kwargs.k`` in older files)
``apply_b_dec_to_input``    ``SAEConfig.apply_b_dec_to_input``
``normalize_activations``   only ``none`` is loaded: mechscope folds input scaling into the weights;
                            ``expected_average_only_in`` loads when its ``scaling_factor`` is given
                            (folded in as SAELens does); ``constant_norm_rescale`` / ``layer_norm``
                            (per-token normalisation at run time) are refused with a clear error.
``W_enc, b_enc, W_dec,      the same names and shapes (``W_skip`` is ``[d_out, d_in]`` in SAELens,
b_dec, threshold, W_skip``  ``[d_in, d_out]`` here: transposed on the way)
==========================  ===================================================================

SAELens does not keep decoder rows at unit norm; mechscope loads the weights as they are (encodings
are then equal to SAELens's), and :meth:`SparseAutoencoder.normalise_decoder` can fold the norms in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mechscope.errors import ConfigError
from mechscope.features.sae import SAEConfig, SparseAutoencoder
from mechscope.io import read_json, read_safetensors, write_text_atomic

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
_ARCH = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
_TRANSCODERS = {
    "transcoder": ("relu", False),
    "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", False),
}


def _meta(cfg: dict[str, Any], key: str) -> Any:
    for holder in (cfg, cfg.get("metadata") or {}, cfg.get("meta") or {}):
        if isinstance(holder, dict) and holder.get(key) not in (None, ""):
            return holder[key]
    return None


def saelens_config(cfg: dict[str, Any], where: str = CFG) -> tuple[SAEConfig, float | None]:
    """mechscope's config for a SAELens ``cfg.json`` dict, and the input scaling factor to fold (if any)."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    missing = [k for k in ("d_in", "d_sae") if not isinstance(cfg.get(k), int)]
    if missing:
        raise ConfigError(f"{where}: expected integer fields {missing} in a SAELens cfg.json; got {sorted(cfg)}")
    arch = cfg.get("architecture", "standard")
    fn = cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu"
    k = cfg.get("k")
    if k is None and isinstance(cfg.get("activation_fn_kwargs"), dict):
        k = cfg["activation_fn_kwargs"].get("k")
    skip, d_out, out_site = False, None, ""
    if arch in _TRANSCODERS:
        activation, skip = _TRANSCODERS[arch]
        d_out, out_site = cfg.get("d_out"), _meta(cfg, "hook_name_out") or ""
        if not isinstance(d_out, int):
            raise ConfigError(f"{where}: a SAELens {arch} needs an integer d_out; got {d_out!r}")
    elif arch in _ARCH:
        activation = "topk" if arch == "standard" and fn == "topk" else _ARCH[arch]
    else:
        raise ConfigError(
            f"{where}: SAELens architecture {arch!r} is not supported; expected one of "
            f"{sorted([*_ARCH, *_TRANSCODERS])}"
        )
    norm = cfg.get("normalize_activations", "none") or "none"
    scaling = cfg.get("scaling_factor")
    if norm not in ("none", "expected_average_only_in") or (norm == "expected_average_only_in" and scaling is None):
        raise ConfigError(
            f"{where}: normalize_activations {norm!r} is not supported (mechscope SAEs run on raw activations); "
            "expected 'none', or 'expected_average_only_in' with a scaling_factor"
        )
    try:
        config = SAEConfig(
            d_in=cfg["d_in"],
            d_sae=cfg["d_sae"],
            activation=activation,
            k=int(k) if activation == "topk" and k is not None else None,
            site=str(_meta(cfg, "hook_name") or ""),
            d_out=d_out,
            out_site=str(out_site),
            skip=skip,
            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", d_out is None)) if d_out is None else False,
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return config, None if norm == "none" or scaling is None else float(scaling)


def load_saelens(folder: str | Path) -> SparseAutoencoder:
    """An SAE from a SAELens-format folder (see the module docstring for the mapping)."""
    folder = Path(folder)
    config, scaling = saelens_config(read_json(folder / CFG, "SAELens cfg.json"), str(folder / CFG))
    tensors, _ = read_safetensors(folder / WEIGHTS, "SAELens SAE weights")
    if config.skip and "W_skip" in tensors:
        tensors["W_skip"] = tensors["W_skip"].T.contiguous()
    if config.activation == "jumprelu" and "threshold" not in tensors and "log_threshold" in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    sae = SparseAutoencoder(config)
    sae.load_weights(tensors, str(folder / WEIGHTS))
    if scaling is not None:  # fold x * s into the encoder and the output back to raw units, as SAELens does
        with torch.no_grad():
            sae.W_enc.mul_(scaling)
            sae.W_dec.div_(scaling)
            sae.b_dec.div_(scaling)
    return sae


def save_saelens(sae: SparseAutoencoder, folder: str | Path, *, model_name: str = "") -> Path:
    """Write `sae` as a SAELens-format folder (v6 layout; hook names also at the top level for older
    readers); returns the folder."""
    folder = Path(folder)
    config = sae.config
    arch = sae.architecture.saelens
    if config.transcoder:
        names = {
            ("relu", True): "skip_transcoder",
            ("relu", False): "transcoder",
            ("jumprelu", False): "jumprelu_transcoder",
        }
        arch = names.get((config.activation, config.skip), "")
        if not arch:
            raise ConfigError(
                f"SAELens has no {config.activation!r} {'skip-' if config.skip else ''}transcoder; "
                f"it has {sorted(names.values())} (relu, relu with skip, jumprelu)"
            )
    meta = {"hook_name": config.site, "model_name": model_name}
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": config.d_in,
        "d_sae": config.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": config.centre_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
        "hook_name": config.site,
        "model_name": model_name,
    }
    if config.activation == "topk":
        cfg["k"] = config.k
    if config.transcoder:
        cfg.update(d_out=config.width_out, hook_name_out=config.out_site)
        meta["hook_name_out"] = config.out_site
    tensors = {k: v.detach().float().contiguous() for k, v in sae.state_dict().items()}
    if config.skip:
        tensors["W_skip"] = tensors["W_skip"].T.contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS))
    write_text_atomic(folder / CFG, json.dumps(cfg, indent=1))
    return folder


__all__ = ["CFG", "WEIGHTS", "load_saelens", "saelens_config", "save_saelens"]
