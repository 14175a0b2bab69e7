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
