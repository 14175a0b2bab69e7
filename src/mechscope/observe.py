"""A registration point for observers of things the library makes (ground floor: imports nothing).

Results and artifacts call :func:`notify` once they are built, so a layer above (run records) can
collect what the verbs return without any verb knowing about it. With no observer subscribed a
notification costs one empty-list check; nothing is subscribed on import.
"""

from __future__ import annotations

from collections.abc import Callable

Observer = Callable[[object], None]

_OBSERVERS: list[Observer] = []


def subscribe(observer: Observer) -> None:
    """Call `observer(obj)` for every later :func:`notify`; subscribing the same observer twice is refused."""
    if any(o is observer for o in _OBSERVERS):
        raise ValueError(f"observer {observer!r} is already subscribed")
    _OBSERVERS.append(observer)


def unsubscribe(observer: Observer) -> None:
    """Stop calling `observer`; unknown observers are ignored."""
    _OBSERVERS[:] = [o for o in _OBSERVERS if o is not observer]


def subscribed(observer: Observer) -> bool:
    return any(o is observer for o in _OBSERVERS)


def notify(obj: object) -> None:
    """Tell every observer that `obj` was made (called at the end of Result / Artifact construction)."""
    for observer in tuple(_OBSERVERS):
        observer(obj)


__all__ = ["Observer", "notify", "subscribe", "subscribed", "unsubscribe"]
