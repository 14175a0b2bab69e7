"""How the CLI prints localisation cells: one label style and one unit convention for every command.

A cell is labelled by its coordinates with the token text at its position: ``L3 H1 @ " Mary"``
(``L`` layer, ``H`` head, ``N`` neuron, ``@`` the token of the first clean prompt at that position).
Effects are printed in two columns with the same meaning everywhere (``locate patch``, ``path-patch``,
``atp``): **raw**, the change of the metric the patch causes (patched minus the unpatched run it
starts from), and **normalised**, that change divided by ``clean - corrupt`` (so a denoising patch that
restores the clean metric fully is +1, and a noising patch that destroys it fully is -1).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from torch import Tensor

POSITION_AXES = ("pos", "position")


def cell_label(axes: Sequence[str], values: Sequence[str], tokens: Sequence[str] | None = None) -> str:
    """``L3 H1 @ " Mary"`` from axis names, the cell's label on each axis and the prompt's tokens."""
    parts: list[str] = []
    for axis, value in zip(axes, values, strict=True):
        if axis == "layer":
            parts.append(f"L{value}")
        elif axis in POSITION_AXES:
            index = int(value) if value.lstrip("-").isdigit() else None
            if tokens is not None and index is not None and -len(tokens) <= index < len(tokens):
                parts.append(f"@ {json.dumps(tokens[index], ensure_ascii=False)}")
            else:
                parts.append(f"@ pos {value}")
        else:
            parts.append(value)
    return " ".join(parts)


def top_cells(
    values: Tensor, axes: Sequence[str], labels: dict[str, list[str]], tokens: Sequence[str] | None, k: int = 10
) -> list[tuple[str, int]]:
    """The `k` cells of largest ``|value|`` as (label, flat index), largest first."""
    flat = values.flatten()
    order = flat.abs().argsort(descending=True)[:k]
    out: list[tuple[str, int]] = []
    for i in order.tolist():
        coords: list[str] = []
        rest = int(i)
        for axis in reversed(axes):
            rest, j = divmod(rest, len(labels[axis]))
            coords.append(labels[axis][j])
        out.append((cell_label(axes, list(reversed(coords)), tokens), int(i)))
    return out


def echo_effects(
    echo: Callable[[str], object],
    raw: Tensor,
    axes: Sequence[str],
    labels: dict[str, list[str]],
    *,
    clean: float,
    corrupt: float,
    tokens: Sequence[str] | None = None,
    k: int = 10,
    what: str = "cell",
) -> None:
    """Print the metric of both runs, then the top cells with raw and normalised effects (module doc)."""
    gap = clean - corrupt
    echo(f"metric: clean {clean:.4f}  corrupt {corrupt:.4f}  (clean - corrupt {gap:+.4f})")
    echo(f"{what:28s} {'raw change':>12s} {'normalised':>11s}   (normalised = raw / (clean - corrupt))")
    flat = raw.flatten()
    for label, index in top_cells(raw, axes, labels, tokens, k):
        value = float(flat[index])
        norm = value / gap if gap != 0 else float("nan")
        echo(f"{label:28s} {value:+12.4f} {norm:+11.4f}")


__all__ = ["cell_label", "echo_effects", "top_cells"]
