"""Residual maps and transferred interventions: a rotated copy of a model is recovered exactly."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mechscope.errors import ConfigError
from mechscope.improve.transfer import (
    MapConfig,
    ResidualMap,
    learn_map,
    transfer_direction,
    transfer_effect,
    transfer_vector,
)
from mechscope.model.folding import fold_layer_norm
from mechscope.model.hooked import HookedModel
from mechscope.results import ModelMismatchError
from mechscope.steer import Direction, directional_ablation, mean_difference, steer
from tiny_models import SENTENCES, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

POSITIVE = ["The Eiffel Tower is in Paris.", "The capital of France is Paris"]
NEGATIVE = ["A cat sat on the mat", "One two three four five"]
PROMPTS = ["The quick brown fox", "Hello world! This is", "When Mary and John went"]


def _rotated_copy(model: HookedModel, rotation: torch.Tensor) -> HookedModel:
    """The same function with its residual stream rotated: every activation becomes ``a @ rotation``.

    Norm weights are folded into their readers first (an RMSNorm with unit weight commutes with rotations).
    """
    hf = copy.deepcopy(model.hf_model)
    out = fold_layer_norm(HookedModel(hf, model.tokenizer))
    r = rotation.to(torch.float32)
    with torch.no_grad():
        emb = out.module(out.adapter.embed)
        emb.weight.copy_(emb.weight @ r)
        head = out.module(out.adapter.unembed)
        head.weight.copy_(head.weight @ r)
        for layer in range(out.dims.n_layers):
            for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
                lin = out.layer_module(layer, path)
                lin.weight.copy_(lin.weight @ r)  # readers: [out, d_model]
            for path in ("self_attn.o_proj", "mlp.down_proj"):
                lin = out.layer_module(layer, path)
                lin.weight.copy_(r.T @ lin.weight)  # writers: [d_model, in]
    return out


@pytest.fixture(scope="module")
def pair() -> tuple[HookedModel, HookedModel, torch.Tensor]:
    hf, tok = tiny_model("llama")
    source = HookedModel(hf, tok)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    return source, _rotated_copy(source, q.float()), q.float()


def test_the_rotated_copy_computes_the_same_function(pair) -> None:
    source, target, rotation = pair
    batch = source.to_tokens(PROMPTS)
    _, a = source.run_with_cache(batch, ["blocks.1.hook_resid_pre"])
    logits_t, b = target.run_with_cache(batch, ["blocks.1.hook_resid_pre"])
    assert torch.allclose(b["blocks.1.hook_resid_pre"], a["blocks.1.hook_resid_pre"] @ rotation, atol=1e-4)
    assert torch.allclose(logits_t, source.forward(batch), atol=1e-4)


def test_the_learned_map_recovers_the_rotation_and_transfers_with_ratio_one(pair, tmp_path) -> None:
    source, target, rotation = pair
    config = MapConfig(source_site="blocks.1.hook_resid_pre", target_site="blocks.1.hook_resid_pre", ridge=1e-8)
    rmap = learn_map(source, target, SENTENCES, config, heldout=PROMPTS)
    assert torch.allclose(rmap.weight, rotation, atol=2e-3)
    assert rmap.fit["r2_train"] > 0.9999 and rmap.fit["r2_heldout"] > 0.999
    loaded = ResidualMap.load(rmap.save(tmp_path / "map.safetensors"), source)
    assert torch.equal(loaded.weight, rmap.weight) and loaded.target == rmap.target

    target_token = 5

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1].log_softmax(-1)[:, target_token]

    result = transfer_effect(source, target, rmap, POSITIVE, NEGATIVE, PROMPTS, metric, coefficient=4.0)
    assert abs(result.ratio - 1.0) < 1e-2
    assert float(result["cosine"]) > 0.9999
    assert abs(float(result["effect"][0])) > 1e-3  # the vector does something
    # The source vector's effect on the source equals the native one on the rotated target.
    assert float(result["effect"][2]) == pytest.approx(float(result["effect"][0]), rel=1e-2)


def test_an_ablation_direction_transfers(pair) -> None:
    source, target, rotation = pair
    config = MapConfig(source_site="blocks.1.hook_resid_pre", target_site="blocks.1.hook_resid_pre", ridge=1e-8)
    rmap = learn_map(source, target, SENTENCES, config)
    vec = mean_difference(source, POSITIVE, NEGATIVE, layers=1)
    direction = Direction.from_tensor(source, vec.at(1))
    moved = transfer_direction(direction, rmap, target)
    assert torch.allclose(moved.vector, direction.vector @ rotation, atol=1e-3)
    batch = source.to_tokens(PROMPTS)
    with torch.no_grad(), directional_ablation(source, direction):
        a = source.forward(batch)
    with torch.no_grad(), directional_ablation(target, moved):
        b = target.forward(batch)
    assert torch.allclose(a, b, atol=1e-3)


def test_transfer_bad_input(pair) -> None:
    source, target, _ = pair
    vec = mean_difference(source, POSITIVE, NEGATIVE, layers=1)
    with pytest.raises(ModelMismatchError):  # a vector made for another model, applied without a map
        steer(target, vec, 1.0)
    config = MapConfig(source_site="blocks.1.hook_resid_pre", target_site="blocks.1.hook_resid_pre")
    backwards = learn_map(target, source, SENTENCES, config)
    with pytest.raises(ModelMismatchError, match="Learn a map from"):
        transfer_vector(vec, backwards, target)
    rmap = learn_map(source, target, SENTENCES, config)
    with pytest.raises(ModelMismatchError, match="goes to model"):
        transfer_vector(vec, rmap, source)
    with pytest.raises(ConfigError, match="lives at"):
        transfer_vector(mean_difference(source, POSITIVE, NEGATIVE, layers=0), rmap, target)
    with pytest.raises(ConfigError, match="finite"):
        transfer_effect(source, target, rmap, POSITIVE, NEGATIVE, PROMPTS, lambda x: x[:, -1, 0], coefficient=math.nan)
    with pytest.raises(ConfigError, match="residual-width"):
        MapConfig(source_site="blocks.1.attn.hook_z", target_site="blocks.1.hook_resid_pre")
    with pytest.raises(ConfigError, match="ridge"):
        MapConfig(source_site="blocks.1.hook_resid_pre", target_site="blocks.1.hook_resid_pre", ridge=-1.0)
    with pytest.raises(ConfigError, match="at least 2 activation rows"):
        learn_map(source, target, ["One two"], MapConfig(**{**config.__dict__, "read": "last"}))


def test_a_map_between_two_architectures(pair) -> None:
    source, _, _ = pair
    other = HookedModel(*tiny_model("gpt2"))
    config = MapConfig(source_site="blocks.1.hook_resid_pre", target_site="blocks.1.hook_resid_post")
    rmap = learn_map(source, other, SENTENCES, config, heldout=PROMPTS)
    assert rmap.weight.shape == (32, 32) and 0 < rmap.fit["r2_train"] <= 1
    assert rmap.target["model_type"] == "gpt2"
