"""Exceptions raised by mechscope.

Every error says what was expected, what came, and (where there is a closed set) the valid options,
so that a user can fix the call without reading mechscope's source.
"""

from __future__ import annotations

import difflib
import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

F = TypeVar("F", bound=Callable[..., Any])


class MechscopeError(Exception):
    """Base class of every error mechscope raises on purpose."""


class SiteError(MechscopeError, KeyError):
    """A site name that does not exist on this model, or cannot be used the way it was asked."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


class ShapeError(MechscopeError, ValueError):
    """A tensor (a hook's return value, a vector, a batch) whose shape is not the one required."""


class AdapterError(MechscopeError, ValueError):
    """An architecture mechscope has no adapter for, or a model that does not match its adapter."""


class ConfigError(MechscopeError, ValueError):
    """An invalid option or configuration value."""


class ModelNotFoundError(MechscopeError, FileNotFoundError):
    """A model source that cannot be found locally (mechscope never downloads unless allowed)."""


class CorruptWeightsError(MechscopeError, ValueError):
    """A model file that exists but is not what was saved (truncated, corrupted, or altered)."""


class NumericsError(MechscopeError, FloatingPointError):
    """Values that left the range their dtype can hold (a float16 residual stream past 65504)."""


class AttentionSiteError(SiteError):
    """An attention-internal site requested where the attention implementation cannot expose it."""


def closest(name: str, options: Iterable[str], n: int = 3) -> list[str]:
    """The `n` options most similar to `name`, for did-you-mean messages."""
    return difflib.get_close_matches(name, list(options), n=n, cutoff=0.5)


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """A ' Did you mean ...?' suffix, or '' when nothing is close."""
    near = closest(name, options)
    return f" Did you mean {', '.join(repr(o) for o in near)}?" if near else ""


def renamed_keywords(**old_to_new: str) -> Callable[[F], F]:
    """Let a function still take keywords it renamed (``@renamed_keywords(site="kind")``): an old keyword
    is passed on under its new name with a ``DeprecationWarning``; both at once is a :class:`ConfigError`.
    One name per concept across mechscope -- a site kind is ``kind`` everywhere."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise ConfigError(f"{fn.__name__}: give {new}= (or the deprecated {old}=), not both")
                    warnings.warn(
                        f"{fn.__name__}: {old}= is deprecated; call it {new}=", DeprecationWarning, stacklevel=2
                    )
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return cast(F, wrapper)

    return decorate
