"""ROME: the rank-one update's definition, exact revert, target moved and controls kept, bad input."""

from __future__ import annotations

import pytest
import torch
from edit_helpers import tiny, tiny_stats

from mechscope.steer.editing import EditError, EditRecord, EditRequest, ROMEConfig, rome, snapshot
from mechscope.steer.editing.records import equal_to_snapshot, mlp_out_weight
from mechscope.steer.editing.rome import solve_inverse
from tiny_models import FAMILIES

pytestmark = pytest.mark.usefixtures("single_thread")

REQUEST = EditRequest(prompt="The capital of {}", subject="France", target=" Rome")
CONTROLS = ("The capital of Italy", "A cat sat on the mat", "One two three")
FAST = ROMEConfig(layer=0, steps=30, n_prefixes=0, rounds=3)
ONE_ROUND = ROMEConfig(layer=0, steps=30, n_prefixes=0, rounds=1)


def _next_probs(model, text: str) -> torch.Tensor:
    with torch.no_grad():
        return model.forward(model.to_tokens(text))[0, -1].softmax(-1)


def _key(model, text: str, layer: int = 0) -> torch.Tensor:
    site = f"blocks.{layer}.mlp.hook_post"
    _, cache = model.run_with_cache(model.to_tokens(text), [site])
    return cache[site][0, -1]


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # Conv1D [in, out] and nn.Linear [out, in]
def test_rome_edits_target_keeps_controls_and_reverts_bit_for_bit(family, tmp_path):
    model = tiny(family)
    stats = tiny_stats(model, [0], tmp_path)
    before = snapshot(model)
    target = model.tokenizer(" Rome", add_special_tokens=False)["input_ids"][0]
    p_target = _next_probs(model, REQUEST.text)[target]
    record = rome(model, REQUEST, FAST, mom2=stats[0])
    assert _next_probs(model, REQUEST.text)[target] > max(0.5, 10 * p_target)  # the target moved
    assert record.changed() == [f"{model.adapter.layers}.0.{model.adapter.mlp_down}.weight"]
    assert equal_to_snapshot(model, before) == record.changed()  # nothing else moved
    record.revert(model)
    assert equal_to_snapshot(model, before) == []  # every parameter bit for bit (torch.equal)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rome_update_is_the_rank_one_least_squares_solution(family, tmp_path):
    """Definition: W' - W = delta (C^-1 k*)^T / (k*^T C^-1 k*). So it has rank one, and any other key k
    (a control subject) has its value moved by exactly (k^T C^-1 k*) / (k*^T C^-1 k*) times delta."""
    model = tiny(family)
    stats = tiny_stats(model, [0], tmp_path)
    w0 = mlp_out_weight(model, 0).detach().clone()
    rome(model, REQUEST, ONE_ROUND, mom2=stats[0])
    diff = (mlp_out_weight(model, 0).detach() - w0).double()
    s = torch.linalg.svdvals(diff)
    assert s[0] > 0 and s[1] / s[0] < 1e-5
    k_star = _key(model, REQUEST.text).double()  # n_prefixes=0: the key is the prompt's own
    c_inv_k = solve_inverse(stats[0], k_star[None], ONE_ROUND.ridge)[0]
    delta = diff @ k_star
    for control in CONTROLS:
        k = _key(model, control).double()
        expected = delta * float(c_inv_k @ k) / float(c_inv_k @ k_star)
        torch.testing.assert_close(diff @ k, expected, rtol=1e-4, atol=1e-5)


def test_record_save_load_apply_round_trip(tmp_path):
    model = tiny("gpt2")
    stats = tiny_stats(model, [0], tmp_path)
    original = snapshot(model)
    record = rome(model, REQUEST, FAST, mom2=stats[0])
    edited = snapshot(model)
    path = record.save(tmp_path / "edit.safetensors")
    loaded = EditRecord.load(path)
    assert loaded.requests == [REQUEST] and loaded.method == "rome" and loaded.info["layer"] == 0
    loaded.revert(model)
    assert equal_to_snapshot(model, original) == []
    loaded.apply(model)
    assert equal_to_snapshot(model, edited) == []
    loaded.revert(model)
    with pytest.raises(EditError, match="not those this edit left"):
        loaded.revert(model)  # already reverted: refuses instead of silently doing nothing


