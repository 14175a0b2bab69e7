"""Trait vectors: projection before generation, its correlation with expression, steering curves."""

from __future__ import annotations

import random

import pytest
import torch

from mechscope.errors import ConfigError
from mechscope.model.hooked import HookedModel
from mechscope.steer.traits import TraitResult, pearson, trait_projection, trait_report, trait_vector
from mechscope.steer.vectors import read_activations
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

POS = ["the cat sat on the mat", "a cat looked at the dog", "the cat is in Paris"]
NEG = ["we read a good book", "one two three four five", "hello world this is"]
PROMPTS = ["the cat", "a dog ran", "one two three", "hello world", "the quick brown fox"]


@pytest.fixture(scope="module")
def model() -> HookedModel:
    return HookedModel(*tiny_model("llama"))


def _expression(model: HookedModel, prompts: list[str]) -> torch.Tensor:
    logits = model.forward(model.to_tokens(prompts, padding_side="left"))[:, -1]
    return logits.log_softmax(-1)[:, 5]


def test_projection_and_report_follow_their_definitions(model: HookedModel) -> None:
    vec = trait_vector(model, POS, NEG, layer=1)
    assert vec.method == "trait" and vec.layers == [1]
    proj = trait_projection(model, vec, PROMPTS)
    site = model.site("blocks.1.hook_resid_pre")
    acts = read_activations(model, PROMPTS, [site])[site]
    unit = vec.at(1) / vec.at(1).norm()
    assert torch.allclose(proj, acts @ unit, atol=1e-5)
    result = trait_report(model, vec, PROMPTS, _expression, coefficients=(-2.0, 0.0, 2.0))
    assert isinstance(result, TraitResult)
    with torch.no_grad():
        plain = _expression(model, PROMPTS)
    assert float(result["steered"][1]) == pytest.approx(float(plain.mean()), abs=1e-6)  # coefficient 0
    assert result.correlation == pytest.approx(pearson(proj, plain), abs=1e-9)
    x, y = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.5])
    assert pearson(x, y) == pytest.approx(float(torch.corrcoef(torch.stack([x, y]))[0, 1]), abs=1e-6)


def test_trait_bad_input(model: HookedModel) -> None:
    vec = trait_vector(model, POS, NEG, layer=1)
    with pytest.raises(ConfigError, match="at least 3 prompts"):
        trait_report(model, vec, PROMPTS[:2], _expression)
    with pytest.raises(ConfigError, match="finite"):
        trait_report(model, vec, PROMPTS, _expression, coefficients=(float("inf"),))
    with pytest.raises(ConfigError, match="one score per prompt"):
        trait_report(model, vec, PROMPTS, lambda m, p: torch.zeros(2))


@pytest.mark.slow
def test_a_negativity_trait_predicts_and_steers_the_organism_verdict() -> None:
    import mechscope as ms
    from mechscope.data.tasks import vocab

    organism = ms.load_model("organism-gpt2")
    rng = random.Random(0)

    def review(n_negative: int) -> str:
        item = rng.choice(vocab.REVIEW_ITEMS)
        sentences = rng.sample(vocab.NEGATIVE_SENTENCES, n_negative) + rng.sample(
            vocab.POSITIVE_SENTENCES, 3 - n_negative
        )
        rng.shuffle(sentences)
        return f"Review of the {item}: {' '.join(s.format(item=item) for s in sentences)} Overall, it was"

    negative_reviews = [review(3) for _ in range(12)]
    positive_reviews = [review(0) for _ in range(12)]
    vec = trait_vector(organism, negative_reviews, positive_reviews, layer=2)
    mixed = [review(k) for k in (0, 1, 2, 3) for _ in range(6)]
    awful, great = organism.to_single_token(" awful"), organism.to_single_token(" great")

    def negativity(model: HookedModel, prompts: list[str]) -> torch.Tensor:
        lp = model.forward(model.to_tokens(prompts, padding_side="left"))[:, -1].log_softmax(-1)
        return lp[:, awful] - lp[:, great]

    result = trait_report(organism, vec, mixed, negativity, coefficients=(-1.0, 0.0, 1.0), positions=[-1])
    assert result.correlation > 0.8  # the projection before generation predicts the verdict
    steered = result["steered"]
    assert steered[0] < steered[1] < steered[2]
