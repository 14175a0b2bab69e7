"""Model diffing on an organism pair retrained at test time: the whole-model fine-tune, which is not shipped
(four layers would not be a compact delta). The shipped pairs -- sentiment_negative, backdoor_head and the
control, loaded from their weight deltas -- are tested in test_diffing_variants.py."""

from __future__ import annotations

import pytest

import mechscope as ms
from mechscope.improve.diffing import DiffConfig, diff_models
from mechscope.improve.diffing.planted import RECIPES, plant

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


@pytest.fixture(scope="module")
def base():
    return ms.load_model("organism-gpt2")


def test_a_whole_model_finetune_is_found_by_its_token_and_the_control_is_small(base) -> None:
    prompts = RECIPES["sentiment_negative_full"].prompts(0)
    full, _ = plant(base, "sentiment_negative_full")
    planted = diff_models(base, full, prompts, config=DiffConfig(lens_read="last", causal=False))
    assert planted.lens(-1)[0][0] == " awful"
    control = ms.load_model("organism-gpt2+control")  # the shipped control fine-tune
    ctrl = diff_models(base, control, prompts, config=DiffConfig(lens_read="last", causal=False))
    assert ctrl.kl_mean < 0.05 * planted.kl_mean  # on the planted behaviour's prompts
    assert " awful" not in [t for t, _ in ctrl.lens(-1)[:10]]
