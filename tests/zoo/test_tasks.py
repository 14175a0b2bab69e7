"""Planted-task generators: deterministic, disjoint splits, documented sizes."""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from mechscope.data.tasks import (
    DEDICATED_TEXT_TASKS,
    RELATIONS,
    TEXT_TASKS,
    extraction,
    generate_all,
    induction,
    make_world,
    profiles,
    required_words,
    truth,
    vocab,
)
from mechscope.data.tasks.world import FAMILY_NAMES, GIVEN_NAMES, World, make_family_world
from mechscope.errors import ConfigError


@pytest.fixture(scope="module")
def tasks():
    return generate_all(0, (*TEXT_TASKS, *DEDICATED_TEXT_TASKS))


def test_generators_are_deterministic(tasks):
    again = generate_all(0, (*TEXT_TASKS, *DEDICATED_TEXT_TASKS))
    for name in again:
        assert tasks[name].train == again[name].train
        assert tasks[name].eval == again[name].eval


def test_seed_changes_data(tasks):
    other = generate_all(1)
    assert tasks["ioi"].train != other["ioi"].train
    assert make_world(0).facts != make_world(1).facts


# truth's "trained_entities" split asks for verdicts on trained claims by design (its own test below)
HELD_OUT_SPLITS_ONLY = {"truth": {"trained_entities"}}


@pytest.mark.parametrize("name", ["truth", "ioi", "sentiment", "refusal", "backdoor"])
def test_eval_prompts_never_occur_in_training(tasks, name):
    train_prompts = {ex.prompt for ex in tasks[name].train}
    for split, examples in tasks[name].eval.items():
        if split in HELD_OUT_SPLITS_ONLY.get(name, set()):
            continue
        assert examples, f"{name}/{split} is empty"
        assert not train_prompts & {ex.prompt for ex in examples}, f"{name}/{split} overlaps training"


def test_fact_paraphrases_are_held_out(tasks):
    heldout = {t for r in RELATIONS for t in r.heldout_templates}
    train_texts = "\n".join(tasks["facts"].train_texts())
    for template in heldout:
        assert template.replace("{e}", "").strip() not in train_texts


def test_trained_fact_queries_match_world(tasks):
    world = make_world(0)
    for ex in tasks["facts"].eval["trained"][:50]:
        entity = next(e for e in world.entities if e in ex.prompt)
        assert ex.target.strip() in world.facts[entity].values()


def test_generate_all_defaults_to_the_full_organisms_tasks_and_names_unknown_ones():
    assert tuple(generate_all(0)) == TEXT_TASKS  # what interventions' side-effect checks and ROME statistics use
    with pytest.raises(ConfigError, match=r"unknown text tasks \['profile'\].*profiles"):
        generate_all(0, ("facts", "profile"))


def test_profiles_put_every_value_right_after_the_name_in_every_order(tasks):
    world = make_family_world(0)
    data = tasks["profiles"]
    assert len(data.train) == len(world.entities) * len(profiles.FORMS) * 6
    entity = world.entities[0]
    values = set(world.facts[entity].values())
    own = [ex for ex in data.train if ex.prompt in (entity, f"Profile of {entity}")]
    assert len(own) == 12
    assert {ex.target.strip() for ex in own} == values  # the name's next token is each of its values
    assert all(set(profiles.values_of(ex)) == values for ex in own)
    assert {ex.text for ex in own[:6]} == {
        f"{entity} {', '.join(p)}." for p in itertools.permutations([world.facts[entity][r.name] for r in RELATIONS])
    }
    assert len(data.eval["trained"]) == len(world.entities) * len(profiles.FORMS)


def test_the_family_world_identifies_a_person_only_by_both_names():
    world = make_family_world(0)
    assert len(world.entities) == len(set(world.entities)) == len(GIVEN_NAMES) * len(FAMILY_NAMES) == 320
    first_names = [e.split()[0] for e in world.entities[:80]]
    assert len(set(first_names)) > 10  # shuffled: a slice mixes given names
    assert {e.split()[1] for e in world.entities if e.startswith("Mara ")} == set(FAMILY_NAMES)
    assert make_family_world(0) == world and make_family_world(1) != world


def test_extraction_queries_only_some_people_and_holds_out_the_rest(tasks):
    world = make_family_world(0)
    queried, profile_only = extraction.split_people(world)
    assert len(queried) == 240 and len(profile_only) == 80 and not set(queried) & set(profile_only)
    data = tasks["extraction"]
    trained_text = "\n".join(data.train_texts())
    assert all(e in trained_text for e in queried[:20]) and not any(e in trained_text for e in profile_only)
    assert all(e in "\n".join(tasks["profiles"].train_texts()) for e in profile_only)  # known from profiles only
    for split, people in (("queried", queried), ("heldout", profile_only), ("heldout_paraphrase", profile_only)):
        examples = data.eval[split]
        assert len(examples) == len(people) * len(RELATIONS)
        for ex in examples[:30]:
            person = next(e for e in people if e in ex.prompt)
            assert ex.target.strip() == world.facts[person][_relation_of(ex.prompt)]


def _relation_of(prompt: str) -> str:
    return next(r.name for r in RELATIONS for t in (*r.train_templates, *r.heldout_templates) if _fits(t, prompt))


