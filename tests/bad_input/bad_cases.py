"""Shared checks of the bad-input tables (issue 15): each case is a call or a command line, the error class it must
raise, and substrings that name what was expected and what came. Model parameters (and model folders) must
hash the same before and after a failing call."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

USER_ERROR = 2


@dataclass(frozen=True)
class Case:
    """One bad input: `call` must raise `error` whose message contains every string of `needles`."""

    id: str
    call: Callable[..., Any]
    error: type[BaseException]
    needles: tuple[str, ...]


def case(id: str, call: Callable[..., Any], error: type[BaseException], *needles: str) -> Any:
    return pytest.param(Case(id, call, error, needles), id=id)


def params_hash(model: Any) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) of a HookedModel or nn.Module."""
    module = getattr(model, "hf_model", model)
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        tensor = value.detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def folder_hash(folder: Path) -> str:
    """sha256 over every file (relative name and bytes) under `folder`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def check(bad: Case, *args: Any, model: Any = None) -> BaseException:
    """Run `bad`, assert its error class and message; with `model`, assert its parameters did not change."""
    before = params_hash(model) if model is not None else None
    with pytest.raises(BaseException) as info:
        bad.call(*args)
    exc = info.value
    assert isinstance(exc, bad.error), f"{bad.id}: expected {bad.error.__name__}, got {type(exc).__name__}: {exc}"
    message = str(exc)
    for needle in bad.needles:
        assert needle in message, f"{bad.id}: {needle!r} not in the message {message!r}"
    if model is not None:
        assert params_hash(model) == before, f"{bad.id}: the model's parameters changed"
    return exc


def check_cli(args: Sequence[str], needles: Sequence[str], *, folders: Sequence[Path] = ()) -> str:
    """Run ``mechscope ARGS``: exit code 2, no traceback, one short paragraph containing every needle, and
    every folder in `folders` (model folders) byte-identical afterwards."""
    from typer.testing import CliRunner

    from mechscope.cli.main import app

    before = [folder_hash(f) for f in folders]
    result = CliRunner().invoke(app, [str(a) for a in args])
    output = result.output
    assert result.exit_code == USER_ERROR, f"exit code {result.exit_code}:\n{output}"
    assert "Traceback" not in output, output
    message = output[output.find("error:") :] if "error:" in output else output
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert [folder_hash(f) for f in folders] == before, "a model folder changed"
    return message


@functools.cache
def gpt2() -> Any:
    """A tiny random GPT-2 HookedModel, built once for every bad-input module (no case may change it)."""
    from mechscope.model.hooked import HookedModel
    from tiny_models import tiny_model

    return HookedModel(*tiny_model("gpt2"))


@functools.cache
def llama() -> Any:
    """A tiny random Llama HookedModel, built once for every bad-input module."""
    from mechscope.model.hooked import HookedModel
    from tiny_models import tiny_model

    return HookedModel(*tiny_model("llama"))
