"""Recovery of planted mechanisms on the bundled organisms: induction heads, tuned lens, probes.

Figures measured by these tests are reported in docs/locate-lenses-probes-heads.md.
"""

from __future__ import annotations

import random

import pytest
import torch

import mechscope
from mechscope.data.tasks import induction, make_world, sentiment, truth
from mechscope.locate.heads import ablate_heads, detect_heads, in_context_gain, ordinary_token_range
from mechscope.locate.probes import ProbeConfig, train_probes
from mechscope.locate.tuned_lens import TunedLensConfig, compare_lenses, token_windows, train_tuned_lens, zoo_texts

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


@pytest.fixture(scope="module")
def induction_model():
    return mechscope.load_model("organism-induction")


@pytest.fixture(scope="module")
def gpt2():
    return mechscope.load_model("organism-gpt2")


def test_a_previous_token_head_and_an_induction_head_carry_the_in_context_gain(induction_model):
    model = induction_model
    # held-out repeated spans, shorter than the organism's 64-token training rows (RoPE: any offset)
    batch = induction.sequences(0, "eval", 200, seq_len=32, token_range=ordinary_token_range(model), span=(5, 15))
    scores = detect_heads(model)
    (ind_layer, ind_head, ind_score), (_, _, runner_up) = scores.top("induction", 2)
    assert (ind_layer, ind_head) == scores.top("copying", 1)[0][:2]  # prefix matching and copying agree
    assert ind_score > 5 * runner_up and float(scores["induction_excess"][ind_layer, ind_head]) > 0.5
    prev_layer, prev_head, prev_score = scores.top("previous_token", 1)[0]
    assert prev_layer < ind_layer and prev_score > 0.4  # the head it composes with sits in an earlier layer
    clean = in_context_gain(model, batch.tokens, batch.first_mask, batch.repeat_mask)["gain"]
    assert clean > 2.0
    for mode in ("zero", "mean"):
        with ablate_heads(model, [(ind_layer, ind_head)], mode=mode, reference=batch.tokens[:64]):
            without_induction = in_context_gain(model, batch.tokens, batch.first_mask, batch.repeat_mask)["gain"]
        assert without_induction < 0.1 * clean
        with ablate_heads(model, [(prev_layer, prev_head)], mode=mode, reference=batch.tokens[:64]):
            without_previous = in_context_gain(model, batch.tokens, batch.first_mask, batch.repeat_mask)["gain"]
        assert without_previous < 0.4 * clean  # the induction head needs it (K-composition)


def test_tuned_lens_beats_the_logit_lens_at_early_layers(gpt2):
    lens = train_tuned_lens(
        gpt2, zoo_texts(0), config=TunedLensConfig(steps=40, lr=3e-3, batch_tokens=128, seq_len=32, max_windows=32)
    )
    held_out = token_windows(gpt2, zoo_texts(0, split="eval"), seq_len=32, max_windows=8)
    comparison = compare_lenses(gpt2, held_out, lens)
    logit, tuned = comparison["logit_lens_kl"], comparison["tuned_lens_kl"]
    assert tuned[0] < 0.5 * logit[0]
    assert tuned[1] < logit[1]


def probe_examples(model, fit, test, positive: str):
    """Per-layer logistic probes fitted on `fit` examples' prompts and labels, tested on `test` (3-fold CV)."""
    return train_probes(
        model,
        [e.prompt for e in fit],
        [e.label for e in fit],
        test_inputs=[e.prompt for e in test],
        test_labels=[e.label for e in test],
        positive_label=positive,
        config=ProbeConfig(folds=3),
    )


def test_sentiment_is_linearly_decodable_and_selective(gpt2):
    data = sentiment.generate(0)
    train = random.Random(0).sample(data.train, 300)
    test = random.Random(1).sample(next(iter(data.eval.values())), 200)
    result = probe_examples(gpt2, train, test, positive="positive")
    best = result.best_layer()
    assert result["test_accuracy"][best] >= 0.95
    assert result["control_accuracy"].max() < 0.75
    assert result["selectivity"][best] > 0.25
    direction = result.direction(result.config["layers"][best])
    assert torch.isfinite(direction).all()


@pytest.mark.parametrize("name", ["organism-gpt2", "organism-llama"])
def test_truth_is_linearly_decodable_on_claims_about_entities_the_probe_never_saw(name):
    # the probe is fitted on claims about some truth-training entities and tested on claims about the others
    # (the trained_entities split: the true claims are ones the model was trained on, the false ones state
    # values never stated for that fact); the non-value curriculum claims are left out of the probe's data
    model = mechscope.load_model(name)
    data = truth.generate(0)
    world = make_world(0)
    probe_entities = set(world.entities[:160])

    def about(ex, entities) -> bool:
        return any(f" {e} " in ex.prompt or f" {e}." in ex.prompt for e in entities)

    fit = random.Random(0).sample([e for e in truth.judged_claims(data.train) if about(e, probe_entities)], 600)
    test = [e for e in data.eval["trained_entities"] if not about(e, probe_entities)]
    assert len(test) >= 500 and {e.label for e in test} == {"true", "false"}
    result = probe_examples(model, fit, test, positive="true")
    best = result.best_layer()
    assert result["test_accuracy"][best] >= 0.9
    assert result["selectivity"][best] > 0.3
