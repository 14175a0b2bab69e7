"""`load_model`: a local folder of HF files, a ``.gguf`` file, an in-memory model, or a model name.

Names are the bundled organisms and the real models of :mod:`mechscope.model.real_models`
(``"smollm2-135m-instruct"``, ``"gemma3-270m"``); GGUF files are converted once into a verified cache
folder by :mod:`mechscope.model.gguf` and loaded from there.

mechscope never reaches for the network unless the caller passes ``allow_download=True``; everything
else is resolved locally and a missing model is a :class:`ModelNotFoundError` that says how to provide one.
"""

from __future__ import annotations

import os
import re
import shutil
import weakref
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from mechscope.errors import AdapterError, ConfigError, MechscopeError, ModelNotFoundError
from mechscope.model.adapters import adapter_for
from mechscope.model.hooked import HookedModel
from mechscope.model.sources.checksums import verify_checksums

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
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point or dtype.itemsize < 2:
            raise ConfigError(
                f"a model's weights take a floating dtype of 16 bits or more (float32, bfloat16, float16, "
                f"float64); got {dtype}"
            )
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be a torch.dtype or one of {sorted(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def _attention_for(config: Any, requested: str | None) -> str:
    """The base attention to load `config`'s family with: the requested one when the family's class
    supports it, else eager (mechscope wraps either, so attention sites stay exposed).

    ``None`` / ``"auto"`` means sdpa where available; other names (``"flash_attention_2"``) pass through to
    transformers, and attention-internal sites are then unavailable (only sdpa and eager are wrapped).
    Some families have no SDPA path in transformers (Gemma 2: SDPA cannot softcap attention logits);
    asking for sdpa there falls back to eager, which the loaded model reports as ``attention_base``. A config
    that softcaps attention logits always gets eager, whatever its class claims: transformers releases up to
    at least 5.17 marked Gemma 2 as SDPA-capable and then silently dropped the softcap.
    """
    if requested is not None and not isinstance(requested, str):
        raise ConfigError(f"attn_implementation must be a name such as 'auto', 'sdpa' or 'eager'; got {requested!r}")
    wanted = "sdpa" if requested in (None, "auto") else str(requested)
    if wanted == "sdpa" and not _sdpa_is_exact(config):
        return "eager"
    return wanted


def _sdpa_is_exact(config: Any) -> bool:
    """Whether SDPA computes `config`'s attention as eager does: the family's class supports it, and no
    attention-logit softcap (SDPA cannot apply one) is configured, on the config or its text config."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(c, "attn_logit_softcapping", None) is not None for c in (config, text)):
        return False
    try:
        model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:  # remote-code or unknown classes: let transformers decide
        return True
    return bool(getattr(model_cls, "_supports_sdpa", True))


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
    """The converted cache folder when `source` is a ``.gguf`` file or a real-model name, else None.

    A half-precision load reuses an existing float32 conversion rather than converting again: conversions
    dequantise to float32 and then cast, exactly what loading the float32 folder with ``dtype=`` does
    (Gemma-3-270M: ~45 s of conversion and 0.5 GB of disk saved per dtype)."""
    from mechscope.model import gguf, real_models

    text = str(source)
    if text in real_models.REAL_MODELS:
        path = real_models.gguf_path(text, cache_dir=cache_dir)
    elif text.lower().endswith(".gguf"):
        path = Path(source).expanduser()
    else:
        return None
    wanted = dtype or torch.float32
    for cached in dict.fromkeys((wanted, torch.float32)):  # its own entry, else float32's (cast on load)
        found = gguf.find_cached(path, dtype=cached, cache_dir=cache_dir)
        if found is not None:
            return found
    return gguf.gguf_to_folder(path, dtype=wanted, cache_dir=cache_dir).folder


_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt")


def _check_folder(folder: Path) -> None:
    """A folder written by save_pretrained holds config.json and weights; say which is missing. When it has a
    ``checksums.json`` (bundled organisms do), every listed file must match it."""
    has_config = (folder / "config.json").is_file()
    has_weights = any((folder / name).is_file() for name in _WEIGHT_FILES) or any(folder.glob("*.safetensors"))
    tokenizer_files = [name for name in _TOKENIZER_FILES if (folder / name).is_file()]
    if has_config and has_weights:
        verify_checksums(folder)  # a folder that lists its files' digests is verified before any weight loads
        return
    found = sorted(p.name for p in folder.iterdir())[:8]
    if not has_config and not has_weights:
        what = "tokenizer files only" if tokenizer_files else f"neither config.json nor weights (found {found})"
        raise ModelNotFoundError(
            f"{str(folder)!r} holds {what}; a model folder needs config.json and weights "
            f"({' or '.join(_WEIGHT_FILES[:2])}), as written by model.save_pretrained(folder)"
        )
    if not has_config:
        raise ModelNotFoundError(
            f"{str(folder)!r} has weights but no config.json; save the model's config there "
            "(model.config.save_pretrained(folder)) so its architecture is known"
        )
    raise ModelNotFoundError(
        f"{str(folder)!r} has config.json but no weights (expected {' or '.join(_WEIGHT_FILES)}); "
        "a config alone describes the architecture but not the trained parameters"
    )


#: The oldest accelerate whose offload the suite passes with (docs/scale.md, "Versions"): 1.1-1.14 crash
#: with a bare KeyError on a disk-offloaded tied embedding and refuse a budget that puts every module on disk.
ACCELERATE_MIN = (1, 15)


def _require_accelerate() -> None:
    """Refuse ``device_map`` without accelerate, or with a release older than :data:`ACCELERATE_MIN`."""
    from importlib import metadata

    wanted = ".".join(map(str, ACCELERATE_MIN))
    try:
        found = metadata.version("accelerate")
    except metadata.PackageNotFoundError:
        raise ConfigError(f"device_map needs accelerate: pip install 'accelerate>={wanted}'") from None
    release = tuple(int(part) for part in re.findall(r"\d+", found)[:2])
    if release < ACCELERATE_MIN:
        raise ConfigError(
            f"device_map needs accelerate>={wanted}; {found} is installed, whose offload crashes on a tied "
            f"embedding placed on disk (pip install 'accelerate>={wanted}')"
        )


def _check_device_map(config: Any, device_map: str | dict[str, Any]) -> None:
    """Refuse a ``device_map`` dict that leaves a parameter nowhere (transformers would quietly place it)."""
    _require_accelerate()
    if isinstance(device_map, str):
        if device_map not in ("auto", "balanced", "balanced_low_0", "sequential") and not _is_device(device_map):
            raise ConfigError(
                f"device_map must be 'auto', 'balanced', 'balanced_low_0', 'sequential', a device or a dict "
                f"{{module: device}}; got {device_map!r}"
            )
        return
    if not isinstance(device_map, dict) or not device_map:
        raise ConfigError(f"device_map must be a string or a non-empty dict {{module: device}}; got {device_map!r}")
    bad = {k: v for k, v in device_map.items() if not (isinstance(v, int) or _is_device(v))}
    if bad:
        raise ConfigError(f"device_map values must be devices (0, 'cpu', 'cuda:1', 'disk'); got {bad}")
    if "" in device_map:
        return
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    names = [n for n, _ in skeleton.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in skeleton.named_buffers(remove_duplicate=False)]
    unknown = [k for k in device_map if not any(n == k or n.startswith(k + ".") for n in names)]
    if unknown:
        raise ConfigError(f"device_map names modules this model does not have: {unknown[:5]}")
    nowhere = [n for n in names if not any(n == k or n.startswith(k + ".") for k in device_map)]
    if nowhere:
        modules = sorted({n.rsplit(".", 1)[0] for n in nowhere})
        raise ConfigError(
            f"device_map leaves {len(nowhere)} tensors nowhere, in modules {modules[:6]}; every parameter needs "
            "a device (add those modules, or a parent such as 'model.layers.1')"
        )
    _check_tied(config, skeleton, device_map)


def _check_tied(config: Any, skeleton: Any, device_map: dict[str, Any]) -> None:
    """Tied input and output embeddings are one tensor: accelerate cannot offload one and keep the other."""
    embed, head = skeleton.get_input_embeddings(), skeleton.get_output_embeddings()
    tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
    if embed is None or head is None or not (tied or embed.weight is head.weight):
        return
    names = {id(m): n for n, m in skeleton.named_modules()}

    def placed(module_name: str) -> Any:
        keys = [k for k in device_map if k == "" or module_name == k or module_name.startswith(k + ".")]
        return device_map[max(keys, key=len)]

    places = {names[id(embed)]: placed(names[id(embed)]), names[id(head)]: placed(names[id(head)])}
    if len({str(v) for v in places.values()}) > 1:
        raise ConfigError(
            f"this model ties its input and output embeddings (one tensor), but device_map places them apart: "
            f"{places}; put both on the same device"
        )


def _is_device(value: Any) -> bool:
    if isinstance(value, torch.device) or value == "disk":
        return True
    try:
        torch.device(value)
    except (RuntimeError, TypeError):
        return False
    return True


def _device(device: str | torch.device | None) -> torch.device | None:
    """`device` as a ``torch.device``: names torch does not know, and accelerators this machine lacks, are
    refused here rather than deep inside ``.to()`` (whose errors read like bugs)."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1'; got {device!r}") from exc
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ConfigError(f"device {str(device)!r} asks for CUDA, but {why} (torch {torch.__version__}); use 'cpu'")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(f"device {str(device)!r}: this machine has {count} CUDA device(s), 0..{count - 1}")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {str(device)!r} asks for Apple's MPS, which this machine does not have; use 'cpu'")
    return parsed


def load_model(
    source: str | os.PathLike[str] | nn.Module,
    *,
    tokenizer: Any = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    attn_implementation: str | None = "auto",
    attention_sites: bool = True,
    allow_download: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_pickle: bool = False,
) -> HookedModel:
    """Load a causal LM as a :class:`HookedModel`.

    Args:
        source: a folder of HF files, a ``.gguf`` file, a model name (``mechscope zoo list``: organisms,
            their variants such as ``"organism-gpt2+backdoor_head"``, and real models), an in-memory
            ``PreTrainedModel``, or -- only with ``allow_download=True`` -- a Hub id.
        tokenizer: the tokenizer for an in-memory model (loaded from the folder otherwise).
        dtype: ``torch.float32`` (default for files), ``"bfloat16"``, ...; in-memory models are cast.
        device / device_map: where weights go; ``device_map`` (``"auto"`` or ``{module: device}`` with
            devices such as ``0``, ``"cpu"``, ``"disk"``) spreads layers with HF accelerate. Hooks, caching,
            interventions and gradients work across devices; see docs/scale.md.
        max_memory: per-device budget for ``device_map="auto"`` (``{0: "20GiB", "cpu": "60GiB"}``).
        offload_folder: where ``"disk"``-mapped weights go that accelerate must write out (by default a
            temporary folder, removed once the model is garbage-collected or Python exits).
        attn_implementation: base attention, ``"auto"`` (sdpa where the family has it, else eager),
            ``"sdpa"`` or ``"eager"``; mechscope wraps it. A family without an SDPA path in transformers,
            or any model that softcaps attention logits (Gemma 2), loads with eager even when sdpa is asked
            for (an in-memory one is switched to eager); ``model.attention_base`` says which ran.
        attention_sites: expose q/k/v/scores/pattern/z sites (wraps the attention function).
        cache_dir: where GGUF conversions are cached (default ``$MECHSCOPE_CACHE/gguf`` or
            ``~/.cache/mechscope/gguf``; see :func:`mechscope.model.gguf.cache_root`).
        allow_pickle: also load pickle-based ``.bin`` weights (unpickling can run code from the file), for
            folders that have no ``.safetensors``; off by default.
    """
    torch_dtype = _dtype(dtype)
    device = _device(device)
    if device is not None and device_map is not None:
        raise ConfigError("pass either device or device_map, not both")
    if (max_memory is not None or offload_folder is not None) and device_map is None:
        raise ConfigError("max_memory and offload_folder apply with device_map; pass device_map='auto' or a dict")
    if isinstance(source, nn.Module):
        model = source
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        if device is not None:
            model = model.to(device)
        adapter_for(model.config)  # unsupported architectures fail before anything else happens
        if getattr(model.config, "_attn_implementation", None) == "sdpa" and not _sdpa_is_exact(model.config):
            cast(Any, model).set_attn_implementation("eager")  # SDPA would drop the softcap (see _attention_for)
        return HookedModel(model.eval(), tokenizer, attention_sites=attention_sites)
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"source must be a folder, a model name or a PreTrainedModel; got {type(source).__name__}")
    from mechscope.model.sources.variants import apply_variant, variant_entry

    variant = variant_entry(source)
    if variant is not None:  # a bundled organism + its shipped weight delta (docs/zoo.md, *Variants*)
        base = load_model(
            variant.base,
            tokenizer=tokenizer,
            dtype=dtype,
            device=device,
            device_map=device_map,
            max_memory=max_memory,
            offload_folder=offload_folder,
            attn_implementation=attn_implementation,
            attention_sites=attention_sites,
        )
        return apply_variant(base, variant)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    converted = _gguf_source(source, torch_dtype, cache_dir)
    if converted is not None:
        folder: str | Path = converted
    elif allow_download and not Path(source).expanduser().exists():
        folder = str(source)
    else:
        folder = _resolve_folder(source)
    if isinstance(folder, Path):
        _check_folder(folder)
        if not allow_pickle and not any(folder.glob("*.safetensors")):
            pickled = ", ".join(sorted(p.name for p in folder.glob("*.bin")))
            raise ConfigError(
                f"{str(folder)!r} holds only pickle-based weights ({pickled}); "
                "unpickling can run code from the file, so mechscope loads safetensors only. Convert them "
                "(model.save_pretrained(folder, safe_serialization=True)) or pass allow_pickle=True if you trust them"
            )
    local_only = not allow_download
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot read an HF config from {str(folder)!r}: {exc}") from exc
    adapter_for(config)
    attention = _attention_for(config, attn_implementation)
    kwargs: dict[str, Any] = {"local_files_only": local_only, "attn_implementation": attention}
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    kwargs["dtype"] = torch_dtype if torch_dtype is not None else torch.float32
    temporary: str | None = None  # an offload folder made here, removed with the model
    if device_map is not None:
        _check_device_map(config, device_map)
        kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
        if offload_folder is None:
            temporary = _offload_dir()
        kwargs["offload_folder"] = temporary or str(offload_folder)
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kwargs)
        model, info = loaded
    except Exception as exc:  # safetensors and transformers raise many types for damaged files
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        raise MechscopeError(f"could not load the weights in {str(folder)!r}: {type(exc).__name__}: {exc}") from exc
    if temporary is not None:
        weakref.finalize(model, shutil.rmtree, temporary, ignore_errors=True)
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


def _offload_dir() -> str:
    """A fresh folder for disk-offloaded weights that accelerate has to write (weights it can read in place
    from the checkpoint's safetensors stay there); removed when the model is collected or Python exits."""
    import tempfile

    return tempfile.mkdtemp(prefix="mechscope-offload-")


__all__ = ["AdapterError", "load_model"]
