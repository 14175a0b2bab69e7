"""Any task from one string, as the CLI takes it: a built-in name, a completion file, or a Python task.

- ``refusal``: the organisms' :class:`~mechscope.improve.RefusalTask` on a model with their vocabulary,
  :class:`~mechscope.improve.refusal.ChatRefusalTask` on a chat model (``chat-refusal`` forces the latter);
  ``sentiment`` and the other planted tasks (``facts``, ``truth``, ``ioi``, ``backdoor``) on the organisms;
- ``PATH.jsonl`` / ``PATH.tsv``: prompts with expected completions (:class:`CompletionTask`);
- ``PATH.py:NAME`` or ``package.module:NAME``: a :class:`Task` instance, a Task subclass (built without
  arguments) or a function returning a Task. The file is run as Python: only load files you trust.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mechscope.errors import ConfigError
from mechscope.improve.tasks import RefusalTask, SentimentTask, Task, ZooTask

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

BUILTIN = ("refusal", "chat-refusal", "sentiment", "facts", "truth", "ioi", "backdoor")


def _python_object(spec: str) -> Any:
    where, _, attr = spec.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"no Python file at {where!r}")
        module_spec = importlib.util.spec_from_file_location(f"mechscope_user_task_{path.stem}", path)
        if module_spec is None or module_spec.loader is None:
            raise ConfigError(f"cannot load {where!r} as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise ConfigError(f"cannot import {where!r} for the task {spec!r}: {exc}") from exc
    if not hasattr(module, attr):
        names = sorted(n for n in dir(module) if not n.startswith("_"))
        raise ConfigError(f"{where!r} has no {attr!r}; it defines {names[:20]}")
    return getattr(module, attr)


def _as_task(obj: Any, spec: str) -> Task:
    if callable(obj) and not isinstance(obj, Task):  # a Task subclass or a function that builds one
        obj = obj()
    if not isinstance(obj, Task):
        raise ConfigError(f"{spec!r} is not a mechscope.improve.Task (nor a class or function giving one)")
    return obj


def load_task(spec: str, *, model: HookedModel | None = None, seed: int = 0, chat: bool = False) -> Task:
    """The task named by `spec` (see the module docstring). `chat` renders the prompts of a completion file as
    user turns in the model's chat template (off by default: a completion file holds text to continue)."""
    from mechscope.data.corpus import has_organism_vocabulary
    from mechscope.model.chat import has_chat_template

    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"expected a task name, a .jsonl/.tsv file or PATH.py:NAME; got {spec!r}")
    organism = model is not None and has_organism_vocabulary(model)
    chat_model = model is not None and has_chat_template(model) and not organism
    if spec == "chat-refusal" or (spec == "refusal" and chat_model):
        from mechscope.improve.refusal import ChatRefusalTask

        return ChatRefusalTask()
    if spec in BUILTIN and model is not None and not organism:
        raise ConfigError(
            f"the planted task {spec!r} is scored on the organisms' vocabulary, which this model does not have; "
            "give a .jsonl/.tsv file of prompts with expected completions, 'chat-refusal' (a chat model), or "
            "PATH.py:NAME"
        )
    if spec == "refusal":
        return RefusalTask(seed=seed)
    if spec == "sentiment":
        return SentimentTask(seed=seed)
    if spec in BUILTIN:
        return ZooTask(task=spec, seed=seed)
    if spec.endswith((".jsonl", ".tsv")):
        from mechscope.improve.completion import CompletionTask

        return CompletionTask.from_file(spec, chat=chat)
    if ":" in spec:
        return _as_task(_python_object(spec), spec)
    raise ConfigError(
        f"unknown task {spec!r}; expected one of {list(BUILTIN)}, a .jsonl/.tsv completion file, "
        "or PATH.py:NAME / package.module:NAME naming a Task"
    )


__all__ = ["BUILTIN", "load_task"]
