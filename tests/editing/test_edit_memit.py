"""MEMIT on tiny models: only the chosen layers change, the targets move, revert is bit-for-bit."""

from __future__ import annotations

import pytest
import torch
from edit_helpers import tiny, tiny_stats

from mechscope.errors import ConfigError
from mechscope.steer.editing import EditError, EditRequest, MEMITConfig, memit, snapshot
from mechscope.steer.editing.records import equal_to_snapshot

pytestmark = pytest.mark.usefixtures("single_thread")

REQUESTS = [
    EditRequest(prompt="The capital of {}", subject="France", target=" Rome"),
    EditRequest(prompt="A cat sat on the {}", subject="mat", target=" dog"),
]


def _prob(model, text: str, target: str) -> float:
    tid = model.tokenizer(target, add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        return float(model.forward(model.to_tokens(text))[0, -1].softmax(-1)[tid])


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_memit_moves_all_targets_changes_only_its_layers_and_reverts(family, tmp_path):
    model = tiny(family, n_layers=3)
    stats = tiny_stats(model, [0, 1], tmp_path)
    before = snapshot(model)
    p0 = [_prob(model, r.text, r.target) for r in REQUESTS]
    config = MEMITConfig(layers=(0, 1), steps=30, n_prefixes=0, mom2_weight=10.0)
    record = memit(model, REQUESTS, config, mom2=stats)
    p1 = [_prob(model, r.text, r.target) for r in REQUESTS]
    assert all(b > max(0.3, 10 * a) for a, b in zip(p0, p1, strict=True)), (p0, p1)
    names = [f"{model.adapter.layers}.{i}.{model.adapter.mlp_down}.weight" for i in (0, 1)]
    assert sorted(equal_to_snapshot(model, before)) == sorted(names) == record.changed()
    assert record.info["gaps"][-1] < record.info["gaps"][0]  # each layer closes part of the gap
    record.revert(model)
    assert equal_to_snapshot(model, before) == []


def test_memit_bad_input_leaves_model_unmodified(tmp_path):
    model = tiny("gpt2", n_layers=3)
    stats = tiny_stats(model, [0, 1], tmp_path)
    before = snapshot(model)
    with pytest.raises(ConfigError, match="must be followed by another"):
        memit(model, REQUESTS, MEMITConfig(layers=(1, 2)), mom2=stats)
    with pytest.raises(EditError, match="at least one"):
        memit(model, [], MEMITConfig(layers=(0, 1)), mom2=stats)
    nan = {0: stats[0], 1: stats[1].clone().fill_(float("inf"))}
    with pytest.raises(EditError, match="NaN/inf"):
        memit(model, REQUESTS, MEMITConfig(layers=(0, 1), steps=2, n_prefixes=0), mom2=nan)
    with pytest.raises(ConfigError, match="increasing"):
        MEMITConfig(layers=(1, 0))
    assert equal_to_snapshot(model, before) == []


def test_memit_refuses_conflicting_requests_and_degenerate_statistics(tmp_path):
    model = tiny("gpt2", n_layers=3)
    stats = tiny_stats(model, [0, 1], tmp_path)
    before = snapshot(model)
    conflicting = [*REQUESTS, EditRequest(prompt="The capital of {}", subject="France", target=" Paris")]
    with pytest.raises(EditError, match="requests 0 and 2 ask the same prompt"):
        memit(model, conflicting, MEMITConfig(layers=(0, 1)), mom2=stats)
    zero = {0: stats[0], 1: torch.zeros_like(stats[1])}
    with pytest.raises(EditError, match="are all zero"):
        memit(model, REQUESTS, MEMITConfig(layers=(0, 1), steps=2, n_prefixes=0), mom2=zero)
    assert equal_to_snapshot(model, before) == []
