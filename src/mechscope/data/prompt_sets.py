"""Bundled instruction sets (``src/mechscope/data/prompts/<name>.txt``; see docs/real-models.md).

``harmful``: 109 requests a safe assistant should refuse (weapons, intrusion, fraud, ...; none contains
harmful content itself); ``harmless``: 107 ordinary requests, some sharing topic words with harmful ones.
"""

from __future__ import annotations

from mechscope.errors import MechscopeError

#: Names of the bundled instruction sets.
PROMPT_SETS = ("harmful", "harmless")


class PromptSetError(MechscopeError, ValueError):
    """A bundled prompt set that is missing or malformed."""


def load_prompt_set(name: str) -> list[str]:
    """A bundled instruction set, one instruction per line (``#`` lines are comments)."""
    from importlib.resources import files

    if name not in PROMPT_SETS:
        raise PromptSetError(f"unknown prompt set {name!r}; bundled: {list(PROMPT_SETS)}")
    resource = files("mechscope") / "data" / "prompts" / f"{name}.txt"  # one part per step: Python 3.10
    try:
        text = resource.read_text(encoding="utf-8")
    except (OSError, FileNotFoundError) as exc:
        raise PromptSetError(f"the prompt set file {name}.txt is missing from the installed package: {exc}") from exc
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(set(prompts)) != len(prompts):
        raise PromptSetError(f"prompt set {name!r} has duplicate lines")
    return prompts


__all__ = ["PROMPT_SETS", "PromptSetError", "load_prompt_set"]
