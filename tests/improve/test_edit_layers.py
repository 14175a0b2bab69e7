"""Editing cost by layer: ROME at each layer a trace points to, measured on neighbours, and reverted."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import ConfigError
from mechscope.improve.edit_layers import COST_METRICS, EditCostResult, candidate_layers, edit_cost_by_layer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    from mechscope import load_model
    from mechscope.steer.editing import StatsConfig, second_moments

    model = load_model("organism-gpt2")
    cache = tmp_path_factory.mktemp("stats")
    stats = StatsConfig(n_tokens=8_000, seq_len=64)
    mom2 = second_moments(model, range(model.dims.n_layers), config=stats, cache_dir=cache, progress=False)
    return model, mom2


def test_edit_cost_measures_each_layer_and_leaves_the_model_exactly_as_it_was(organism):
    from mechscope.steer.editing import ROMEConfig, snapshot, world_requests
    from mechscope.steer.editing.records import equal_to_snapshot

    model, mom2 = organism
    request = world_requests(1, offset=100)[0]
    before = snapshot(model)
    cost = edit_cost_by_layer(model, request, [0, 1, 2], config=ROMEConfig(steps=30), mom2=mom2)
    assert equal_to_snapshot(model, before) == []
    assert cost.tensors["cost"].shape == (3, len(COST_METRICS))
    efficacy = cost.column("efficacy")
    assert max(efficacy.values()) == 1.0  # the counterfactual is written somewhere in the range
    # Neighbours are the request's own (the organism's world), answered by the unedited model.
    assert cost.config["n_neighbours"] == len(request.neighbours) > 0
    best = cost.best()
    assert best is not None and efficacy[best] == 1.0
    to_target = cost.column("neighbourhood_to_target")
    assert to_target[best] == min(to_target[layer] for layer, e in efficacy.items() if e == 1.0)
    # Measured like a single edit at that layer, then reverted.
    from mechscope.steer.editing import edit_metrics, rome

    record = rome(model, request, ROMEConfig(steps=30, layer=best), mom2=mom2[best])
    single = edit_metrics(model, record=record).summary()
    record.revert(model)
    assert single["neighbourhood_unchanged"]["after"] == pytest.approx(cost.column("neighbourhood_unchanged")[best])
    assert "least collateral damage" in cost.table()


def test_edit_cost_result_saves_and_loads(organism, tmp_path):
    from mechscope.steer.editing import ROMEConfig, world_requests

    model, mom2 = organism
    cost = edit_cost_by_layer(model, world_requests(1, offset=101)[0], [1], config=ROMEConfig(steps=20), mom2=mom2)
    loaded = EditCostResult.load(cost.save(tmp_path / "cost.safetensors"))
    assert torch.equal(loaded.tensors["cost"], cost.tensors["cost"])
    assert loaded.best() == cost.best()


def test_best_prefers_successful_edits_with_the_least_neighbourhood_damage():
    rows = {
        # layer: efficacy, p, paraphrase, kept, to_target, kl, rounds
        0: [1.0, 0.9, 1.0, 0.1, 0.8, 2.0, 1],
        1: [1.0, 0.9, 1.0, 0.9, 0.0, 0.1, 1],
        2: [0.0, 0.1, 0.0, 1.0, 0.0, 0.0, 2],  # no damage, but the edit failed
        3: [1.0, 0.9, 1.0, 0.9, 0.0, 0.3, 1],
    }
    cost = EditCostResult(
        tensors={"cost": torch.tensor(list(rows.values()))},
        axes={"cost": ("layer", "metric")},
        labels={"layer": [str(k) for k in rows], "metric": list(COST_METRICS)},
    )
    assert cost.best() == 1
    assert cost.best(min_efficacy=1.1) is None
    with pytest.raises(ConfigError, match="unknown edit-cost metric 'nope'"):
        cost.column("nope")


def test_candidate_layers_span_the_peak_uncertainty_with_a_margin(organism):
    from mechscope.locate.causal_tracing import TracingConfig, causal_trace

    model, _ = organism
    trace = causal_trace(model, "Vouldeis lives in", "Vouldeis", None, TracingConfig(samples=4, kinds=("mlp",)))
    estimate = trace.peak_estimate("mlp", [max(trace.config["subject_positions"])])
    layers = candidate_layers(trace, margin=1)
    assert set(estimate.layers) - {model.dims.n_layers - 1} <= set(layers)
    assert layers == list(
        range(max(0, min(estimate.layers) - 1), min(model.dims.n_layers - 2, max(estimate.layers) + 1) + 1)
    )
    with pytest.raises(ConfigError, match="no 'attn' kind"):
        candidate_layers(trace, kind="attn")


def test_edit_cost_refuses_layers_outside_the_model(organism):
    from mechscope.steer.editing import world_requests

    model, _ = organism
    with pytest.raises(ConfigError, match=r"layers must be in 0\.\.2 .* got \[3, 7\]"):
        edit_cost_by_layer(model, world_requests(1)[0], [1, 3, 7])
