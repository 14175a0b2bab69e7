"""Save and load organism folders, verifying every file before any weight reaches a model.

A folder holds what ``save_pretrained`` writes (``config.json``, ``model.safetensors``, tokenizer files)
plus ``checksums.json`` (sha256 of each of them). Loading checks presence, the safetensors header and
the checksums first, so a truncated or corrupted file raises :class:`CorruptWeightsError` instead of
producing a half-loaded or silently re-initialised model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mechscope.errors import CorruptWeightsError, ModelNotFoundError
from mechscope.io import write_text_atomic
from mechscope.model.sources.checksums import CHECKSUMS, verify_checksums, write_checksums

REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")

__all__ = [
    "CHECKSUMS",
    "REQUIRED",
    "CorruptWeightsError",
    "load_organism",
    "resolve_folder",
    "save_organism",
    "verify_folder",
    "write_checksums",
]


def verify_folder(folder: Path) -> None:
    """Raise ModelNotFoundError for missing files and CorruptWeightsError for damaged ones."""
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelNotFoundError(f"expected a model folder at {folder}, found nothing there")
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise ModelNotFoundError(f"expected {', '.join(REQUIRED)} in {folder}; missing: {', '.join(missing)}")
    weights = folder / "model.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as f:
            list(f.keys())
    except Exception as exc:  # safetensors raises its own error type for bad headers
        raise CorruptWeightsError(
            f"expected a valid safetensors file at {weights} ({weights.stat().st_size} bytes), "
            f"got an unreadable one: {exc}"
        ) from exc
    verify_checksums(folder)


def resolve_folder(name_or_path: str | Path) -> Path:
    """The folder of a bundled organism (or variant) name, or `name_or_path` itself when it is a folder."""
    from mechscope.errors import did_you_mean
    from mechscope.model.sources.names import list_models, resolve

    entry = resolve(str(name_or_path))
    if entry is not None and entry.kind not in ("organism", "variant"):
        raise ModelNotFoundError(
            f"{entry.name!r} is a real pretrained model, not a bundled organism: it has no planted tasks to "
            "evaluate or train; load it with mechscope.load_model and use the locate/steer/improve verbs"
        )
    if entry is not None:
        return entry.path
    path = Path(name_or_path)
    if path.is_dir():
        return path
    names = [e.name for e in list_models(include_variants=True)]
    raise ModelNotFoundError(
        f"expected a bundled model name or a model folder, got {str(name_or_path)!r}; bundled: {names}."
        + did_you_mean(str(name_or_path), names)
    )


def load_organism(name_or_path: str | Path, device: str = "cpu"):
    """(model, tokenizer) of a verified organism folder, the model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_folder(name_or_path)
    verify_folder(folder)
    loaded: Any = AutoModelForCausalLM.from_pretrained(str(folder))
    model = loaded.to(device).eval()
    return model, AutoTokenizer.from_pretrained(str(folder))


def save_organism(model, tokenizer, folder: Path, extra: dict[str, object] | None = None) -> None:
    """``save_pretrained`` model and tokenizer into `folder`, plus JSON `extra` files, then checksums.

    Everything is written into a temporary sibling folder first and swapped in with renames, so a kill at
    any point leaves the old folder or the new one, never new weights beside old checksums. Files of the old
    folder that the save does not produce (hand-written NOTES.md, the card) are carried over."""
    import shutil
    import tempfile

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.new-"))
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        for name, payload in (extra or {}).items():
            write_text_atomic(staging / name, json.dumps(payload, indent=1) + "\n")
        if folder.is_dir():
            for old in folder.iterdir():
                if old.is_file() and not old.name.startswith(".") and not (staging / old.name).exists():
                    shutil.copy2(old, staging / old.name)
        for path in staging.iterdir():  # save_pretrained can leave 0600 modes; package data must be readable
            if path.is_file():
                path.chmod(0o644)
        staging.chmod(0o755)
        write_checksums(staging)
        _swap_in(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_in(staging: Path, folder: Path) -> None:
    """Replace `folder` by `staging` with two renames (the old folder is removed only once the new one is in)."""
    import shutil
    import tempfile

    if not folder.exists():
        staging.rename(folder)
        return
    retired = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
    retired.rmdir()
    folder.rename(retired)
    staging.rename(folder)
    shutil.rmtree(retired, ignore_errors=True)
