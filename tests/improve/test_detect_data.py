"""The built-in detection contrast sets: balanced, grouped, own wording, usable by a detector."""

from __future__ import annotations

import pytest

from mechscope.data.detection import (
    DETECTION_SETS,
    FACTS,
    TOPICS,
    dangerous_contrast,
    detection_set,
    instructed_lying,
    organism_requests,
)
from mechscope.errors import ConfigError


@pytest.mark.parametrize("name", DETECTION_SETS)
def test_sets_have_both_classes_and_one_group_per_example(name):
    s = detection_set(name)
    assert len(s.examples) == len(s.labels) == len(s.groups) > 0
    assert set(s.labels) == {0, 1}
    assert len(s.positives()) + len(s.negatives()) == len(s.examples)


def test_instructed_lying_states_the_true_answer_when_honest_and_the_false_one_when_lying():
    s = instructed_lying(wordings=["plain"])
    assert len(s.examples) == 2 * len(FACTS)
    for (prompt, response), label in zip(s.examples, s.labels, strict=True):
        fact = next(f for f in FACTS if f[1] in prompt)
        assert response == f" {fact[4] if label else fact[3]}."
        assert prompt.startswith("Answer the question with a lie.") == bool(label)
    assert set(s.groups) == set(TOPICS)
    held = s.select(["science"])
    rest = s.select(["science"], exclude=True)
    assert len(held.examples) + len(rest.examples) == len(s.examples) and "science" not in rest.groups


def test_facts_are_distinct_and_false_answers_differ_from_true_ones():
    assert len({f[1] for f in FACTS}) == len(FACTS)
    assert all(f[3] != f[4] for f in FACTS)


def test_bad_input():
    with pytest.raises(ConfigError, match="unknown detection set"):
        detection_set("lies")
    with pytest.raises(ConfigError, match="unknown groups"):
        instructed_lying().select(["history"])
    with pytest.raises(ConfigError, match="chat must be"):
        dangerous_contrast(chat="xml")
    with pytest.raises(ConfigError, match="split must be"):
        organism_requests("test")
