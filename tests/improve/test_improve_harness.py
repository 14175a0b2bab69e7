"""The evaluation harness on tiny models: identity, KL/perplexity definitions, modified models, files."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import ConfigError
from mechscope.improve import EvaluationConfig, EvaluationResult, Task, evaluate
from mechscope.improve.tasks import continuation_sentiment
from mechscope.model.hooked import HookedModel
from mechscope.steer import directional_ablation, from_direction, orthogonalize, steer
from tiny_models import tiny_model

NEUTRAL = ("the cat sat on the mat", "a dog ran in the park today", "we read a good book")

pytestmark = pytest.mark.usefixtures("single_thread")


class TokenTask(Task):
    """Mean probability of one token after each prompt (a stand-in for a behaviour rate)."""

    name = "token"

    def __init__(self, token: int) -> None:
        self.token = token

    def metrics(self, model: HookedModel) -> dict[str, float]:
        logits = model.forward(model.to_tokens(list(NEUTRAL), padding_side="left"))[:, -1]
        return {"token_prob": float(logits.softmax(-1)[:, self.token].mean())}

    def sample_prompts(self) -> list[str]:
        return ["the cat", "a dog"]


@pytest.fixture(scope="module")
def model() -> HookedModel:
    hf, tok = tiny_model("llama")
    return HookedModel(hf, tok)


def _config() -> EvaluationConfig:
    return EvaluationConfig(neutral_texts=NEUTRAL, max_new_tokens=4)


def test_identity_intervention_changes_nothing(model: HookedModel) -> None:
    vec = from_direction(model, torch.ones(model.dims.d_model))
    result = evaluate(model, steer(model, vec, 0.0), TokenTask(5), _config())
    assert result.metrics == ["token_prob", "kl_neutral", "perplexity_neutral"]
    assert result.after("kl_neutral") == pytest.approx(0.0, abs=1e-7)
    assert result.after("perplexity_neutral") == pytest.approx(result.before("perplexity_neutral"))
    assert result.after("token_prob") == pytest.approx(result.before("token_prob"))
    assert all(s["before"] == s["after"] for s in result.config["samples"])
    assert result.config["side_tasks"] == []  # a tiny tokenizer is not an organism vocabulary


def test_kl_and_perplexity_follow_their_definitions(model: HookedModel) -> None:
    vec = from_direction(model, torch.randn(model.dims.d_model, generator=torch.Generator().manual_seed(0)))
    intervention = steer(model, vec, 2.0)
    result = evaluate(model, intervention, TokenTask(5), _config())

    def by_text(intervention):  # each text alone: every position, and the last one is the text's own
        kls, nlls = [], []
        for text in NEUTRAL:
            ids = model.to_tokens(text)["input_ids"]
            with torch.no_grad():
                ref = model.forward(ids).log_softmax(-1)[0]
                with intervention:
                    new = model.forward(ids).log_softmax(-1)[0]
            kls.append((ref.exp() * (ref - new)).sum(-1))
            nlls.append(-new[:-1].gather(-1, ids[0, 1:, None]).squeeze(-1))
        return float(torch.cat(kls).mean()), float(torch.cat(nlls).mean().exp())

    kl, ppl = by_text(intervention)
    assert result.after("kl_neutral") == pytest.approx(kl, rel=1e-4)
    assert result.after("perplexity_neutral") == pytest.approx(ppl, rel=1e-4)
    assert result.after("kl_neutral") > 1e-3
    assert "x2" in result.config["intervention"]
    # steering each text's last token: neutral texts of different lengths run without padding, so the
    # position is every text's own last token (a right-padded batch put it on padding for the shorter ones)
    assert len({model.to_tokens(t)["input_ids"].shape[1] for t in NEUTRAL}) > 1
    last_only = evaluate(model, steer(model, vec, 2.0, positions=[-1]), TokenTask(5), _config())
    kl_last, ppl_last = by_text(steer(model, vec, 2.0, positions=[-1]))
    assert last_only.after("kl_neutral") == pytest.approx(kl_last, rel=1e-4)
    assert last_only.after("perplexity_neutral") == pytest.approx(ppl_last, rel=1e-4)
    assert last_only.after("kl_neutral") > 1e-4  # the last position's prediction counts too


def test_a_modified_model_evaluates_like_its_hooked_equivalent(model: HookedModel, tmp_path) -> None:
    r = torch.randn(model.dims.d_model, generator=torch.Generator().manual_seed(1))
    hooked = evaluate(model, directional_ablation(model, r), TokenTask(7), _config())
    weights = evaluate(model, orthogonalize(model, r), TokenTask(7), _config())
    torch.testing.assert_close(hooked["values"], weights["values"], rtol=1e-4, atol=1e-6)
    loaded = EvaluationResult.load(hooked.save(tmp_path / "eval.safetensors"))
    assert loaded.metrics == hooked.metrics and loaded.config == hooked.config
    assert weights.config["intervention"].startswith("modified model")
    assert "| `kl_neutral` | side effect |" in loaded.table()
    assert loaded.samples_table().count("\n") == 3
    fig = loaded.plot()
    assert [t.name for t in fig.data] == ["before", "after"]


def test_bad_input(model: HookedModel) -> None:
    with pytest.raises(ConfigError, match="Task"):
        evaluate(model, steer(model, from_direction(model, torch.ones(32)), 1.0), "refusal")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="context manager"):
        evaluate(model, 3.0, TokenTask(1))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="itself"):
        evaluate(model, model, TokenTask(1))
    other = HookedModel(*tiny_model("llama", seed=4))
    with pytest.raises(ConfigError, match="another HookedModel"):
        evaluate(model, steer(other, from_direction(other, torch.ones(32)), 1.0), TokenTask(1))
    with pytest.raises(ConfigError, match="side tasks"):
        EvaluationConfig(side_tasks=("poetry",))
    with pytest.raises(ConfigError, match="neutral_texts"):
        EvaluationConfig(neutral_texts=())


def test_continuation_sentiment() -> None:
    assert continuation_sentiment(" awful. I would not recommend it.") == "negative"
    assert continuation_sentiment(" great. I would recommend it.") == "positive"
    assert continuation_sentiment(" fine, I suppose") == "neutral"
    assert continuation_sentiment(" great, but I would not recommend it.") == "neutral"
