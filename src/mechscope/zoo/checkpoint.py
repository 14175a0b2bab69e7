"""Training checkpoints as safetensors + JSON, replaced atomically so an interruption never leaves a
half-written one.

``<run>/checkpoint/`` holds ``model.safetensors``, ``optimizer.safetensors`` (AdamW moments by parameter
name) and ``state.json`` (step, AdamW step counts, elapsed wall time). A new checkpoint is written to
``checkpoint.tmp`` and swapped in with renames; a crash between the renames leaves ``checkpoint.old``,
which :func:`load_checkpoint` falls back to.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_checkpoint(run_dir: Path, model, optimizer, state: dict) -> None:
    """Write model, optimiser moments and `state` (must hold ``step``) as the run's checkpoint."""
    run_dir = Path(run_dir)
    tmp, final, old = run_dir / "checkpoint.tmp", run_dir / "checkpoint", run_dir / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(_untie(weights), str(tmp / "model.safetensors"))
    names = {id(p): n for n, p in model.named_parameters()}
    moments: dict[str, torch.Tensor] = {}
    adam_steps: dict[str, float] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if st:
                name = names[id(p)]
                moments[f"{name}.exp_avg"] = st["exp_avg"].contiguous()
                moments[f"{name}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
                adam_steps[name] = float(st["step"])
    save_file(moments, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "adam_steps": adam_steps}, indent=1))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _untie(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage (tied embeddings); give every tensor its own."""
    seen: set[int] = set()
    out = {}
    for k, v in weights.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def load_checkpoint(run_dir: Path, model, optimizer) -> dict | None:
    """Restore the latest complete checkpoint into `model` and `optimizer`; its state, or None."""
    for folder in (Path(run_dir) / "checkpoint", Path(run_dir) / "checkpoint.old"):
        if (folder / "state.json").is_file():
            break
    else:
        return None
    state = json.loads((folder / "state.json").read_text())
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    moments = load_file(str(folder / "optimizer.safetensors"))
    params = dict(model.named_parameters())
    for name, step in state.pop("adam_steps").items():
        p = params[name]
        optimizer.state[p] = {
            "step": torch.tensor(step),
            "exp_avg": moments[f"{name}.exp_avg"],
            "exp_avg_sq": moments[f"{name}.exp_avg_sq"],
        }
    return state
