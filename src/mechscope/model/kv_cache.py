"""The keyword an HF model's ``forward`` takes its KV cache by.

transformers 5.x renamed ``past_key_values`` to ``cache`` (5.24 deprecates the old name, 5.40 removes
it); mechscope supports both sides of the rename, so callers ask here instead of spelling either.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from torch import nn

NEW, OLD = "cache", "past_key_values"


@lru_cache(maxsize=64)
def _keyword_of(forward: Any) -> str:
    return NEW if NEW in inspect.signature(forward).parameters else OLD


def cache_keyword(model: nn.Module) -> str:
    """``"cache"`` where `model`'s forward takes it (transformers >= 5.24), else ``"past_key_values"``."""
    return _keyword_of(type(model).forward)


def cache_argument(kwargs: Mapping[str, Any]) -> Any:
    """The KV cache a forward call received under either name (``None`` when it got none)."""
    cache = kwargs.get(NEW)
    return kwargs.get(OLD) if cache is None else cache


__all__ = ["cache_argument", "cache_keyword"]
