"""`load_model`: a local folder of HF files, a ``.gguf`` file, an in-memory model, or a model name.

Names are the bundled organisms and the real models of :mod:`mechscope.model.real_models`
(``"smollm2-135m-instruct"``, ``"gemma3-270m"``); GGUF files are converted once into a verified cache
folder by :mod:`mechscope.model.gguf` and loaded from there.

mechscope never reaches for the network unless the caller passes ``allow_download=True``; everything
else is resolved locally and a missing model is a :class:`ModelNotFoundError` that says how to provide one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mechscope.errors import AdapterError, ConfigError, MechscopeError, ModelNotFoundError
from mechscope.model.adapters import adapter_for
from mechscope.model.hooked import HookedModel

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


_TIED_OK = {"lm_head.weight"}  # absent from files of tied-embedding models


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be a torch.dtype or one of {sorted(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def _resolve_folder(source: str | os.PathLike[str]) -> Path:
    """A local folder for `source`: an existing path, or a bundled model name."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{str(path)!r} is a file; expected a folder holding config.json and weights")
    from mechscope.model.sources.names import list_models, resolve

    entry = resolve(str(source))
    if entry is not None:
        return entry.path
    bundled = ", ".join(e.name for e in list_models(include_real=True)) or "none installed"
    raise ModelNotFoundError(
        f"no model folder at {str(path)!r} and no bundled model of that name (bundled: {bundled}). "
        "Provide a folder written by save_pretrained (config.json + *.safetensors + tokenizer files), "
        "pass an in-memory PreTrainedModel with tokenizer=, or pass allow_download=True to let "
        "transformers fetch a Hub id."
    )


def _gguf_source(
    source: str | os.PathLike[str], dtype: torch.dtype | None, cache_dir: str | os.PathLike[str] | None
) -> Path | None:
    """The converted cache folder when `source` is a ``.gguf`` file or a real-model name, else None."""
    from mechscope.model import gguf, real_models

    text = str(source)
    if text in real_models.REAL_MODELS:
        path = real_models.gguf_path(text, cache_dir=cache_dir)
    elif text.lower().endswith(".gguf"):
        path = Path(source).expanduser()
    else:
        return None
    return gguf.gguf_to_folder(path, dtype=dtype or torch.float32, cache_dir=cache_dir).folder


def load_model(
    source: str | os.PathLike[str] | nn.Module,
    *,
    tokenizer: Any = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
    attn_implementation: str = "sdpa",
    attention_sites: bool = True,
    allow_download: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> HookedModel:
    """Load a causal LM as a :class:`HookedModel`.

    Args:
        source: a folder of HF files, a ``.gguf`` file, a model name (``mechscope zoo list``: organisms
            and real models), an in-memory ``PreTrainedModel``, or -- only with ``allow_download=True`` --
            a Hub id.
        tokenizer: the tokenizer for an in-memory model (loaded from the folder otherwise).
        dtype: ``torch.float32`` (default for files), ``"bfloat16"``, ...; in-memory models are cast.
        device / device_map: where weights go; ``device_map`` shards with HF accelerate.
        attn_implementation: base attention (``"sdpa"`` or ``"eager"``); mechscope wraps it.
        attention_sites: expose q/k/v/scores/pattern/z sites (wraps the attention function).
        cache_dir: where GGUF conversions are cached (default ``$MECHSCOPE_CACHE/gguf`` or
            ``~/.cache/mechscope/gguf``; see :func:`mechscope.model.gguf.cache_root`).
    """
    torch_dtype = _dtype(dtype)
    if device is not None and device_map is not None:
        raise ConfigError("pass either device or device_map, not both")
    if isinstance(source, nn.Module):
        model = source
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        if device is not None:
            model = model.to(device)
        adapter_for(model.config)  # unsupported architectures fail before anything else happens
        return HookedModel(model.eval(), tokenizer, attention_sites=attention_sites)
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"source must be a folder, a model name or a PreTrainedModel; got {type(source).__name__}")

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    converted = _gguf_source(source, torch_dtype, cache_dir)
    if converted is not None:
        folder: str | Path = converted
    elif allow_download and not Path(source).expanduser().exists():
        folder = str(source)
    else:
        folder = _resolve_folder(source)
    local_only = not allow_download
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot read an HF config from {str(folder)!r}: {exc}") from exc
    adapter_for(config)
    kwargs: dict[str, Any] = {"local_files_only": local_only, "attn_implementation": attn_implementation}
    kwargs["dtype"] = torch_dtype if torch_dtype is not None else torch.float32
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kwargs)
        model, info = loaded
    except Exception as exc:  # safetensors and transformers raise many types for damaged files
        raise MechscopeError(f"could not load the weights in {str(folder)!r}: {type(exc).__name__}: {exc}") from exc
    missing = [k for k in info.get("missing_keys", []) if k not in _TIED_OK]
    if missing:  # HF would initialise these randomly: refuse a half-loaded model
        raise MechscopeError(
            f"the weights in {str(folder)!r} lack {len(missing)} tensors the config needs "
            f"(first: {missing[:3]}); the file is truncated or belongs to another model"
        )
    if device is not None:
        model = model.to(device)
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=local_only)
        except (OSError, ValueError):
            tokenizer = None  # token-id inputs still work; text inputs raise a clear error
    return HookedModel(model.eval(), tokenizer, attention_sites=attention_sites)


__all__ = ["AdapterError", "load_model"]
