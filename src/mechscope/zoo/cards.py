"""Re-render the card of any bundled folder: a recipe's organism, organism-liar or an organism variant."""

from __future__ import annotations

import json
from pathlib import Path

from mechscope.model.sources.checksums import write_checksums
from mechscope.model.sources.names import VARIANT_FILE
from mechscope.zoo import liar
from mechscope.zoo.card import METRICS_FILE, refresh_card, write_card
from mechscope.zoo.organisms import RECIPES


def refresh_folder_card(folder: Path) -> bool:
    """Re-render the card of any bundled folder: a recipe's organism, organism-liar or a variant (then
    checksums). A folder the zoo knows nothing about only gets new checksums; returns whether a card was
    rendered."""
    folder = Path(folder)
    if folder.name in RECIPES:
        refresh_card(RECIPES[folder.name], folder)
    elif folder.name == liar.NAME:
        liar.refresh_card(folder)
    elif (folder / VARIANT_FILE).is_file() and (folder / METRICS_FILE).is_file():
        from mechscope.zoo.variants import render_variant_card

        info = json.loads((folder / VARIANT_FILE).read_text())
        write_card(folder, render_variant_card(info, json.loads((folder / METRICS_FILE).read_text())))
        write_checksums(folder)
    else:
        write_checksums(folder)
        return False
    return True


__all__ = ["refresh_folder_card"]