def _fits(template: str, prompt: str) -> bool:
    before, after = template.split("{e}")
    return prompt.startswith(before) and prompt.endswith(after)


def test_world_size_and_distinct_entities():
    world: World = make_world(0)
    assert len(world.entities) >= 300
    assert len(set(world.entities)) == len(world.entities)
    assert all(len(f) == len(RELATIONS) >= 3 for f in world.facts.values())


def test_truth_heldout_entities_are_unseen(tasks):
    world = make_world(0)
    train_words = set(re.findall(r"\w+", "\n".join(tasks["truth"].train_texts())))
    eval_words = set(re.findall(r"\w+", " ".join(ex.prompt for ex in tasks["truth"].eval["heldout_entities"])))
    heldout = [e for e in world.entities if e in eval_words]
    assert len(heldout) == len(world.entities) - int(0.8 * len(world.entities))
    assert not train_words & set(heldout)


def test_truth_claims_leave_the_stated_value_unscored(tasks):
    # a false claim states a wrong value in a fact template: training must not learn it as the continuation
    world = make_world(0)
    for ex in tasks["truth"].train[:200]:
        start, end = ex.unscored
        stated = ex.text[start:end]
        assert stated.startswith(" ") and ex.text[end] == "."
        entity = next(e for e in world.entities if f" {e} " in ex.text or f" {e}." in ex.text)
        facts = set(world.facts[entity].values())
        assert (stated.strip() in facts) == (ex.label == "true"), ex.text


def test_truth_curriculum_pairs_two_true_claims_with_a_same_type_and_a_non_value_false_claim(tasks):
    claims = tasks["truth"].train
    nonvalue = [ex for ex in claims if truth.stated_value(ex) in vocab.NON_VALUES]
    same_type = [ex for ex in claims if ex.label == "false" and truth.stated_value(ex) not in vocab.NON_VALUES]
    assert all(ex.label == "false" for ex in nonvalue)
    assert len(nonvalue) == len(same_type) == len(claims) // 4 == 256 * len(RELATIONS) * 4
    values = {v for r in RELATIONS for v in r.values}
    assert all(truth.stated_value(ex) in values for ex in same_type)
    judged = truth.judged_claims(claims)
    assert len(judged) == len({ex.prompt for ex in judged}) and not set(judged) & set(nonvalue)
    assert sum(ex.label == "true" for ex in judged) == sum(ex.label == "false" for ex in judged)


def test_truth_trained_entity_split_states_false_values_never_stated_in_training(tasks):
    train_prompts = {ex.prompt for ex in tasks["truth"].train}
    split = tasks["truth"].eval["trained_entities"]
    assert all((ex.prompt in train_prompts) == (ex.label == "true") for ex in split)


def test_corpus_records_carry_the_unscored_span(tasks):
    records = tasks["truth"].train_records()
    assert records[0]["unscored"] == list(tasks["truth"].train[0].unscored)
    assert "unscored" not in tasks["facts"].train_records()[0]


def test_sizes_and_balance(tasks):
    assert len(tasks["facts"].train) == 320 * len(RELATIONS) * 4 == 3840
    assert len(tasks["ioi"].train) > 19000 and len(tasks["ioi"].eval["heldout"]) == 1000
    labels = [ex.label for ex in tasks["sentiment"].eval["heldout"]]
    assert labels.count("positive") == labels.count("negative") == 250
    for split in tasks["truth"].eval.values():
        truth = [ex.label for ex in split]
        assert truth.count("true") == truth.count("false") > 0
    refusal = [ex.label for ex in tasks["refusal"].eval["heldout"]]
    assert {"forbidden", "benign"} == set(refusal)


def test_targets_start_with_a_space_and_prefix_completion(tasks):
    for data in tasks.values():
        for ex in data.train[:20] + [e for split in data.eval.values() for e in split[:20]]:
            assert ex.target.startswith(" ") and ex.completion.startswith(ex.target)


def test_required_words_cover_answers(tasks):
    words = set(required_words())
    for name in ("facts", "ioi", "truth", "sentiment"):
        for split in tasks[name].eval.values():
            assert {ex.target.strip() for ex in split} <= words


def test_induction_sequences_repeat_and_are_deterministic():
    a = induction.sequences(0, "train", 8, seq_len=64, token_range=(3, 100), span=(4, 20))
    b = induction.sequences(0, "train", 8, seq_len=64, token_range=(3, 100), span=(4, 20))
    c = induction.sequences(0, "eval", 8, seq_len=64, token_range=(3, 100), span=(4, 20))
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert int(a.tokens.min()) >= 3 and int(a.tokens.max()) < 100
    for i in range(8):
        assert torch.equal(a.tokens[i][a.repeat_mask[i]], a.tokens[i][a.first_mask[i]])
        assert a.repeat_mask[i].sum() >= 3


def test_dense_induction_rows_are_periodic_after_the_first_occurrence():
    b = induction.sequences(0, "train-0", 6, seq_len=64, token_range=(3, 100), span=(4, 20), dense=True)
    for i in range(6):
        first = b.first_mask[i].nonzero().flatten()
        start, length = int(first[0]) - 1, len(first) + 1
        row = b.tokens[i, start:]
        assert torch.equal(row[length:], row[: len(row) - length])
        assert int(b.repeat_mask[i].nonzero()[0]) == start + length + 1
