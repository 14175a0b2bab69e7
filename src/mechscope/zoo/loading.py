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

CHECKSUMS = "checksums.json"
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


def _sha256(path: Path) -> str:
    from mechscope.zoo.corpus import sha256_file

    return sha256_file(path)


def write_checksums(folder: Path) -> dict[str, str]:
    """Record the sha256 of every file in `folder` (except the checksum file itself)."""
    folder = Path(folder)
    sums = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    (folder / CHECKSUMS).write_text(json.dumps({"schema_version": 1, "sha256": sums}, indent=1) + "\n")
    return sums


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
    sums_path = folder / CHECKSUMS
    if sums_path.is_file():
        expected = json.loads(sums_path.read_text())["sha256"]
        for name, digest in expected.items():
            path = folder / name
            if not path.is_file():
                raise ModelNotFoundError(f"expected {name} in {folder} (listed in {CHECKSUMS}); it is missing")
            actual = _sha256(path)
            if actual != digest:
                raise CorruptWeightsError(
                    f"{path}: expected sha256 {digest} (from {CHECKSUMS}), got {actual}; the file is "
                    "truncated or altered - reinstall mechscope or retrain with `mechscope zoo train`"
                )


def resolve_folder(name_or_path: str | Path) -> Path:
    """The folder of a bundled organism name, or `name_or_path` itself when it is a folder."""
    from mechscope.errors import did_you_mean
    from mechscope.model.sources.names import list_models, resolve

    entry = resolve(str(name_or_path))
    if entry is not None and entry.kind != "organism":
        raise ModelNotFoundError(
            f"{entry.name!r} is a real pretrained model, not a bundled organism: it has no planted tasks to "
            "evaluate or train; load it with mechscope.load_model and use the locate/steer/improve verbs"
        )
    if entry is not None:
        return entry.path
    path = Path(name_or_path)
    if path.is_dir():
        return path
    names = [e.name for e in list_models()]
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
    """``save_pretrained`` model and tokenizer into `folder`, plus JSON `extra` files, then checksums."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    for name, payload in (extra or {}).items():
        (folder / name).write_text(json.dumps(payload, indent=1) + "\n")
    for path in folder.iterdir():  # save_pretrained can leave 0600 temp-file modes; package data must be readable
        if path.is_file():
            path.chmod(0o644)
    write_checksums(folder)
