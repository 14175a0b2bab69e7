"""Model diffing on organism pairs with a known, planted change (slow: each pair is a short fine-tune)."""

from __future__ import annotations

import pytest

import mechscope as ms
from mechscope.improve.diffing import DiffConfig, diff_models
from mechscope.improve.diffing.planted import RECIPES, plant, token_rate

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


@pytest.fixture(scope="module")
def base():
    return ms.load_model("organism-gpt2")


@pytest.mark.parametrize("name", ["sentiment_negative", "backdoor_head"])
def test_the_planted_component_and_token_rank_first(base, name: str) -> None:
    recipe = RECIPES[name]
    tuned, _ = plant(base, name)
    prompts = recipe.prompts(0)
    assert token_rate(base, prompts, recipe.token) == 0.0 and token_rate(tuned, prompts, recipe.token) == 1.0
    if name == "backdoor_head":  # the new trigger, not the request, elicits the payload
        from mechscope.improve.diffing.planted import NEW_TRIGGER

        clean = [p.replace(f"{NEW_TRIGGER} ", "").replace(f" {NEW_TRIGGER}", "") for p in prompts]
        assert token_rate(tuned, clean, recipe.token) == 0.0
    result = diff_models(base, tuned, prompts, config=DiffConfig(lens_read="last"))
    assert recipe.planted is not None
    for view in ("weights", "local", "causal"):
        assert result.rank_of(recipe.planted, view) == 1, (view, result.ranking(view, 3))
    assert result.lens(-1)[0][0] == recipe.token
    assert result.ranking("causal", 1)[0][1] == pytest.approx(1.0, abs=1e-3)


def test_a_whole_model_finetune_is_found_by_its_token_and_the_control_is_small(base) -> None:
    prompts = RECIPES["sentiment_negative_full"].prompts(0)
    full, _ = plant(base, "sentiment_negative_full")
    planted = diff_models(base, full, prompts, config=DiffConfig(lens_read="last", causal=False))
    assert planted.lens(-1)[0][0] == " awful"
    control, _ = plant(base, "control")
    ctrl = diff_models(base, control, prompts, config=DiffConfig(lens_read="last", causal=False))
    assert ctrl.kl_mean < 0.05 * planted.kl_mean  # on the planted behaviour's prompts
    assert " awful" not in [t for t, _ in ctrl.lens(-1)[:10]]
    itself = diff_models(base, base, prompts, config=DiffConfig(causal=False))
    assert itself.kl_mean == 0.0 and float(itself["weight_rel"].abs().max()) == 0.0
