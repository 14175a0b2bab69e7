"""The indexes users look things up in name real things: every dotted Python name in docs/methods.md resolves
and every `mechscope ...` command in it exists (the map of methods cannot point at a verb that was renamed or
never built), and benchmarks/README.md lists every benchmark script there is."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import typer

from mechscope.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "methods.md"
SHORT = ("locate.", "steer.", "features.", "improve.")
DOTTED = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+$")


def _spans() -> list[str]:
    return re.findall(r"`([^`]+)`", PAGE.read_text(encoding="utf-8"))


def _resolve(name: str) -> Any:
    """The object a dotted name means: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


def _python_names() -> list[str]:
    names = []
    for span in _spans():
        name = span.split("(", 1)[0]
        if name.startswith(SHORT):
            name = "mechscope." + name
        if name.startswith("mechscope.") and DOTTED.match(name):
            names.append(name)
    return names


def _commands() -> list[list[str]]:
    return [span.split()[1:] for span in _spans() if span.startswith("mechscope ")]


def test_every_python_name_on_the_page_exists() -> None:
    names = _python_names()
    assert len(names) > 80, f"the page's names were not found by the parser ({len(names)})"
    missing = []
    for name in names:
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"docs/methods.md names what does not exist: {missing}"


def test_every_command_on_the_page_exists() -> None:
    commands = _commands()
    assert len(commands) > 10
    root = typer.main.get_command(app)
    missing = []
    for words in commands:
        group = root
        for word in words:
            subcommands = getattr(group, "commands", None)  # a group's {name: command}; typer's own class
            if subcommands is None or word.startswith("-") or word.isupper():
                break
            if not all(option in subcommands for option in word.split("/")):
                missing.append(" ".join(words))
                break
            group = subcommands[word.split("/")[0]]
    assert not missing, f"docs/methods.md names commands that do not exist: {missing}"


def test_the_benchmark_index_lists_every_benchmark() -> None:
    listed = set(re.findall(r"`(bench_\w+\.py)`", (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")))
    present = {path.name for path in (ROOT / "benchmarks").glob("bench_*.py")}
    assert len(present) > 10
    assert listed == present, (
        f"benchmarks/README.md lists {sorted(listed - present)} (gone) and misses {sorted(present - listed)}"
    )
