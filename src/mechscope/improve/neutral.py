"""A small built-in set of neutral English text for side-effect measurements (KL, perplexity).

Plain descriptive sentences with no requests, reviews or claims to judge, so that an intervention
aimed at refusal or sentiment should leave the model's predictions on them alone. Written for
mechscope; pass your own texts to the harness for other models or domains.
"""

from __future__ import annotations

NEUTRAL_TEXTS: tuple[str, ...] = (
    "The river runs past the old mill and on towards the sea.",
    "A dictionary lists words together with their meanings and uses.",
    "He opened the window and looked out at the garden in the morning light.",
    "The program reads a file line by line and prints each line.",
    "Bread is usually made from flour, water, salt and yeast.",
    "The train left the station a few minutes after noon.",
    "Most maps show north at the top of the page.",
    "She wrote the date at the top of the letter and signed it at the bottom.",
    "The library opens at nine and closes at six on weekdays.",
    "A week has seven days and a year has twelve months.",
    "The committee met on Tuesday to discuss the new timetable.",
    "Rain fell through the night and the streets were wet by dawn.",
    "The manual explains how to install the software on a new machine.",
    "Children walked to school along the path beside the field.",
    "The kettle boiled and he poured the water into the pot.",
    "A bridge connects the two halves of the town across the river.",
    "The museum keeps old coins, tools and letters from the village.",
    "Each chapter of the book begins with a short summary.",
    "The shop sells paper, pens and envelopes near the post office.",
    "In winter the lake freezes and the boats stay on the shore.",
)

__all__ = ["NEUTRAL_TEXTS"]
