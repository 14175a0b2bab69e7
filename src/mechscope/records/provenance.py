"""Where a run came from: package versions, the git commit of the working directory, the model's identity."""

from __future__ import annotations

import hashlib
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = ("mechscope", "transformers", "safetensors")  # torch: its own build string, below


def versions() -> dict[str, str]:
    """Installed versions of mechscope and the stack its numbers depend on, plus Python's.

    torch's is the build it reports (``2.11.0+cu130``, ``2.13.0+cpu``): PyPI's CUDA wheels install under
    the bare release number, which would hide which build computed the numbers; ``cuda`` is the CUDA
    release that build targets, absent for a CPU build."""
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    import torch  # mechscope cannot run without it; imported here to keep this module's import light

    found["torch"] = str(torch.__version__)
    if torch.version.cuda is not None:
        found["cuda"] = str(torch.version.cuda)
    return found


def git_state(cwd: Path) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git work tree containing `cwd`; (None, None) outside one or without git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
        if head.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None, None
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return head.stdout.strip(), dirty


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """One model a run used.

    Attributes:
        source: what the user named (folder, bundled name) or a description.
        fingerprint: ``HookedModel.fingerprint()`` -- config plus a strided sample of every weight.
        weights_sha256: SHA-256 over every parameter's name, shape, dtype and bytes: any edit changes it.
        model_type: the HF model type.
        n_params: the number of parameters.
    """

    source: str
    fingerprint: str
    weights_sha256: str = ""
    model_type: str = ""
    n_params: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "fingerprint": self.fingerprint,
            "weights_sha256": self.weights_sha256,
            "model_type": self.model_type,
            "n_params": self.n_params,
        }


def weights_sha256(hf_model: Any) -> str:
    """SHA-256 of all weights (names, shapes, dtypes and every byte), in state-dict order.

    ``HookedModel.fingerprint()`` hashes the config and 64 strided samples per tensor: cheap, and it does
    change under ROME's rank-one update, but an edit touching only unsampled entries would pass unseen.
    Records keep this full hash next to it (about 1 s per 500 MB of weights).
    """
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in hf_model.state_dict().items():
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def model_info(model: Any, source: str | None = None) -> ModelInfo:
    """The identity of a :class:`~mechscope.model.hooked.HookedModel` (duck-typed: records sit above models)."""
    hf = model.hf_model
    return ModelInfo(
        source=source or str(getattr(hf.config, "_name_or_path", "") or type(hf).__name__),
        fingerprint=model.fingerprint(),
        weights_sha256=weights_sha256(hf),
        model_type=str(getattr(hf.config, "model_type", "")),
        n_params=int(sum(p.numel() for p in hf.parameters())),
    )


__all__ = ["ModelInfo", "git_state", "model_info", "versions", "weights_sha256"]
