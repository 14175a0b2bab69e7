"""The memory knob of commands that take many prompts: run them in batches, and name the knob when memory runs out.

Commands tokenize every prompt once (one shared padding, so the batches line up position by position), run
``--batch-size`` rows at a time, and combine: per-row outputs are concatenated, batch means (patching effects,
metric values) are averaged weighted by each batch's row count -- exact, since those metrics average over
prompts. An allocator failure (CUDA's ``OutOfMemoryError`` or CPU's ``RuntimeError`` from the default
allocator) becomes a :class:`~mechscope.errors.ConfigError` that names the option to lower.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.results import Result

R = TypeVar("R", bound=Result)

#: Substrings of the messages torch's allocators raise when memory runs out (CUDA, CPU, MPS).
_OOM_MARKERS = ("out of memory", "can't allocate memory", "defaultcpuallocator", "failed to allocate")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocator failure: torch's ``OutOfMemoryError``, or a ``RuntimeError``/``MemoryError`` saying so."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MARKERS)


@contextmanager
def memory_knob(option: str, value: int) -> Iterator[None]:
    """Turn an out-of-memory error raised inside the block into a clear error naming `option` and its value."""
    try:
        yield
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        hint = f"lower it (e.g. {option} {max(1, value // 4)})" if value > 1 else "use a smaller model or dtype"
        raise ConfigError(f"out of memory with {option} {value}: {hint}; the allocator said: {exc}") from exc


def check_batch_size(batch_size: int, option: str = "--batch-size") -> int:
    if batch_size < 1:
        raise ConfigError(f"{option} must be a positive number of prompts; got {batch_size}")
    return batch_size


def row_slices(n: int, batch_size: int) -> list[slice]:
    """Consecutive row ranges of at most `batch_size` rows covering ``0..n``."""
    return [slice(start, min(n, start + batch_size)) for start in range(0, n, batch_size)]


def take_rows(tokens: Mapping[str, Tensor], rows: slice) -> dict[str, Tensor]:
    """The rows of a tokenized batch (``input_ids`` and ``attention_mask``)."""
    return {k: tokens[k][rows] for k in ("input_ids", "attention_mask") if k in tokens}


def mean_over_batches(run: Callable[[slice], R], n: int, batch_size: int) -> R:
    """``run(rows)`` on each batch of rows, combined into one result whose float tensors are the row-weighted
    means of the batches' (the batches' results must be batch means, as patching results are)."""
    check_batch_size(batch_size)
    parts = [(rows.stop - rows.start, run(rows)) for rows in row_slices(n, batch_size)]
    first = parts[0][1]
    if len(parts) == 1:
        return first
    tensors: dict[str, Any] = {}
    for name, value in first.tensors.items():
        if value.is_floating_point():
            tensors[name] = sum(part.tensors[name].double() * count for count, part in parts) / n
            tensors[name] = tensors[name].to(value.dtype)
        else:
            tensors[name] = value
    config = {**first.config, "batch_size": batch_size}
    return type(first)(tensors=tensors, axes=dict(first.axes), labels=dict(first.labels), config=config)


__all__ = ["check_batch_size", "is_out_of_memory", "mean_over_batches", "memory_knob", "row_slices", "take_rows"]
