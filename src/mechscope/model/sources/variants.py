"""Bundled organism variants: a base organism plus a shipped weight delta, loaded as one model.

A variant folder (``zoo/variants/<base>+<recipe>/``) holds ``variant.json`` (name, base, recipe, what was
planted), ``delta.safetensors`` -- the edit record of the fine-tuned parameters (mechscope's envelope,
format ``mechscope.edit_record``: ``before/<param>`` and ``after/<param>`` tensors, the base's fingerprint) --
its card, metrics and ``checksums.json``. Loading verifies the checksums, checks that the loaded base holds
the record's ``before`` tensors bit for bit (so a delta never lands on other weights), writes the ``after``
tensors and marks the config with the variant's name, so its fingerprint differs from the base's even
where the fingerprint's weight sample misses the changed entries.

The record is read with :func:`mechscope.io.read_safetensors` here, in the model layer, because
``EditRecord`` (``steer.editing``) sits above it; the same file loads as an ``EditRecord`` there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mechscope.errors import CorruptWeightsError, ModelNotFoundError
from mechscope.io import read_safetensors
from mechscope.model.sources.checksums import verify_checksums
from mechscope.model.sources.names import VARIANT_FILE, ModelEntry, resolve
from mechscope.results import ModelMismatchError

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

#: The weight delta inside a variant folder.
DELTA_FILE = "delta.safetensors"
#: The envelope format of the delta (an edit record, steer.editing.records).
DELTA_FORMAT = "mechscope.edit_record"
#: Separates the base organism's name from the recipe's in a variant name.
SEPARATOR = "+"


def variant_entry(source: str | os.PathLike[str]) -> ModelEntry | None:
    """The variant entry `source` names, or None (a path that exists is never a variant name)."""
    text = str(source)
    if SEPARATOR not in text or Path(text).expanduser().exists():
        return None
    entry = resolve(text)
    if entry is None:
        base = text.split(SEPARATOR, 1)[0]
        from mechscope.model.sources.names import list_models

        known = [e.name for e in list_models(include_variants=True) if e.kind == "variant"]
        if resolve(base) is not None:
            raise ModelNotFoundError(f"no variant {text!r} of {base!r} is shipped; shipped variants: {known}")
        return None
    return entry if entry.kind == "variant" else None


def read_delta(folder: Path) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, str]]:
    """``(before, after, header)`` of a variant folder's delta, after verifying the folder's checksums."""
    folder = Path(folder)
    path = folder / DELTA_FILE
    if not path.is_file() or not (folder / VARIANT_FILE).is_file():
        raise ModelNotFoundError(f"expected {VARIANT_FILE} and {DELTA_FILE} in {folder}")
    verify_checksums(folder)
    tensors, header = read_safetensors(path, "variant weight delta")
    if header.get("format") != DELTA_FORMAT:
        raise CorruptWeightsError(f"{path}: expected a {DELTA_FORMAT} file, got format {header.get('format')!r}")
    before = {k.removeprefix("before/"): v for k, v in tensors.items() if k.startswith("before/")}
    after = {k.removeprefix("after/"): v for k, v in tensors.items() if k.startswith("after/")}
    if not after or set(before) != set(after):
        raise CorruptWeightsError(f"{path}: expected before/ and after/ tensors of the same parameters")
    return before, after, header


def apply_variant(model: HookedModel, entry: ModelEntry) -> HookedModel:
    """Write variant `entry`'s delta into `model` (its base organism, freshly loaded); returns `model`."""
    before, after, header = read_delta(entry.path)
    params = dict(model.hf_model.named_parameters())
    missing = sorted(set(after) - set(params))
    if missing:
        raise ModelMismatchError(f"variant {entry.name!r} changes parameters {missing[:3]} that the model lacks")
    made_on = json.loads(header.get("model") or "null") or {}
    differ = [n for n, t in before.items() if not torch.equal(params[n].detach().cpu(), t.to(params[n].dtype))]
    if differ:
        raise ModelMismatchError(
            f"variant {entry.name!r} was made on {entry.base!r} with fingerprint {made_on.get('fingerprint')!r}, "
            f"but the loaded base differs in {differ[:3]}: the base organism's weights changed since the variant "
            "was built (rebuild it with `mechscope zoo build-variants`)"
        )
    offloaded = [n for n in after if params[n].device.type == "meta"]
    if offloaded:
        raise ModelMismatchError(f"cannot apply variant {entry.name!r}: {offloaded[:3]} are offloaded (device_map)")
    with torch.no_grad():
        for n, t in after.items():
            params[n].copy_(t.to(device=params[n].device, dtype=params[n].dtype))
    config = model.hf_model.config
    config.mechscope_variant = entry.name
    config.mechscope_description = entry.description
    return model


__all__ = ["DELTA_FILE", "DELTA_FORMAT", "SEPARATOR", "apply_variant", "read_delta", "variant_entry"]
