"""The version floors pyproject.toml declares are the releases ``scripts/check_versions.sh floors`` runs the
suite with, and the accelerate floor the code enforces for ``device_map`` is the one the extras declare: a
floor raised or lowered in one place and not the others would be an untested claim (docs/scale.md,
"Versions")."""

from __future__ import annotations

import re
from pathlib import Path

from mechscope.model.loading import ACCELERATE_MIN

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> dict[str, str]:
    """name -> floor of every ``name>=X`` requirement in pyproject.toml (dependencies and extras)."""
    text = (ROOT / "pyproject.toml").read_text()
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r'"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)', text)}


def _floors_profile() -> dict[str, str]:
    """name -> pinned release of the ``floors`` profile in scripts/check_versions.sh."""
    script = (ROOT / "scripts" / "check_versions.sh").read_text()
    block = script[script.index("floors)") : script.index(";;", script.index("floors)"))]
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r"([A-Za-z0-9_.-]+)==([0-9][0-9.]*)", block)}


def _release(version: str, parts: int = 2) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:parts])


def test_every_declared_floor_is_the_release_the_floors_run_uses():
    declared, pinned = _declared(), _floors_profile()
    checked = {"torch", "transformers", "accelerate", "safetensors", "jaxtyping", "typer", "tqdm", "bottle", "plotly"}
    checked |= {"numpy", "gguf"}
    assert checked <= set(declared), sorted(checked - set(declared))
    for name in sorted(checked):
        assert name in pinned, f"scripts/check_versions.sh floors does not install {name}"
        parts = len(declared[name].split("."))  # 0.2.30 is compared to the patch release, 2.6 to the minor
        assert _release(pinned[name], parts) == _release(declared[name], parts), (name, declared[name], pinned[name])


def test_the_python_floor_is_the_one_the_floors_run_uses():
    requires = re.search(r'requires-python = ">=([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert requires is not None and requires.group(1) == "3.10"
    assert 'python="${PYTHON310:-python3.10}"' in (ROOT / "scripts" / "check_versions.sh").read_text()


def test_the_enforced_accelerate_floor_is_the_declared_one():
    assert _release(_declared()["accelerate"]) == ACCELERATE_MIN