def test_bad_requests_raise_and_leave_model_unmodified(tmp_path):
    model = tiny("gpt2")
    stats = tiny_stats(model, [0], tmp_path)
    before = snapshot(model)
    with pytest.raises(EditError, match="'Germany' is not in the prompt"):
        rome(model, EditRequest(prompt="The capital of France", subject="Germany", target=" Rome"), FAST)
    assert EditRequest(prompt="The capital of France", subject="France", target=" Rome") == REQUEST
    with pytest.raises(EditError, match="exactly one"):
        EditRequest(prompt="{} and {} are", subject="France", target=" Rome")
    with pytest.raises(EditError, match="non-empty target"):
        EditRequest(prompt="The capital of {} is", subject="France", target="  ")
    with pytest.raises(EditError, match="tokenises to no tokens"):
        from mechscope.steer.editing.requests import target_ids

        target_ids(model.tokenizer, "")
    nan_stats = stats[0].clone()
    nan_stats[3, 5] = float("nan")
    with pytest.raises(EditError, match="NaN"):
        rome(model, REQUEST, FAST, mom2=nan_stats)
    with pytest.raises(EditError, match=r"\[d_mlp, d_mlp\]"):
        rome(model, REQUEST, FAST, mom2=stats[0][:4, :4])
    assert equal_to_snapshot(model, before) == []


def test_edit_metrics_before_after_and_model_left_edited(tmp_path):
    from mechscope.locate.results import Result
    from mechscope.steer.editing import EditMetrics, edit_metrics

    model = tiny("gpt2")
    stats = tiny_stats(model, [0], tmp_path)
    request = EditRequest(
        prompt="The capital of {}",
        subject="France",
        target=" Rome",
        paraphrases=("Hello world! The capital of France",),
        neighbours=(("The capital of Italy", " is"),),
    )
    record = rome(model, request, FAST, mom2=stats[0])
    edited = snapshot(model)
    metrics = edit_metrics(model, record=record)
    assert equal_to_snapshot(model, edited) == []  # measured before and after, left edited
    summary = metrics.summary()
    assert summary["efficacy"] == {"before": 0.0, "after": 1.0}
    assert summary["neighbourhood_unchanged"]["before"] == 1.0
    assert metrics.labels == {"request": ["France:Rome"], "state": ["before", "after"]}
    loaded = Result.load(metrics.save(tmp_path / "m.safetensors"))
    assert isinstance(loaded, EditMetrics) and loaded.summary() == summary
    metrics.plot()
    current = edit_metrics(model, [request])
    assert current.labels["state"] == ["current"] and current.summary()["efficacy"]["current"] == 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_rome_and_revert_on_every_family(family, tmp_path):
    """Every adapter's MLP output projection (Conv1D, Linear, gated, fused, post-norm, parallel) edits
    exactly one weight, makes W' k* = W k* + delta hold, and reverts bit for bit."""
    model = tiny(family)
    stats = tiny_stats(model, [0], tmp_path)
    before = snapshot(model)
    w0 = mlp_out_weight(model, 0).detach().clone()
    record = rome(model, REQUEST, ROMEConfig(layer=0, steps=3, n_prefixes=0, rounds=1), mom2=stats[0])
    assert record.changed() == [f"{model.adapter.layers}.0.{model.adapter.mlp_down}.weight"]
    s = torch.linalg.svdvals((mlp_out_weight(model, 0).detach() - w0).double())
    assert s[0] > 0 and s[1] / s[0] < 1e-5  # rank one up to float32 rounding
    record.revert(model)
    assert equal_to_snapshot(model, before) == []
