"""Reading and writing mechscope's files: safetensors with string metadata, never pickle.

Writes are atomic (temporary file, then rename), so an interrupted save never leaves a file that
looks complete; reads turn every way a file can be unreadable into one clear :class:`ConfigError`.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from mechscope.errors import ConfigError


def write_safetensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> Path:
    """Write `tensors` (moved to CPU, made contiguous) with `metadata` to `path`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(cpu, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def read_safetensors(path: str | Path, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; `what` names the expected content in errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no {what} file at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{str(path)!r} is not a readable safetensors file (expected a {what}): {exc}") from exc
    return tensors, metadata
