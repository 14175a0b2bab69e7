"""Steering profiles and conditional steering on tiny models: definitions and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from mechscope.errors import ConfigError, ShapeError
from mechscope.improve import EvaluationConfig, Task, evaluate
from mechscope.model.hooked import HookedModel
from mechscope.steer import from_direction, steer
from mechscope.steer.compose import InteractionResult, ProfileEntry, profile_interaction, steering_profile
from mechscope.steer.conditional import Condition, calibrate_threshold, conditional
from mechscope.steer.intervention import ModelMismatchError
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

TEXTS = ["the cat sat on the mat", "a dog ran in the park today", "we read a good book"]


@pytest.fixture(scope="module")
def model() -> HookedModel:
    hf, tok = tiny_model("llama")
    return HookedModel(hf, tok)


def _vec(model: HookedModel, seed: int, layers: int | list[int] = 1, site: str = "hook_resid_pre"):
    g = torch.Generator().manual_seed(seed)
    return from_direction(model, torch.randn(model.dims.d_model, generator=g), layers=layers, kind=site)


def _logits(model: HookedModel, context=None) -> torch.Tensor:
    batch = model.to_tokens(TEXTS, padding_side="left")
    with torch.no_grad():
        if context is None:
            return model.forward(batch)
        with context:
            return model.forward(batch)


def test_a_profile_with_one_vector_equals_plain_steering(model: HookedModel) -> None:
    vec = _vec(model, 0, layers=[0, 1])
    for positions in ("all", [-1]):
        plain = _logits(model, steer(model, vec, 3.0, positions=positions))
        profile = _logits(model, steering_profile(model, {"v": (vec, 3.0)}, positions=positions))
        assert torch.equal(plain, profile)


def test_a_profile_adds_its_vectors_with_their_coefficients(model: HookedModel) -> None:
    a, b = _vec(model, 1), _vec(model, 2)
    summed = from_direction(model, 2.0 * a.at(1) - 0.5 * b.at(1), layers=1)
    expected = _logits(model, steer(model, summed, 1.0))
    got = _logits(model, steering_profile(model, [ProfileEntry("a", a, 2.0), ProfileEntry("b", b, -0.5)]))
    assert torch.allclose(got, expected, atol=1e-5)
    # Vectors at different sites and layers stack like nested steering.
    c = _vec(model, 3, layers=0, site="hook_mlp_out")
    nested = _logits(model, _Nested(steer(model, a, 2.0), steer(model, c, 1.0)))
    assert torch.allclose(_logits(model, steering_profile(model, {"a": (a, 2.0), "c": (c, 1.0)})), nested, atol=1e-6)


class _Nested:
    def __init__(self, *interventions) -> None:
        self.interventions = interventions

    def __enter__(self) -> None:
        for i in self.interventions:
            i.__enter__()

    def __exit__(self, *exc) -> None:
        for i in reversed(self.interventions):
            i.__exit__(*exc)


def test_interaction_is_zero_where_effects_add_and_measured_where_not(model: HookedModel) -> None:
    a = _vec(model, 4)
    tiny = profile_interaction(steering_profile(model, {"a": (a, 1e-3), "b": (a, 1e-3)}), TEXTS)
    assert isinstance(tiny, InteractionResult)
    assert float(tiny["interaction"]) < 1e-2  # small steps are additive (first order)
    big = profile_interaction(
        steering_profile(model, {"a": (a, 6.0), "b": (_vec(model, 5), 6.0)}),
        TEXTS,
        metrics={"logit_5": lambda lp: lp[:, -1, 5]},
    )
    assert float(big["interaction"]) > 0.05  # the norms and softmax make large steps interact
    table = big["metrics"]
    assert float(table[2, 0]) == pytest.approx(float(table[0, 0] + table[1, 0]), abs=1e-5)
    assert big.labels["run"] == ["a", "b", "sum_of_singles", "joint"]


def test_interaction_at_the_last_token_reads_every_texts_own_last_token(model: HookedModel) -> None:
    # Texts of different lengths: steering at position -1 and a metric of the last position act on each
    # text's own last token, as on that text alone (right padding put both on padding for the shorter ones).
    a = _vec(model, 4)
    assert len({model.to_tokens(t)["input_ids"].shape[1] for t in TEXTS}) > 1
    result = profile_interaction(
        steering_profile(model, {"a": (a, 3.0)}, positions=[-1]), TEXTS, metrics={"logit_5": lambda lp: lp[:, -1, 5]}
    )
    alone = []
    for text in TEXTS:
        with torch.no_grad():
            plain = model.forward(text).float().log_softmax(-1)[0, -1, 5]
            with steer(model, a, 3.0, positions=[-1]):
                steered = model.forward(text).float().log_softmax(-1)[0, -1, 5]
        alone.append(float(steered - plain))
    assert float(result["metrics"][0, 0]) == pytest.approx(sum(alone) / len(alone), rel=1e-4, abs=1e-6)
    assert min(abs(x) for x in alone) > 1e-4  # every text's last token is steered


def test_profile_bad_input_is_refused_before_any_hook(model: HookedModel) -> None:
    a = _vec(model, 0)
    with pytest.raises(ConfigError, match="finite"):
        steering_profile(model, {"a": (a, math.nan)})
    with pytest.raises(ConfigError, match="finite"):
        steering_profile(model, {"a": (a, math.inf)})
    with pytest.raises(ConfigError, match="at least one"):
        steering_profile(model, {})
    with pytest.raises(ConfigError, match="distinct"):
        steering_profile(model, [ProfileEntry("a", a, 1.0), ProfileEntry("a", a, 2.0)])
    other = HookedModel(*tiny_model("llama", seed=5))
    with pytest.raises(ModelMismatchError):
        steering_profile(other, {"a": (a, 1.0)})
    assert not model._sessions


def _condition_setup(model: HookedModel):
    """A direction that separates two prompt groups at layer 1, and a vector steered at layer 1."""
    yes = ["the cat sat on the mat", "a cat looked at the dog"]
    no = ["we read a good book", "one two three four five"]
    from mechscope.sites import Site
    from mechscope.steer.vectors import read_activations

    site = Site("hook_resid_pre", 1)
    acts_yes = read_activations(model, yes, [site])[site]
    acts_no = read_activations(model, no, [site])[site]
    direction = acts_yes.mean(0) - acts_no.mean(0)
    cond = calibrate_threshold(model, Condition(site.name, direction), yes, no)
    return yes, no, cond


def test_conditional_steering_never_touches_prompts_where_the_condition_is_false(model: HookedModel) -> None:
    yes, no, cond = _condition_setup(model)
    prompts = [yes[0], no[0], yes[1], no[1]]
    vec = _vec(model, 7, layers=[1])
    batch = model.to_tokens(prompts, padding_side="left")
    gated = conditional(steer(model, vec, 5.0), cond)
    with torch.no_grad():
        plain = model.forward(batch)
        with steer(model, vec, 5.0):
            steered = model.forward(batch)
        with gated:
            out = model.forward(batch)
    assert gated.gate is None  # cleared on exit
    holds = torch.tensor([True, False, True, False])
    assert torch.equal(out[~holds], plain[~holds])  # bit for bit
    assert torch.allclose(out[holds], steered[holds], atol=1e-6)
    assert not torch.allclose(out[holds], plain[holds])
    # During generation the prompt's gate persists: the false rows generate exactly as unsteered.
    with torch.no_grad():
        before = model.generate(batch, max_new_tokens=4, do_sample=False)
        with conditional(steer(model, vec, 5.0), cond):
            after = model.generate(batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(after[~holds], before[~holds])


def test_conditional_steering_bad_input(model: HookedModel) -> None:
    _, _, cond = _condition_setup(model)
    early = _vec(model, 0, layers=[0])
    with pytest.raises(ConfigError, match="no later than the first steered"):
        conditional(steer(model, early, 1.0), cond)
    with pytest.raises(ShapeError, match="d_model"):
        conditional(steer(model, _vec(model, 0), 1.0), Condition("blocks.1.hook_resid_pre", torch.ones(7)))
    with pytest.raises(ConfigError, match="finite"):
        Condition("blocks.1.hook_resid_pre", torch.ones(32), threshold=math.nan)
    with pytest.raises(ConfigError, match="residual-width"):
        Condition("blocks.1.attn.hook_z", torch.ones(32))
    with pytest.raises(ConfigError, match="Intervention"):
        conditional(_vec(model, 0), cond)  # type: ignore[arg-type]


class _TokenTask(Task):
    name = "token"

    def metrics(self, model: HookedModel) -> dict[str, float]:
        logits = model.forward(model.to_tokens(TEXTS, padding_side="left"))[:, -1]
        return {"token_prob": float(logits.softmax(-1)[:, 5].mean())}


def test_profiles_and_conditional_steering_run_in_the_evaluation_harness(model: HookedModel) -> None:
    _, _, cond = _condition_setup(model)
    cfg = EvaluationConfig(neutral_texts=tuple(TEXTS), max_new_tokens=3)
    a, b = _vec(model, 1), _vec(model, 2)
    profile = evaluate(model, steering_profile(model, {"a": (a, 2.0), "b": (b, 1.0)}), _TokenTask(), cfg)
    assert profile.after("kl_neutral") > 0
    gated = evaluate(model, conditional(steer(model, a, 2.0), cond), _TokenTask(), cfg)
    assert "where blocks.1.hook_resid_pre" in gated.config["intervention"]


def test_a_mean_condition_reads_the_real_tokens_of_left_padded_prompts(model: HookedModel) -> None:
    from mechscope.sites import Site
    from mechscope.steer.vectors import read_activations

    prompts = ["the cat", "a dog ran in the park today", "we read"]
    site = Site("hook_resid_pre", 1)
    direction = torch.randn(model.dims.d_model, generator=torch.Generator().manual_seed(1))
    cond = Condition(site.name, direction, bias=0.5, read="mean")
    expected = read_activations(model, prompts, [site], read="mean")[site] @ direction + 0.5
    gated = conditional(steer(model, _vec(model, 7, layers=[1]), 1.0), cond)
    with torch.no_grad(), gated:
        model.forward(model.to_tokens(prompts, padding_side="left"))
        assert gated.scores is not None
        assert torch.allclose(gated.scores, expected, atol=1e-5)


@pytest.mark.parametrize("read", ["last", "mean"])
def test_a_condition_reads_each_prompts_own_tokens_on_either_padding(model: HookedModel, read: str) -> None:
    # Right padding puts the shorter prompts' last column on padding: the condition reads each prompt's last
    # token (and its text tokens for "mean") from the forward's mask, as read_activations reads them.
    from mechscope.sites import Site
    from mechscope.steer.vectors import read_activations

    prompts = ["the cat", "a dog ran in the park today", "we read"]
    site = Site("hook_resid_pre", 1)
    direction = torch.randn(model.dims.d_model, generator=torch.Generator().manual_seed(1))
    cond = Condition(site.name, direction, bias=0.5, read=read)  # type: ignore[arg-type]
    expected = read_activations(model, prompts, [site], read=read)[site] @ direction + 0.5  # type: ignore[arg-type]
    for side in ("left", "right"):
        gated = conditional(steer(model, _vec(model, 7, layers=[1]), 1.0), cond)
        with torch.no_grad(), gated:
            model.forward(model.to_tokens(prompts, padding_side=side))
            assert gated.scores is not None
            torch.testing.assert_close(gated.scores, expected, atol=1e-5, rtol=1e-5)


def test_a_probe_is_a_condition(model: HookedModel) -> None:
    from mechscope.locate.probes import ProbeConfig, fit_probe
    from mechscope.sites import Site
    from mechscope.steer.vectors import read_activations

    yes, no, _ = _condition_setup(model)
    site = Site("hook_resid_pre", 1)
    x = torch.cat([read_activations(model, yes, [site])[site], read_activations(model, no, [site])[site]])
    y = torch.tensor([1] * len(yes) + [0] * len(no))
    probe = fit_probe(x, y, ProbeConfig(kind="mass_mean", folds=0, control=False))
    cond = Condition.from_probe(probe, site.name)
    vec = _vec(model, 7, layers=[1])
    prompts = [*yes, *no]
    gated = conditional(steer(model, vec, 3.0), cond)
    with torch.no_grad(), gated:
        model.forward(model.to_tokens(prompts, padding_side="left"))
    assert gated.gate is None  # cleared on exit; the scores stay for inspection
    assert torch.equal((gated.scores > 0).long(), probe.predict(x))
    with pytest.raises(ConfigError, match="linear probe"):
        Condition.from_probe(object(), site.name)
