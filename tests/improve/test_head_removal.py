"""Harmful-head removal: a planted head is found first and alone; the ablation runs in the harness."""

from __future__ import annotations

import itertools

import pytest
import torch

from mechscope.errors import ConfigError
from mechscope.improve import EvaluationConfig, Task, evaluate
from mechscope.improve.head_removal import HeadRemovalConfig, HeadSetAblation, find_harmful_heads
from mechscope.model.hooked import HookedModel
from mechscope.steer.finetune import FinetuneConfig, finetune
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

HARMFUL = ["the cat sat on the mat", "a dog ran in the park", "we read a good book today"]
REFERENCE = ["one two three four", "hello world this is", "the quick brown fox jumps"]
TOKEN = 5


def _score(model: HookedModel, prompts: list[str]) -> float:
    with torch.no_grad():
        logits = model.forward(model.to_tokens(prompts, padding_side="left"))[:, -1]
    return float(logits.log_softmax(-1)[:, TOKEN].mean())


@pytest.fixture(scope="module")
def planted() -> HookedModel:
    """Tiny GPT-2 whose head L1H2 alone was fine-tuned to answer token 5 after the harmful prompts (and
    token 9 after the reference ones), so the behaviour depends on what that head reads."""
    model = HookedModel(*tiny_model("gpt2"))
    word, other = model.tokenizer.decode([TOKEN]), model.tokenizer.decode([9])
    examples = [(p, word) for p in HARMFUL] + [(p, other) for p in REFERENCE]
    finetune(model, examples, FinetuneConfig(components=("blocks.1.attn.head.2",), steps=80, lr=1e-2, batch_size=6))
    return model


def test_the_planted_head_is_found_first_and_alone(planted: HookedModel) -> None:
    before = _score(planted, HARMFUL)
    with torch.no_grad(), HeadSetAblation(planted, [(1, 2)], REFERENCE):
        without = _score(planted, HARMFUL)
    assert before - without > 1.0  # the head carries the behaviour
    result = find_harmful_heads(planted, HARMFUL, REFERENCE, _score, HeadRemovalConfig(target=without + 0.05))
    assert result.heads == [(1, 2)]
    effect = result["single_effect"]
    assert int(effect.flatten().argmax()) == 1 * planted.dims.n_heads + 2
    assert float(effect[1, 2]) == pytest.approx(before - without, abs=1e-5)  # its definition
    assert result.config["reached_target"] and result.config["scores"]["after"] == pytest.approx(without, abs=1e-6)
    assert float(result["curve"][0]) == pytest.approx(before, abs=1e-6)


def test_a_removal_that_cannot_reach_its_target_says_so(planted: HookedModel) -> None:
    """An unreachable target: the greedy search adds heads while one lowers the score (at most max_heads),
    keeps all it added (nothing is pruned when the target is missed) and says it was not reached. Whether a
    second head still helps depends on the fine-tune's rounding (torch 2.6 stops at one, 2.11+ takes two), so
    an early stop is checked for its reason: no remaining candidate lowers the score."""
    config = HeadRemovalConfig(target=-100.0, max_heads=2)
    result = find_harmful_heads(planted, HARMFUL, REFERENCE, _score, config)
    order = [tuple(h) for h in result.config["order"]]
    curve = result["curve"].tolist()
    assert not result.config["reached_target"] and result.heads == order
    assert 1 <= len(order) <= 2 and len(curve) == len(order) + 1
    assert all(after < before for before, after in itertools.pairwise(curve))  # every head taken lowered the score
    assert result.config["scores"]["after"] == pytest.approx(curve[-1], abs=1e-9)
    if len(order) < config.max_heads:
        ranked = result["single_effect"].flatten().argsort(descending=True).tolist()[: config.pool]
        n_heads = planted.dims.n_heads
        for cell in [(i // n_heads, i % n_heads) for i in ranked if (i // n_heads, i % n_heads) not in order]:
            with torch.no_grad(), HeadSetAblation(planted, [*order, cell], REFERENCE):
                assert _score(planted, HARMFUL) >= curve[-1], cell


class _ScoreTask(Task):
    name = "token5"

    def metrics(self, model: HookedModel) -> dict[str, float]:
        return {"logp_token5": _score(model, HARMFUL)}


def test_the_chosen_ablation_runs_in_the_harness(planted: HookedModel) -> None:
    result = find_harmful_heads(planted, HARMFUL, REFERENCE, _score, HeadRemovalConfig(target=-100.0, max_heads=1))
    ev = evaluate(
        planted,
        result.intervention(planted, REFERENCE),
        _ScoreTask(),
        EvaluationConfig(neutral_texts=tuple(REFERENCE), max_new_tokens=2),
    )
    assert ev.after("logp_token5") < ev.before("logp_token5") - 1.0
    assert ev.after("kl_neutral") > 0
    assert "L1H2" in ev.config["intervention"]


def test_head_removal_bad_input(planted: HookedModel) -> None:
    with pytest.raises(ConfigError, match="finite"):
        HeadRemovalConfig(target=float("nan"))
    with pytest.raises(ConfigError, match="max_heads"):
        HeadRemovalConfig(target=0.0, max_heads=0)
    with pytest.raises(ConfigError, match="harmful"):
        find_harmful_heads(planted, [], REFERENCE, _score, HeadRemovalConfig(target=0.0))
    with pytest.raises(ConfigError, match="at least one"):
        HeadSetAblation(planted, [], REFERENCE)
