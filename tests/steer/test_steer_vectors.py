"""Steering vectors: constructors' definitions, identity at 0, composition, phases, files, bad input."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import ConfigError, ShapeError
from mechscope.model.hooked import HookedModel
from mechscope.sites import Site
from mechscope.steer import (
    ModelMismatchError,
    SteeringVector,
    applied,
    from_direction,
    mean_difference,
    pca_direction,
    read_activations,
    steer,
    zero_ablation,
)
from tiny_models import tiny_model

POS = ["the cat is happy", "a good day in the sun", "we love the park", "the book is great"]
NEG = ["the cat is sad", "a bad day in the rain", "we hate the mud", "the book is awful"]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request) -> HookedModel:
    hf, tok = tiny_model(request.param)
    return HookedModel(hf, tok)


def _no_hooks(model: HookedModel) -> bool:
    modules = model.hf_model.modules()
    return not model._sessions and all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)


def _random_vector(model: HookedModel, seed: int, layers=(0, 1)) -> SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    return from_direction(model, torch.randn(len(layers), model.dims.d_model, generator=gen), layers=list(layers))


def test_mean_difference_is_the_difference_of_last_token_means(model: HookedModel) -> None:
    vec = mean_difference(model, POS, NEG, layers=[0, 1])
    for layer in (0, 1):
        site = Site("hook_resid_pre", layer)
        rows = []
        for texts in (POS, NEG):
            acts = [model.run_with_cache(t, site)[1][site.name][0, -1] for t in texts]
            rows.append(torch.stack(acts).mean(0))
        torch.testing.assert_close(vec.at(layer), rows[0] - rows[1], rtol=1e-4, atol=1e-5)
    assert vec.method == "mean_difference" and vec.layers == [0, 1]


def test_pca_direction_is_the_top_signed_direction_of_differences(model: HookedModel) -> None:
    vec = pca_direction(model, POS, NEG, layers=1)
    mean_diff = mean_difference(model, POS, NEG, layers=1).at(1)
    site = Site("hook_resid_pre", 1)
    diffs = torch.stack(
        [
            model.run_with_cache(p, site)[1][site.name][0, -1] - model.run_with_cache(n, site)[1][site.name][0, -1]
            for p, n in zip(POS, NEG, strict=True)
        ]
    )
    unit = vec.at(1) / vec.at(1).norm()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # no other unit direction explains more of the differences
        other = torch.randn(model.dims.d_model, generator=gen)
        assert (diffs @ unit).norm() >= (diffs @ (other / other.norm())).norm() - 1e-4
    assert float(unit @ mean_diff) > 0
    torch.testing.assert_close(vec.at(1).norm(), (diffs @ unit).mean(), rtol=1e-4, atol=1e-5)


def test_coefficient_zero_is_the_identity(model: HookedModel) -> None:
    vec = _random_vector(model, 0)
    base = model.forward(POS)
    base_gen = model.generate(POS[:2], max_new_tokens=4, do_sample=False)
    with steer(model, vec, 0.0):
        torch.testing.assert_close(model.forward(POS), base, rtol=0, atol=0)
        assert torch.equal(model.generate(POS[:2], max_new_tokens=4, do_sample=False), base_gen)
    with steer(model, vec, 3.0):
        assert not torch.allclose(model.forward(POS), base)


def test_steering_adds_coefficient_times_vector(model: HookedModel) -> None:
    vec = _random_vector(model, 1)
    site = "blocks.1.hook_resid_pre"
    _, base = model.run_with_cache(POS, site)
    with steer(model, vec, 2.0, layers=1):
        _, cache = model.run_with_cache(POS, site)
    torch.testing.assert_close(cache[site], base[site] + 2.0 * vec.at(1), rtol=1e-5, atol=1e-5)
    left = model.to_tokens(POS, padding_side="left")  # the last column is each row's last token
    _, base = model.run_with_cache(left, site)
    with steer(model, vec, 2.0, layers=1, positions=[-1]):
        _, last = model.run_with_cache(left, site)
    torch.testing.assert_close(last[site][:, :-1], base[site][:, :-1])
    torch.testing.assert_close(last[site][:, -1], base[site][:, -1] + 2.0 * vec.at(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_positions_count_each_rows_own_tokens_on_a_padded_batch(model: HookedModel, side: str) -> None:
    # On prompts of different lengths a column is padding in the shorter rows (-1 on a right-padded batch,
    # 0 on a left-padded one). Positions count each row's own tokens instead, so a padded batch gives what
    # each prompt gives alone, whatever the padding.
    from mechscope.features import SAEConfig, SparseAutoencoder
    from mechscope.steer import clamp_features, zero_ablation

    vec = _random_vector(model, 1)
    batch = model.to_tokens(POS, padding_side=side)
    real = batch["attention_mask"].bool()
    assert not bool(real.all())
    sae = SparseAutoencoder(SAEConfig(d_in=model.dims.d_model, d_sae=8, site="blocks.1.hook_resid_pre"), seed=0)
    with torch.no_grad():
        sae.W_dec.mul_(5.0)
    interventions = [
        steer(model, vec, 4.0, layers=1, positions=[-1]),
        steer(model, vec, 4.0, layers=1, positions=[1, -2]),
        zero_ablation(model, "blocks.0.hook_mlp_out", positions=[-1, 1]),
        clamp_features(model, sae, {0: 3.0}, positions=[-2]),
    ]
    with torch.no_grad():
        for intervention in interventions:
            with intervention:
                batched = model.forward(batch)
            for i, text in enumerate(POS):
                plain = model.forward(text)[0]
                with intervention:
                    alone = model.forward(text)[0]
                assert not torch.allclose(alone, plain, atol=1e-4), intervention  # it acts on every prompt
                torch.testing.assert_close(batched[i][real[i]], alone, rtol=1e-4, atol=1e-4)
    # generation (left-padded, then one new column per step) steers each prompt's last token, then each new one
    with steer(model, vec, 4.0, layers=1, positions=[-1]):
        out = model.generate(POS, max_new_tokens=2, do_sample=False)
    assert out.shape[0] == len(POS)
    assert _no_hooks(model)


def test_nesting_order_of_commuting_interventions_does_not_matter(model: HookedModel) -> None:
    a, b = _random_vector(model, 2), _random_vector(model, 3)
    heads = zero_ablation(model, "blocks.1.attn.hook_z", heads=[0, 2])
    s_a, s_b = steer(model, a, 1.5), steer(model, b, -0.7)
    with applied(s_a, s_b, heads):
        first = model.forward(POS)
    with applied(heads, s_b, s_a):
        second = model.forward(POS)
    torch.testing.assert_close(first, second, rtol=1e-5, atol=1e-5)
    with s_a:
        assert not torch.allclose(model.forward(POS), first)
    assert _no_hooks(model)


@pytest.mark.parametrize("mode", ["prompt", "generated", "all"])
def test_prompt_and_generated_phases(model: HookedModel, mode: str) -> None:
    """An outer and an inner recorder around the steering see a difference of c*v exactly when
    the mode covers the forward's phase (prompt: no KV cache yet; generated: later steps)."""
    vec = _random_vector(model, 4)
    site = "blocks.1.hook_resid_pre"
    seen: dict[str, list[torch.Tensor]] = {"outer": [], "inner": []}
    outer = model.hooks({site: lambda a, _c: seen["outer"].append(a.clone())})
    with outer, steer(model, vec, 1.0, positions=mode), model.hooks({site: lambda a, _c: seen["inner"].append(a)}):
        model.generate(POS[:2], max_new_tokens=3, do_sample=False)
    assert len(seen["outer"]) == len(seen["inner"]) == 3
    for step, (o, i) in enumerate(zip(seen["outer"], seen["inner"], strict=True)):
        steered = mode == "all" or (mode == "prompt") == (step == 0)
        expected = o + vec.at(1) if steered else o
        torch.testing.assert_close(i, expected, rtol=1e-5, atol=1e-5)


