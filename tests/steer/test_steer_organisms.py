"""Acceptance on the bundled organism: the refusal direction and the sentiment vector.

Figures in docs/steer.md; these tests pin them with margins. Candidate grids are kept small for
speed (docs/steer.md reports the full grid: layers 0-3 x positions -1..-5).
"""

from __future__ import annotations

import pytest
import torch

from mechscope.data.contrasts import contrast_texts, retain_texts
from mechscope.data.tasks import generate_all, refusal
from mechscope.data.tasks.metrics import accuracy
from mechscope.improve import EvaluationConfig, SentimentTask, evaluate, zoo_metrics
from mechscope.locate.probes import ProbeConfig, fit_probe
from mechscope.model.hooked import HookedModel
from mechscope.model.loading import load_model
from mechscope.sites import Site
from mechscope.steer import (
    DirectionSelectionConfig,
    directional_ablation,
    from_direction,
    logodds_bar,
    mean_difference,
    orthogonalize,
    read_activations,
    select_direction,
    steer,
    token_logodds,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

SIDE_TASKS = ("sentiment", "backdoor")


def _facts_sample(model: HookedModel) -> float:
    """Accuracy on every 3rd trained fact (320 of 960; docs/steer.md reports all of them)."""
    data = generate_all(0)["facts"].eval["trained"][::3]
    return accuracy(model.hf_model, model.tokenizer, data)


@pytest.fixture(scope="module")
def organism() -> HookedModel:
    return load_model("organism-gpt2")


@pytest.fixture(scope="module")
def refusal_direction(organism: HookedModel):
    forbidden, benign = contrast_texts("refusal", n=48)
    cfg = DirectionSelectionConfig(
        positions=(-1, -2, -3, -4, -5),
        max_kl=0.1,
        require_induction="prefer",
        max_ablation_score=logodds_bar(0.1),
        max_rank=4,
    )
    score = token_logodds(organism.to_single_token(" Sorry"))
    selection = select_direction(organism, forbidden, benign, score, cfg, retain=retain_texts(n_per_task=32))
    return selection


def test_removing_the_refusal_direction_removes_refusal_and_spares_benign_tasks(
    organism: HookedModel, refusal_direction
) -> None:
    direction = refusal_direction.direction(organism)
    data = refusal.generate(0)
    before = refusal.evaluate(organism.hf_model, organism.tokenizer, data)
    before.update(zoo_metrics(organism, SIDE_TASKS), facts=_facts_sample(organism))
    with torch.no_grad(), directional_ablation(organism, direction):
        after = refusal.evaluate(organism.hf_model, organism.tokenizer, data)
        after.update(zoo_metrics(organism, SIDE_TASKS), facts=_facts_sample(organism))
    assert before["refusal_forbidden"] == 1.0
    assert after["refusal_forbidden"] <= 0.10
    for name in before:
        if name != "refusal_forbidden":
            assert abs(after[name] - before[name]) <= 0.05, (name, before[name], after[name])
    ortho = orthogonalize(organism, direction)  # the permanent version behaves the same
    with torch.no_grad():
        assert refusal.evaluate(ortho.hf_model, ortho.tokenizer, data) == pytest.approx(
            {k: after[k] for k in ("refusal_forbidden", "refusal_benign")}
        )


def test_sentiment_vector_flips_most_continuations_with_small_neutral_kl(organism: HookedModel) -> None:
    negative_reviews, positive_reviews = contrast_texts("sentiment", n=32)
    vector = mean_difference(organism, negative_reviews, positive_reviews, layers=3)
    cfg = EvaluationConfig(side_tasks=(), max_new_tokens=8)
    result = evaluate(organism, steer(organism, vector, 0.7), SentimentTask(n_eval=100, n_samples=4), cfg)
    assert result.before("flip_rate") == 0.0
    assert result.after("flip_rate") >= 0.8
    assert result.before("continuation_flip_rate") == 0.0
    assert result.after("continuation_flip_rate") >= 0.8  # most generated continuations turn negative
    assert result.after("kl_neutral") <= 0.2  # v4: 0.161 (docs/steer.md)
    flipped = [s for s in result.config["samples"] if " awful" in s["after"] and " great" in s["before"]]
    assert len(flipped) >= 3


def test_a_probe_direction_from_locate_steers_sentiment(organism: HookedModel) -> None:
    """Locate -> Steer: a logistic probe separating negative from positive reviews at layer 3 gives a
    direction that, as a unit steering vector, flips the verdicts."""
    negative_reviews, positive_reviews = contrast_texts("sentiment", n=32)
    site = Site("hook_resid_pre", 3)
    feats = read_activations(organism, negative_reviews + positive_reviews, [site])[site]
    labels = torch.tensor([1] * len(negative_reviews) + [0] * len(positive_reviews))
    probe = fit_probe(feats, labels, ProbeConfig(kind="logistic"))
    assert probe.accuracy(feats, labels) == 1.0
    vector = from_direction(organism, probe.weight, layers=3, normalize=True)
    cfg = EvaluationConfig(side_tasks=(), max_new_tokens=8)
    task = SentimentTask(n_eval=100, n_samples=2, n_continuations=8)
    assert evaluate(organism, steer(organism, vector, 2.0), task, cfg).after("flip_rate") <= 0.05
    assert evaluate(organism, steer(organism, vector, 20.0), task, cfg).after("flip_rate") >= 0.8
