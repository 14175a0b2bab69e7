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