def test_save_load_and_model_checks(model: HookedModel, tmp_path) -> None:
    vec = mean_difference(model, POS, NEG, layers=[1])
    path = vec.save(tmp_path / "vec.safetensors")
    loaded = SteeringVector.load(path, model)
    assert torch.equal(loaded.directions, vec.directions) and loaded.layers == [1] and loaded.method == vec.method
    family = model.dims.model_type
    other_hf, other_tok = tiny_model("gpt2" if family == "gpt2" else "llama", seed=7)
    other = HookedModel(other_hf, other_tok)
    with pytest.raises(ModelMismatchError, match="made on model"):
        SteeringVector.load(path, other)
    with pytest.raises(ModelMismatchError):
        steer(other, loaded, 1.0)
    wide_hf, wide_tok = tiny_model("gpt2", n_embd=48)
    with pytest.raises(ShapeError, match="d_model"):
        steer(HookedModel(wide_hf, wide_tok), loaded, 1.0)
    assert _no_hooks(other)


def test_bad_input_leaves_the_model_unmodified(model: HookedModel) -> None:
    weights = {k: v.clone() for k, v in model.hf_model.state_dict().items()}
    base = model.forward(POS)
    vec = _random_vector(model, 5)
    with pytest.raises(ShapeError, match="direction must be"):
        from_direction(model, torch.ones(model.dims.d_model + 1))
    with pytest.raises(ConfigError, match="finite"):
        steer(model, vec, float("nan"))
    with pytest.raises(ConfigError, match="positions"):
        steer(model, vec, 1.0, positions="middle")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no direction for layers"):
        steer(model, _random_vector(model, 6, layers=(0,)), 1.0, layers=[1])
    with pytest.raises(ConfigError, match="layers"):
        mean_difference(model, POS, NEG, layers=[5])
    with pytest.raises(ConfigError, match="pairs"):
        pca_direction(model, POS, NEG[:3])
    s = steer(model, vec, 1.0)
    with pytest.raises(ConfigError, match="already active"), s, s:
        pass
    assert _no_hooks(model)
    torch.testing.assert_close(model.forward(POS), base, rtol=0, atol=0)
    for k, v in model.hf_model.state_dict().items():
        assert torch.equal(v, weights[k])


