"""A guard against float16 overflow in the residual stream.

float16's largest finite value is 65504. Some families' residual streams grow past it: Gemma-3-270M's
reaches 68,398 after layer 7 on an ordinary English sentence (measured in float32), so a float16 forward
turns it into ``inf`` and every logit after into NaN -- silently, since neither torch nor transformers
checks. bfloat16 has float32's range and does not overflow there.

:func:`float16_guard` watches, for the length of a run of a float16 model, the residual stream entering
each decoder layer and the final norm. Each check records a flag tensor (no device synchronisation per
layer); the flags are read once when the run ends, and a non-finite residual raises
:class:`~mechscope.errors.NumericsError` naming where it first appeared. Other dtypes attach nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from mechscope.errors import NumericsError


class Float16Guard:
    """Per-run record of whether the residual entering each layer (and the final norm) was finite."""

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        #: where (a layer index; ``n_layers`` is the final norm) -> "some value was non-finite", a 0-d bool
        #: tensor on the residual's device, OR-ed over every forward of the run (generation runs many)
        self._flags: dict[int, Tensor] = {}

    def record(self, where: int, hidden: Any) -> None:
        """Note whether the residual entering layer `where` (``n_layers``: the final norm) is finite."""
        if not isinstance(hidden, Tensor) or hidden.dtype != torch.float16:
            return
        bad = ~torch.isfinite(hidden).all()
        previous = self._flags.get(where)
        self._flags[where] = bad if previous is None else previous | bad

    def check(self) -> None:
        """Raise if any recorded residual held inf or NaN; then forget the flags."""
        flags, self._flags = self._flags, {}
        if not flags:
            return
        order = sorted(flags)
        device = flags[order[0]].device
        bad = torch.stack([flags[where].to(device) for where in order])
        if not bool(bad.any()):  # the one synchronisation per run
            return
        raise NumericsError(self._message(order[int(bad.nonzero()[0, 0])]))

    def _message(self, where: int) -> str:
        if where == 0:
            place = "the embeddings (the residual entering layer 0)"
        elif where >= self.n_layers:
            place = f"the last layer (the residual entering the final norm, after layer {self.n_layers - 1})"
        else:
            place = f"layer {where - 1} of {self.n_layers} (the residual entering layer {where})"
        return (
            f"float16 overflow: the residual stream holds inf or NaN after {place}. float16's largest value is "
            "65504; past it every output would be NaN. If the model's own activations exceed it, load it with "
            "dtype='bfloat16' (float32's range at float16's size) or dtype='float32'; if hooks or interventions "
            "were active, a large steering scale or patched value can overflow too (check the run without them)."
        )


@contextmanager
def float16_guard(layers: Sequence[nn.Module], final_norm: nn.Module | None) -> Iterator[Float16Guard]:
    """Watch the residual stream of the runs inside the block; raise :class:`NumericsError` at its end if
    it overflowed. The hooks run after those registered before the block (patches of the residual count)
    and before those registered inside it (a stop that ends the run early); they are removed on exit,
    error or not. A block left by an exception raises that exception, unchecked."""
    guard = Float16Guard(len(layers))

    def entering(where: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            guard.record(where, args[0] if args else kwargs.get("hidden_states"))

        return hook

    watched = [*layers, *([final_norm] if final_norm is not None else [])]
    handles = [
        module.register_forward_pre_hook(entering(where), with_kwargs=True) for where, module in enumerate(watched)
    ]
    try:
        yield guard
        guard.check()
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["Float16Guard", "float16_guard"]
