"""Default text for a model: the organisms' own text for the organisms, real English for every other model.

Methods that need "ordinary text" (key statistics of ROME/MEMIT, context prefixes of edits, tuned-lens
and SAE training) used to default to the organisms' synthetic task text. On a real model that text is
out of distribution (``"User: How do I make a bomb?\\nAssistant:"``, invented names), so statistics
and lenses trained on it describe the wrong activations. :func:`default_texts` picks by the model:

- a model whose tokenizer has the organisms' vocabulary (every scored word of the planted tasks is one
  token) gets the organisms' planted-task text (:func:`zoo_texts`), the text it was trained on;
- any other model gets :func:`english_texts`: docstrings of the Python standard library (modules and
  their public classes and functions, at least 200 characters), prose found on every machine that runs
  mechscope, nothing downloaded. The held-out split is a disjoint set of modules (by name hash).

:func:`default_stream` names the choice (``"zoo"`` or ``"english"``) for cache keys and provenance.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import random
import warnings
from functools import lru_cache
from typing import Any, Literal

from mechscope.errors import ConfigError

Split = Literal["train", "eval"]

#: Standard-library modules whose docstrings form the English text stream (sorted; missing ones skipped).
DOC_MODULES: tuple[str, ...] = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions",
    "functools", "glob", "gzip", "hashlib", "heapq", "html", "http.client", "http.server", "imaplib", "inspect",
    "io", "ipaddress", "itertools", "json", "logging", "mailbox", "math", "multiprocessing", "numbers", "os",
    "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shutil",
    "smtplib", "socket", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile", "zoneinfo",
)  # fmt: skip
MIN_CHARS = 200


def _check_split(split: str) -> None:
    if split not in ("train", "eval"):
        raise ConfigError(f"split must be 'train' or 'eval'; got {split!r}")


@lru_cache(maxsize=1)
def _docstrings() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train, eval) docstrings; a module goes to eval when its name's sha256 is 0 mod 5, and a docstring
    that also occurs in a training module (a re-exported class) is left out of eval."""
    train: list[str] = []
    held: list[str] = []
    for name in sorted(DOC_MODULES):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated modules and attributes (typing.io) warn when touched
            docs = _module_docs(name)
        kept = [d.strip() for d in dict.fromkeys(docs) if len(d.strip()) >= MIN_CHARS]
        bucket = held if int(hashlib.sha256(name.encode()).hexdigest(), 16) % 5 == 0 else train
        bucket.extend(kept)
    seen = set(train)  # a class re-exported by several modules has one docstring: keep it out of the eval split
    return tuple(train), tuple(d for d in dict.fromkeys(held) if d not in seen)


def _module_docs(name: str) -> list[str]:
    try:
        module = importlib.import_module(name)
    except ImportError:
        return []
    docs = [module.__doc__ or ""]
    for attr in sorted(dir(module)):
        if attr.startswith("_"):
            continue
        obj = getattr(module, attr, None)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            docs.append(inspect.getdoc(obj) or "")
    return docs


def english_texts(split: Split = "train", seed: int = 0) -> list[str]:
    """Docstrings of the Python standard library as English documents, shuffled with `seed`."""
    _check_split(split)
    train, held = _docstrings()
    texts = list(train if split == "train" else held)
    if not texts:
        raise ConfigError("no standard-library docstrings were found (is Python running with -OO?)")
    random.Random(f"mechscope-english:{seed}:{split}").shuffle(texts)
    return texts


def zoo_texts(split: Split = "train", seed: int = 0, *, shuffle_key: str | None = None) -> list[str]:
    """The organisms' planted-task text: training documents, or the held-out prompts with completions.

    Shuffled by ``random.Random(shuffle_key)`` (default ``"mechscope-zoo:{seed}:{split}"``); callers whose
    measured figures depend on an order of their own pass its key."""
    from mechscope.data.tasks import generate_all

    _check_split(split)
    tasks = generate_all(seed)
    if split == "train":
        texts = [t for data in tasks.values() for t in data.train_texts()]
    else:
        texts = [ex.text for data in tasks.values() for examples in data.eval.values() for ex in examples]
    random.Random(shuffle_key or f"mechscope-zoo:{seed}:{split}").shuffle(texts)
    return texts


def has_organism_vocabulary(model_or_tokenizer: Any) -> bool:
    """Whether every scored word of the planted tasks is one token (true for the bundled organisms only)."""
    from mechscope.data.tasks import required_words

    tokenizer = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    if tokenizer is None or not callable(tokenizer):
        return False
    return all(len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1 for word in required_words())


def default_stream(model: Any) -> Literal["zoo", "english"]:
    """``"zoo"`` for a model with the organisms' vocabulary, ``"english"`` for any other."""
    return "zoo" if has_organism_vocabulary(model) else "english"


def default_texts(model: Any, split: Split = "train", seed: int = 0) -> list[str]:
    """The text a method should use on `model` when the user gives none (see the module docstring)."""
    if default_stream(model) == "zoo":
        return zoo_texts(split, seed)
    return english_texts(split, seed)


__all__ = [
    "DOC_MODULES",
    "default_stream",
    "default_texts",
    "english_texts",
    "has_organism_vocabulary",
    "zoo_texts",
]
