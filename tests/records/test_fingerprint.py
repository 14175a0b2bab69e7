"""A record tells a ROME-edited model from the original: both the model's fingerprint and the full weight
hash change with the edit and come back with the exact revert."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mechscope import records
from mechscope.steer.editing import EditRequest, ROMEConfig, rome

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "editing"))
from edit_helpers import tiny, tiny_stats

pytestmark = pytest.mark.usefixtures("single_thread")


def test_the_fingerprint_distinguishes_rome_edited_weights_from_the_original(tmp_path):
    model = tiny("gpt2")
    stats = tiny_stats(model, [0], tmp_path / "stats")
    request = EditRequest(prompt="The capital of {}", subject="France", target=" Rome")
    with records.run("original", store=tmp_path / "runs", model=model, model_source="tiny-gpt2") as before:
        pass
    with records.run("rome", store=tmp_path / "runs", model=model, model_source="tiny-gpt2") as edit:
        record = rome(model, request, ROMEConfig(layer=0, steps=10, n_prefixes=0, rounds=1), mom2=stats[0])
        edit.log_model(model, "tiny-gpt2 after ROME")
    with records.run("reverted", store=tmp_path / "runs") as reverted:
        record.revert(model)
        reverted.log_model(model, "tiny-gpt2 reverted")
    store = records.open_store(tmp_path / "runs")
    (original,) = store.get(before.id).models
    at_start, edited = store.get(edit.id).models
    (restored,) = store.get(reverted.id).models
    assert at_start == original  # `model=` is fingerprinted when the run starts, before the edit
    assert edited.fingerprint != original.fingerprint
    assert edited.weights_sha256 != original.weights_sha256
    assert (restored.fingerprint, restored.weights_sha256) == (original.fingerprint, original.weights_sha256)
    comparison = records.compare(store, [before.id, edit.id])
    assert "model[1].fingerprint" in dict(comparison.provenance)


def test_the_weight_hash_sees_an_edit_the_sampled_fingerprint_misses():
    model = tiny("gpt2")
    weight = model.hf_model.transformer.h[0].mlp.c_proj.weight
    fingerprint, full = model.fingerprint(), records.weights_sha256(model.hf_model)
    with torch.no_grad():
        weight.view(-1)[1] += 1.0  # fingerprint() samples a stride of numel // 64 from index 0: 1 is skipped
    assert model.fingerprint() == fingerprint  # documented limit of the sampled fingerprint
    assert records.weights_sha256(model.hf_model) != full
