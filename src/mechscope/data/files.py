"""Users' own prompt files: prompt lists, contrast sets and prompts with expected completions.

Formats (UTF-8; blank lines and lines starting with ``#`` are skipped in text files):

- **prompt list**: ``.txt``, one prompt per line; or ``.jsonl`` with ``{"prompt": ...}`` per line.
- **contrast**: ``.jsonl`` with ``{"positive": ..., "negative": ...}`` per line (either key alone is
  fine: the two lists need not pair up), or two prompt lists given separately.
- **completion task**: ``.jsonl`` with ``{"prompt": ..., "answer": ...}`` per line, optionally
  ``"wrong"`` (a competing answer, for a logit difference) and ``"role"`` (``"target"``, the default,
  or ``"side"``: a prompt whose answer must *not* change); or ``.tsv`` lines ``prompt<TAB>answer``.
  Answers are text (``" Paris"``, any number of tokens). The older keys ``correct``/``incorrect`` are
  read as ``answer``/``wrong`` with a deprecation warning (one naming across mechscope: answer/wrong).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mechscope.errors import ConfigError
from mechscope.io import read_text

Role = Literal["target", "side"]
_RENAMED = {"correct": "answer", "incorrect": "wrong"}


@dataclass(frozen=True, kw_only=True)
class Completion:
    """A prompt, the completion it should get (`answer`), optionally a competing one, and its role."""

    prompt: str
    answer: str
    wrong: str | None = None
    role: Role = "target"

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt:
            raise ConfigError(f"a completion needs a non-empty prompt string; got {self.prompt!r}")
        if not isinstance(self.answer, str) or not self.answer.strip():
            raise ConfigError(f"a completion needs a non-empty answer (e.g. ' Paris'); got {self.answer!r}")
        if self.wrong is not None and (not isinstance(self.wrong, str) or not self.wrong.strip()):
            raise ConfigError(f"'wrong' must be a non-empty string when given; got {self.wrong!r}")
        if self.role not in ("target", "side"):
            raise ConfigError(f"role must be 'target' or 'side'; got {self.role!r}")


def _existing(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"no file at {str(p)!r}")
    return p


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(read_text(path, "JSON-lines").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{path}:{number}: not valid JSON ({exc.msg}); expected one JSON object per line"
            ) from exc
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{number}: expected a JSON object; got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise ConfigError(f"{str(path)!r} has no JSON lines")
    return rows


def _text_lines(path: Path) -> list[str]:
    lines = [ln for ln in read_text(path, "prompt list").splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise ConfigError(f"{str(path)!r} has no non-empty lines (expected one prompt per line)")
    return lines


def read_prompts(path: str | Path) -> list[str]:
    """A prompt list: ``.jsonl`` rows ``{"prompt": ...}`` or any other file, one prompt per line."""
    p = _existing(path)
    if p.suffix != ".jsonl":
        return _text_lines(p)
    rows = _jsonl(p)
    bad = [i for i, r in enumerate(rows, start=1) if not isinstance(r.get("prompt"), str)]
    if bad:
        raise ConfigError(f"{p}: rows {bad[:5]} have no string 'prompt'")
    return [str(r["prompt"]) for r in rows]


def read_contrast(path: str | Path) -> tuple[list[str], list[str]]:
    """(positive, negative) prompts from a ``.jsonl`` file of ``{"positive", "negative"}`` rows."""
    p = _existing(path)
    if p.suffix != ".jsonl":
        raise ConfigError(
            f"a contrast file is JSON lines ({{'positive': ..., 'negative': ...}} per line, suffix .jsonl); "
            f"got {p.name!r}. For two plain prompt lists use --positive FILE --negative FILE"
        )
    positive: list[str] = []
    negative: list[str] = []
    for number, row in enumerate(_jsonl(p), start=1):
        unknown = set(row) - {"positive", "negative"}
        if unknown or not row:
            raise ConfigError(f"{p}:{number}: expected keys 'positive' and/or 'negative'; got {sorted(row)}")
        for key, bucket in (("positive", positive), ("negative", negative)):
            if key in row:
                if not isinstance(row[key], str) or not row[key]:
                    raise ConfigError(f"{p}:{number}: {key!r} must be a non-empty string")
                bucket.append(row[key])
    if not positive or not negative:
        raise ConfigError(
            f"{p}: need at least one positive and one negative prompt; got {len(positive)}/{len(negative)}"
        )
    return positive, negative


def _renamed(row: dict[str, Any], where: str) -> dict[str, Any]:
    out = dict(row)
    old_keys = [old for old in _RENAMED if old in out]
    for old in old_keys:
        new = _RENAMED[old]
        if new in out:
            raise ConfigError(f"{where}: give {new!r} or the older {old!r}, not both")
        out[new] = out.pop(old)
    if old_keys:
        names = " and ".join(f"{old!r} is deprecated; call it {_RENAMED[old]!r}" for old in old_keys)
        warnings.warn(f"{where}: {names} (one naming across mechscope)", DeprecationWarning, stacklevel=3)
    return out


def read_completions(path: str | Path) -> list[Completion]:
    """Prompts with expected completions from a ``.jsonl`` or ``.tsv`` file (see the module docstring)."""
    p = _existing(path)
    out: list[Completion] = []
    if p.suffix == ".tsv":
        for number, line in enumerate(_text_lines(p), start=1):
            parts = line.split("\t")
            if len(parts) != 2:
                raise ConfigError(f"{p}:{number}: expected 'prompt<TAB>answer'; got {len(parts)} fields")
            out.append(Completion(prompt=parts[0], answer=parts[1]))
        return out
    if p.suffix != ".jsonl":
        raise ConfigError(
            f"a completion file is .jsonl ({{'prompt', 'answer'[, 'wrong', 'role']}}) or .tsv; got {p.name!r}"
        )
    for number, row in enumerate(_jsonl(p), start=1):
        where = f"{p}:{number}"
        row = _renamed(row, where)
        unknown = set(row) - {"prompt", "answer", "wrong", "role"}
        if unknown or "prompt" not in row or "answer" not in row:
            raise ConfigError(f"{where}: expected keys prompt, answer and optionally wrong, role; got {sorted(row)}")
        try:
            out.append(Completion(**row))
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    return out


__all__ = ["Completion", "read_completions", "read_contrast", "read_prompts"]
