"""ROME and MEMIT on a trained organism: planted facts rewritten, paraphrases and neighbours measured."""

from __future__ import annotations

import pytest

from mechscope.steer.editing import (
    MEMITConfig,
    ROMEConfig,
    StatsConfig,
    edit_metrics,
    memit,
    rome,
    second_moments,
    snapshot,
    world_requests,
)
from mechscope.steer.editing.records import equal_to_snapshot

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

STATS = StatsConfig(n_tokens=8_000, seq_len=64)


@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    from mechscope import load_model

    model = load_model("organism-gpt2")
    cache = tmp_path_factory.mktemp("stats")
    second_moments(model, [0, 1], config=STATS, cache_dir=cache, progress=False)
    return model, cache


def test_rome_rewrites_planted_facts_and_reverts(organism):
    model, cache = organism
    before = snapshot(model)
    requests = world_requests(4, offset=100)
    efficacy, unchanged, para = [], [], []
    for request in requests:
        record = rome(model, request, ROMEConfig(layer=1, steps=30, stats=STATS), cache_dir=cache)
        summary = edit_metrics(model, record=record).summary()
        efficacy.append(summary["efficacy"]["after"])
        unchanged.append(summary["neighbourhood_unchanged"]["after"])
        para.append(summary["paraphrase"]["after"] - summary["paraphrase"]["before"])
        assert summary["efficacy"]["before"] == 0.0  # counterfactual: the model did not say it before
        record.revert(model)
        assert equal_to_snapshot(model, before) == []
    assert sum(efficacy) / len(efficacy) >= 0.9
    assert sum(unchanged) / len(unchanged) >= 0.8
    assert sum(para) / len(para) > 0  # paraphrases move towards the new fact


def test_memit_writes_many_planted_facts_at_once_and_reverts(organism):
    model, cache = organism
    before = snapshot(model)
    requests = world_requests(20, offset=200)
    config = MEMITConfig(layers=(0, 1), steps=25, n_prefixes=2, mom2_weight=1e3, stats=STATS)
    record = memit(model, requests, config, cache_dir=cache)
    summary = edit_metrics(model, record=record).summary()
    assert summary["efficacy"]["before"] <= 0.1  # counterfactual targets (a wrong recall may hit one)
    assert summary["efficacy"]["after"] >= 0.6
    record.revert(model)
    assert equal_to_snapshot(model, before) == []


def test_rome_at_the_early_site_of_organism_facts_rewrites_facts_known_only_from_profiles(tmp_path):
    """organism-facts looks facts up in the subject's early MLPs (docs/locate-patching.md): ROME's layer."""
    from mechscope import load_model
    from mechscope.data.tasks.extraction import split_people
    from mechscope.data.tasks.profiles import people

    model = load_model("organism-facts")
    world = people(0)
    before = snapshot(model)
    offset = len(split_people(world)[0])  # the profile-only people: never queried in training
    requests = world_requests(4, offset=offset, world=world)
    assert all(r.subject in world.entities[offset:] for r in requests)
    efficacy, unchanged, para = [], [], []
    for request in requests:
        record = rome(model, request, ROMEConfig(layer=0, steps=30, stats=STATS), cache_dir=tmp_path)
        summary = edit_metrics(model, record=record).summary()
        assert summary["efficacy"]["before"] == 0.0
        efficacy.append(summary["efficacy"]["after"])
        unchanged.append(summary["neighbourhood_unchanged"]["after"])
        para.append(summary["paraphrase"]["after"] - summary["paraphrase"]["before"])
        record.revert(model)
    assert equal_to_snapshot(model, before) == []
    assert sum(efficacy) / len(efficacy) == 1.0
    assert sum(unchanged) / len(unchanged) >= 0.85  # measured 0.90 (one edit moved 2 of 5 neighbours)
    assert sum(para) / len(para) >= 0.25  # held-out query templates follow the edit (measured +0.5)
