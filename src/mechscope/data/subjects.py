"""Well-known subjects by kind, to ask an edited relation about *other* subjects (neighbourhood checks).

An edit of "The capital of {} is" for Germany must leave France, Spain and Japan alone. To check that
without a knowledge base, :func:`neighbour_subjects` finds the kind of the edited subject (a country,
a city, a person, a company, a language) in these lists and returns other members of that kind; the
unedited model's own answers for them are the reference (see
:mod:`mechscope.steer.editing.neighbourhood`). Names are common English spellings.
"""

from __future__ import annotations

import random

from mechscope.errors import ConfigError

SUBJECTS: dict[str, tuple[str, ...]] = {
    "country": (
        "France", "Spain", "Italy", "Germany", "Japan", "China", "India", "Russia", "Canada", "Mexico", "Brazil",
        "Argentina", "Egypt", "Kenya", "Nigeria", "Greece", "Turkey", "Poland", "Sweden", "Norway", "Finland",
        "Denmark", "Austria", "Portugal", "Ireland", "Belgium", "Netherlands", "Switzerland", "Hungary",
        "Peru", "Chile", "Australia", "Thailand", "Vietnam", "Indonesia", "Iran", "Iraq", "Cuba", "England",
        "Scotland",
    ),
    "city": (
        "Paris", "London", "Berlin", "Madrid", "Rome", "Tokyo", "Moscow", "Beijing", "Cairo", "Sydney",
        "Toronto", "Chicago", "Boston", "Vienna", "Prague", "Athens", "Lisbon", "Dublin", "Amsterdam",
        "Stockholm", "Oslo", "Warsaw", "Budapest", "Istanbul", "Mumbai", "Seoul", "Bangkok", "Nairobi",
        "Lima", "Montreal",
    ),
    "person": (
        "Albert Einstein", "Isaac Newton", "Marie Curie", "Charles Darwin", "William Shakespeare",
        "Leonardo da Vinci", "Napoleon Bonaparte", "Abraham Lincoln", "Winston Churchill", "Mahatma Gandhi",
        "Nelson Mandela", "Wolfgang Amadeus Mozart", "Ludwig van Beethoven", "Pablo Picasso", "Vincent van Gogh",
        "Galileo Galilei", "Aristotle", "Plato", "Julius Caesar", "Cleopatra", "Queen Victoria", "Mark Twain",
        "Jane Austen", "Charles Dickens", "Leo Tolstoy", "Barack Obama", "Steve Jobs", "Bill Gates",
        "Elon Musk", "Michael Jordan",
    ),
    "company": (
        "Google", "Microsoft", "Apple", "Amazon", "Facebook", "Toyota", "Samsung", "Sony", "Nokia", "IBM",
        "Intel", "Nike", "Adidas", "Coca-Cola", "Pepsi", "Ford", "BMW", "Honda", "Netflix", "Walmart",
    ),
    "language": (
        "English", "French", "Spanish", "German", "Italian", "Portuguese", "Russian", "Chinese", "Japanese",
        "Arabic", "Hindi", "Korean", "Dutch", "Greek", "Turkish", "Swedish", "Polish", "Latin",
    ),
}  # fmt: skip


def subject_kind(subject: str) -> str | None:
    """The kind whose list holds `subject` (case-insensitive), or None."""
    wanted = subject.strip().casefold()
    for kind, names in SUBJECTS.items():
        if any(name.casefold() == wanted for name in names):
            return kind
    return None


def neighbour_subjects(subject: str, n: int = 14, *, kind: str | None = None, seed: int = 0) -> list[str]:
    """`n` other subjects of `subject`'s kind (or of `kind`), deterministic in `seed`.

    When the subject is in no list and no `kind` is given, subjects of every kind are mixed: the edited
    relation is then asked about unrelated subjects, which still shows an edit that rewrites the
    relation for everyone.
    """
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive int; got {n!r}")
    if kind is not None and kind not in SUBJECTS:
        raise ConfigError(f"unknown subject kind {kind!r}; known: {sorted(SUBJECTS)}")
    chosen = kind or subject_kind(subject)
    pool = list(SUBJECTS[chosen]) if chosen else [s for names in SUBJECTS.values() for s in names]
    pool = [s for s in pool if s.casefold() != subject.strip().casefold()]
    rng = random.Random(f"mechscope-neighbours:{seed}:{subject}")
    return rng.sample(pool, min(n, len(pool)))


__all__ = ["SUBJECTS", "neighbour_subjects", "subject_kind"]
