"""Names of the models mechscope can load without any path: bundled organisms (and later real models).

`mechscope.load_model(name)` asks :func:`resolve` first; everything else about a bundled model (its card,
its metrics, how it was trained) lives beside its weights in ``zoo/models/<name>/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODELS_DIR = Path(__file__).parent / "models"

#: The model the demo, the docs and the CLI use when none is named: the organism with every planted mechanism.
DEFAULT_MODEL = "organism-gpt2"


@dataclass(frozen=True)
class ZooEntry:
    """One loadable model name."""

    name: str
    path: Path
    kind: str  # "organism" (trained here, mechanisms planted) or "real" (pretrained, from a package)
    architecture: str
    licence: str
    description: str


def list_models() -> list[ZooEntry]:
    """Every bundled model whose weights are present in the installed package."""
    entries: list[ZooEntry] = []
    if not MODELS_DIR.is_dir():
        return entries
    for folder in sorted(p for p in MODELS_DIR.iterdir() if (p / "config.json").is_file()):
        import json

        config = json.loads((folder / "config.json").read_text())
        entries.append(
            ZooEntry(
                name=folder.name,
                path=folder,
                kind="organism",
                architecture=(config.get("architectures") or ["?"])[0],
                licence="Apache-2.0",
                description=config.get("mechscope_description", "bundled model organism"),
            )
        )
    return entries


def resolve(name: str) -> ZooEntry | None:
    """The entry for a bundled model name, or None when `name` is not one."""
    return next((e for e in list_models() if e.name == name), None)
