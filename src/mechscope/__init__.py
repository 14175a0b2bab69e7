"""mechscope: locate, steer and improve behaviours of any Hugging Face causal LM.

The public API is small and imported lazily, so ``import mechscope`` stays cheap (no torch import
until a name that needs it is used).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY: dict[str, tuple[str, str]] = {
    "load_model": ("mechscope.model.loading", "load_model"),
    "HookedModel": ("mechscope.model.hooked", "HookedModel"),
    "ActivationCache": ("mechscope.model.cache", "ActivationCache"),
    "HookContext": ("mechscope.model.hooks", "HookContext"),
    "Site": ("mechscope.sites", "Site"),
    "sites": ("mechscope.sites", ""),
    "hook_fns": ("mechscope.model.hook_fns", ""),
    "locate": ("mechscope.locate", ""),
    "steer": ("mechscope.steer", ""),
    "improve": ("mechscope.improve", ""),
    "decompose_resid": ("mechscope.model.decompose", "decompose_resid"),
    "accumulated_resid": ("mechscope.model.decompose", "accumulated_resid"),
    "apply_final_norm": ("mechscope.model.decompose", "apply_final_norm"),
    "direct_logit_attribution": ("mechscope.model.decompose", "direct_logit_attribution"),
    "fold_layer_norm": ("mechscope.model.folding", "fold_layer_norm"),
    "MechscopeError": ("mechscope.errors", "MechscopeError"),
    "SiteError": ("mechscope.errors", "SiteError"),
    "ShapeError": ("mechscope.errors", "ShapeError"),
    "AdapterError": ("mechscope.errors", "AdapterError"),
    "ConfigError": ("mechscope.errors", "ConfigError"),
    "ModelNotFoundError": ("mechscope.errors", "ModelNotFoundError"),
    "AttentionSiteError": ("mechscope.errors", "AttentionSiteError"),
    "NumericsError": ("mechscope.errors", "NumericsError"),
}

__all__ = [
    "ActivationCache",
    "AdapterError",
    "AttentionSiteError",
    "ConfigError",
    "HookContext",
    "HookedModel",
    "MechscopeError",
    "ModelNotFoundError",
    "NumericsError",
    "ShapeError",
    "Site",
    "SiteError",
    "__version__",
    "accumulated_resid",
    "apply_final_norm",
    "decompose_resid",
    "direct_logit_attribution",
    "fold_layer_norm",
    "hook_fns",
    "improve",
    "load_model",
    "locate",
    "sites",
    "steer",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'mechscope' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = import_module(module_name)
    value = getattr(module, attr) if attr else module
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # static names for type checkers and editors
    from mechscope import improve, locate, sites, steer
    from mechscope.errors import (
        AdapterError,
        AttentionSiteError,
        ConfigError,
        MechscopeError,
        ModelNotFoundError,
        NumericsError,
        ShapeError,
        SiteError,
    )
    from mechscope.model import hook_fns
    from mechscope.model.cache import ActivationCache
    from mechscope.model.decompose import (
        accumulated_resid,
        apply_final_norm,
        decompose_resid,
        direct_logit_attribution,
    )
    from mechscope.model.folding import fold_layer_norm
    from mechscope.model.hooked import HookedModel
    from mechscope.model.hooks import HookContext
    from mechscope.model.loading import load_model
    from mechscope.sites import Site
