"""Reading the weights of a model that accelerate spread over devices, including CPU and disk offload.

With ``load_model(..., device_map=...)`` accelerate leaves offloaded parameters on the ``meta`` device and
attaches a hook to each module that brings them in for its forward. Forward passes, hooks, caches,
interventions and gradients need nothing more; code that *reads* parameters outside a forward (weight
views, per-head results from cached ``z``, the model fingerprint) reads them through :func:`parameter`,
which fetches an offloaded tensor from accelerate's weights map onto the module's execution device.
Code that *writes* weights (ROME/MEMIT, orthogonalisation, fine-tuning) cannot write into offloaded storage;
:func:`require_resident` says so up front.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from mechscope.errors import ConfigError


def _hooks(module: nn.Module) -> list[Any]:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", [hook]))  # SequentialHook holds several


def is_offloaded(tensor: Tensor | None) -> bool:
    return tensor is not None and tensor.device.type == "meta"


def parameter(module: nn.Module, name: str = "weight") -> Any:
    """``module.<name>`` with real values: the attribute itself when resident, else the offloaded copy on
    the module's execution device. None when the module has no such attribute (a missing bias)."""
    value = getattr(module, name, None)
    if not isinstance(value, Tensor) or not is_offloaded(value):
        return value
    for hook in _hooks(module):
        weights = getattr(hook, "weights_map", None)
        if weights is not None and name in weights:
            device = getattr(hook, "execution_device", None)
            out: Tensor = weights[name]
            out = out.to(value.dtype)
            return out.to(device) if device is not None else out
    raise ConfigError(
        f"{type(module).__name__}.{name} is on the meta device and no accelerate offload hook holds its values; "
        "load the model with load_model(folder, device_map=...) so offloaded weights stay readable"
    )


def state_items(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``model.state_dict()`` items with offloaded tensors fetched (one at a time, not all in memory)."""
    modules = dict(model.named_modules())
    for key, tensor in model.state_dict(keep_vars=True).items():
        if is_offloaded(tensor):
            owner, _, attr = key.rpartition(".")
            yield key, parameter(modules[owner], attr)
        else:
            yield key, tensor


def offloaded_names(model: nn.Module) -> list[str]:
    """Parameters (and buffers) of `model` that live off-device (accelerate CPU/disk offload)."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, tensor in named if is_offloaded(tensor)]


def require_resident(model: nn.Module, what: str) -> None:
    """Refuse to `what` (a weight edit) on a model with offloaded weights, naming them and the way out."""
    names = offloaded_names(model)
    if names:
        raise ConfigError(
            f"cannot {what}: {len(names)} weights of this model are offloaded by accelerate (e.g. {names[:3]}) "
            "and edits cannot be written into offloaded storage. Load it without offload (device_map over "
            "devices that hold every layer, or device='cpu') to edit weights"
        )


def input_device(model: nn.Module) -> torch.device:
    """Where inputs go: the device of the first parameter, or, when that is offloaded, the execution
    device accelerate runs the embedding on."""
    for module in model.modules():
        for tensor in module.parameters(recurse=False):
            if not is_offloaded(tensor):
                return tensor.device
            for hook in _hooks(module):
                device = getattr(hook, "execution_device", None)
                if device is not None:
                    return torch.device(device)
            break
    return torch.device("cpu")


__all__ = ["input_device", "is_offloaded", "offloaded_names", "parameter", "require_resident", "state_items"]
