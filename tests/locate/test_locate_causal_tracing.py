"""Causal tracing: restoring the final state recovers the clean run, earlier positions do nothing,
batched == loop, position classes, errors."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import ConfigError
from mechscope.locate.causal_tracing import (
    SUBJECT_CLASSES,
    TracingConfig,
    TracingResult,
    TracingSummary,
    causal_trace,
    position_classes,
    trace_facts,
)
from mechscope.model.hooked import HookedModel
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = "The capital of France is Paris, and the capital of Italy is"


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return HookedModel(*tiny_model(request.param))


def test_restorations_match_their_definition(model, tmp_path):
    cfg = TracingConfig(samples=3, noise=5.0)
    result = causal_trace(model, PROMPT, "Italy", config=cfg)
    subject = result.config["subject_positions"]
    assert subject == model.find_positions(PROMPT, "Italy")
    assert float(result["clean"]) != pytest.approx(float(result["corrupt"]))
    last = model.dims.n_layers - 1
    # The last layer's residual at the last position determines the prediction: full recovery.
    torch.testing.assert_close(result["resid"][last, -1], result["clean"], rtol=0, atol=1e-5)
    # Before the subject nothing was corrupted: restoring there changes nothing.
    before = list(range(min(subject)))
    for kind in ("resid", "mlp", "attn"):
        torch.testing.assert_close(result.effect(kind)[:, before], torch.zeros(model.dims.n_layers, len(before)))
    layer, pos, value = result.peak("resid")
    assert value == pytest.approx(float(result.effect("resid").max())) == float(result.effect("resid")[layer, pos])
    # restricted to the subject's last token: the best layer there, at that position
    layer, pos, value = result.peak("mlp", [max(subject)])
    assert pos == max(subject) and value == float(result.effect("mlp")[:, pos].max())
    assert result.peak("mlp", [-1])[1] == result.effect("mlp").shape[1] - 1
    with pytest.raises(ConfigError, match=r"expected positions within 0\.\.\d+.*got \[99\]"):
        result.peak("mlp", [99])
    back = TracingResult.load(result.save(tmp_path / "trace.safetensors"))
    torch.testing.assert_close(back["mlp"], result["mlp"])


def test_batched_equals_loop(model):
    cfg = TracingConfig(samples=2, window=2)
    batched = causal_trace(model, PROMPT, "Italy", config=cfg)
    loop = causal_trace(model, PROMPT, "Italy", config=TracingConfig(samples=2, window=2, method="loop"))
    for kind in ("resid", "mlp", "attn"):
        torch.testing.assert_close(batched[kind], loop[kind], rtol=1e-5, atol=1e-6)
    assert batched.config["window"] == 2


def test_noise_is_reproducible_and_scales(model):
    a = causal_trace(model, PROMPT, [10, 11], target=5, config=TracingConfig(samples=2, kinds=("resid",)))
    b = causal_trace(model, PROMPT, [10, 11], target=5, config=TracingConfig(samples=2, kinds=("resid",)))
    torch.testing.assert_close(a["resid"], b["resid"], rtol=0, atol=0)
    assert set(a.tensors) == {"resid", "resid_samples", "clean", "corrupt", "corrupt_samples"}
    assert a.config["target"] == 5


def test_position_classes_follow_rome():
    assert position_classes([2, 3, 4], 8) == [
        "before",
        "before",
        "first_subject",
        "middle_subject",
        "last_subject",
        "first_after",
        "further",
        "last",
    ]
    assert position_classes([1], 3) == ["before", "last_subject", "last"]


def test_trace_facts_averages_by_position_class(model):
    prompts = [PROMPT, "The Eiffel Tower is in"]
    summary = trace_facts(model, prompts, ["Italy", "Eiffel"], config=TracingConfig(samples=2, kinds=("mlp",)))
    assert isinstance(summary, TracingSummary) and summary["mlp"].shape == (model.dims.n_layers, 6)
    expected = torch.zeros(6)
    for prompt, subject in zip(prompts, ["Italy", "Eiffel"]):
        n_pos = model.to_tokens(prompt)["input_ids"].shape[1]
        classes = set(position_classes(model.find_positions(prompt, subject), n_pos))
        expected += torch.tensor([float(c in classes) for c in summary.labels["position_class"]])
    torch.testing.assert_close(summary["count"], expected)
    assert (
        torch.isnan(summary["mlp"][:, expected == 0]).all() and not torch.isnan(summary["mlp"][:, expected > 0]).any()
    )
    assert summary.peak("mlp")[1] in summary.labels["position_class"]
    layer, where, effect = summary.peak("mlp", SUBJECT_CLASSES)
    assert 0 <= layer < model.dims.n_layers
    column = summary.labels["position_class"].index(where)
    assert where in SUBJECT_CLASSES and effect == float(torch.nan_to_num(summary["mlp"][:, column], nan=-1).max())
    with pytest.raises(ConfigError, match=r"expected position classes from .* got \['subject'\]"):
        summary.peak("mlp", ["subject"])


def test_bad_input_fails_clearly(model):
    with pytest.raises(ConfigError, match="not found"):
        causal_trace(model, PROMPT, "Spain")
    with pytest.raises(ConfigError, match="subject positions"):
        causal_trace(model, PROMPT, [99])
    with pytest.raises(ConfigError, match="noise"):
        TracingConfig(noise=0)
    with pytest.raises(ConfigError, match="kinds"):
        TracingConfig(kinds=("embed",))
    with pytest.raises(ConfigError, match="equal lengths"):
        trace_facts(model, [PROMPT], ["Italy", "France"])


def test_window_is_cut_at_the_ends_so_no_two_rows_restore_the_same_layers():
    """On a 30-layer model the default window is 6 layers; a window shifted to fit at the ends made
    rows 0-3 restore the same 6 layers (identical rows, and a peak at layer 0 by construction)."""
    from mechscope.locate.causal_tracing import _window, default_window

    assert default_window(30) == 6 and default_window(48) == 9 and default_window(2) == 1
    for n_layers in (2, 6, 12, 30):
        window = default_window(n_layers)
        sets = [tuple(_window(layer, window, n_layers)) for layer in range(n_layers)]
        assert len(set(sets)) == n_layers, sets  # every row restores its own set of layers
        for layer, chosen in enumerate(sets):
            assert layer in chosen and len(chosen) <= window and chosen == tuple(range(chosen[0], chosen[-1] + 1))
            if window // 2 <= layer < n_layers - (window - window // 2):
                assert len(chosen) == window  # away from the ends: the full window, centred
    hf, tok = tiny_model("llama", num_hidden_layers=30)
    deep = HookedModel(hf, tok)
    result = causal_trace(deep, PROMPT, "Italy", config=TracingConfig(samples=2, kinds=("mlp",)))
    assert result.config["window"] == 6 and result.config["windows"]["0"] == [0, 1, 2]
    rows = result["mlp"][:4]
    assert all(not torch.equal(rows[i], rows[i + 1]) for i in range(3)), rows


def test_peak_estimate_reports_its_uncertainty_over_noise_draws_and_prompts(model):
    cfg = TracingConfig(samples=6, noise=5.0)
    result = causal_trace(model, PROMPT, "Italy", config=cfg)
    samples = result["mlp_samples"]
    assert samples.shape == (*result["mlp"].shape, 6)
    torch.testing.assert_close(samples.mean(-1), result["mlp"])
    torch.testing.assert_close(result["corrupt_samples"].mean(), result["corrupt"])
    subject = result.config["subject_positions"]
    for positions in (None, [max(subject)]):
        est = result.peak_estimate("mlp", positions, n_boot=200)
        layer, pos, value = result.peak("mlp", positions)
        assert (est.layer, est.position) == (layer, pos) and est.effect == pytest.approx(value, abs=1e-6)
        draws = samples[layer, pos] - result["corrupt_samples"]
        assert est.stderr == pytest.approx(float(draws.double().std() / 6**0.5), rel=1e-5)
        assert est.layer in est.layers and 0.0 < est.frequency <= 1.0 and est.n == 6
        assert f"layer {est.layer}" in est.describe() and "+-" in est.describe()
    # One draw: no spread to measure; the peak alone, found in every resample.
    single = causal_trace(model, PROMPT, "Italy", config=TracingConfig(samples=1)).peak_estimate("resid")
    assert single.stderr == 0.0 and single.frequency == 1.0
    prompts = [PROMPT, "The capital of Germany is Berlin, and the capital of Spain is"]
    summary = trace_facts(model, prompts, ["Italy", "Spain"], config=TracingConfig(samples=2))
    est = summary.peak_estimate("mlp", SUBJECT_CLASSES, n_boot=100)
    layer, cls, value = summary.peak("mlp", SUBJECT_CLASSES)
    assert (est.layer, est.position) == (layer, cls) and est.effect == pytest.approx(value, abs=1e-6)
    assert est.n == int(summary["count"][list(summary.labels["position_class"]).index(cls)])


def test_cli_trace_reports_the_peak_with_its_uncertainty_and_the_editing_check(tmp_path):
    from typer.testing import CliRunner

    from mechscope.cli.main import app

    hf, tok = tiny_model("llama")
    folder = tmp_path / "model"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    args = ["locate", "trace", str(folder), "-p", PROMPT, "-s", "Italy", "--samples", "4", "-q"]
    out = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "t.safetensors")])
    assert out.exit_code == 0, out.output
    assert out.output.count("over 4 noise draws; peak in") == 3 and "within 2 s.e." in out.output
    assert "--edit-target" in out.output and "neighbourhood cost" in out.output


def test_cli_trace_measures_the_editing_cost_at_each_candidate_layer(tmp_path, monkeypatch):
    """21.5: the trace's MLP range becomes ROME edits measured on neighbours, then reverted (model unchanged)."""
    from typer.testing import CliRunner

    from mechscope.cli.main import app
    from mechscope.improve.edit_layers import EditCostResult

    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    hf, tok = tiny_model("llama")
    folder = tmp_path / "model"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    args = ["locate", "trace", str(folder), "-p", PROMPT, "-s", "Italy", "--samples", "2", "-q"]
    args += ["--edit-target", " Rome", "--stats-tokens", "2000", "-o", str(tmp_path / "t.safetensors")]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "cost of a ROME edit to ' Rome' by layer" in out.output and "nbr->tgt" in out.output
    cost = EditCostResult.load(tmp_path / "t-edit-cost.safetensors")
    assert cost.config["request"]["prompt"] == PROMPT.replace("Italy", "{}")
    assert cost.config["n_neighbours"] > 0  # other countries under the same relation
    best = cost.best()
    assert (f"edit at layer {best}" if best is not None else "did not succeed") in out.output
    bad_args = ["locate", "trace", str(folder), "-p", PROMPT, "-s", "capital", "--edit-target", " X"]
    bad = CliRunner().invoke(app, bad_args)
    assert bad.exit_code == 2 and "needs the subject 'capital' once in the prompt" in bad.output