def test_token_means_leave_out_the_bos_the_tokenizer_adds(model: HookedModel) -> None:
    # The tiny tokenizer prepends <bos>, as Gemma's does (whose BOS residual is 13x a text token's): a mean
    # over a prompt's tokens, a mean ablation over tokens and a conditional's mean read all skip it.
    from mechscope.steer import mean_ablation
    from mechscope.steer.conditional import Condition, ConditionalSteering

    prompts = ["The cat sat on the mat", "A dog ran", "One two three four"]
    site = Site("hook_resid_pre", 1)
    batch = model.to_tokens(prompts, padding_side="left")
    assert bool((batch["input_ids"][:, -4:] != 1).all()) and int((batch["input_ids"] == 1).sum()) == 3
    _, cache = model.run_with_cache(batch, [site])
    text = batch["attention_mask"].bool() & (batch["input_ids"] != 1)
    act = cache[site.name]
    expected = torch.stack([act[i][text[i]].mean(0) for i in range(len(prompts))])
    torch.testing.assert_close(read_activations(model, prompts, [site], read="mean")[site], expected)
    abl = mean_ablation(model, site.name, reference=prompts, over="tokens")
    torch.testing.assert_close(abl.values[site].reshape(-1), act[text].mean(0))
    direction = torch.randn(model.dims.d_model, generator=torch.Generator().manual_seed(0))
    cond = Condition(site.name, direction, bias=0.0, threshold=0.0, read="mean")
    gate = ConditionalSteering(_random_vector_steering(model), cond)
    with gate:
        model.forward(batch)
    torch.testing.assert_close(gate.scores, expected @ direction, rtol=1e-5, atol=1e-5)


def _random_vector_steering(model: HookedModel):
    return steer(model, _random_vector(model, 3, layers=(1,)), 1.0)  # no earlier than the condition reads
