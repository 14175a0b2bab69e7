"""Circuit comparison: a model against itself and against a copy with its heads renamed."""

from __future__ import annotations

import copy

import pytest
import torch

from mechscope.errors import ConfigError
from mechscope.improve.compare import CircuitComparison, compare_circuits
from mechscope.locate.metrics import logit_diff
from mechscope.model.hooked import HookedModel
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

PERM = [2, 0, 3, 1]  # new head h is old head PERM[h]


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(4, 100, (6, 7), generator=gen)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(4, 100, (6,), generator=gen)
    return clean, corrupt


def _metric(i: int):
    return lambda logits: logit_diff(logits, 5 + i % 3, 9)


def _permuted_heads(model: HookedModel, layer: int) -> HookedModel:
    """GPT-2 with layer `layer`'s heads renamed (the same function)."""
    hf = copy.deepcopy(model.hf_model)
    out = HookedModel(hf, model.tokenizer)
    d, dh = model.dims.d_model, model.dims.d_head
    block = hf.transformer.h[layer].attn
    idx = torch.cat([torch.arange(h * dh, (h + 1) * dh) for h in PERM])
    qkv = torch.cat([idx + part * d for part in range(3)])
    with torch.no_grad():
        block.c_attn.weight.copy_(block.c_attn.weight[:, qkv])
        block.c_attn.bias.copy_(block.c_attn.bias[qkv])
        block.c_proj.weight.copy_(block.c_proj.weight[idx, :])
    return out


def test_a_model_matches_itself_and_a_head_renamed_copy() -> None:
    model = HookedModel(*tiny_model("gpt2"))
    clean, corrupt = _prompts()
    same = compare_circuits(model, model, clean, corrupt, _metric, _metric, top=5)
    assert isinstance(same, CircuitComparison)
    assert all(m["a"] == m["b"] and m["cosine"] == pytest.approx(1.0, abs=1e-9) for m in same.matches)
    renamed = _permuted_heads(model, 1)
    with torch.no_grad():
        assert torch.allclose(model.forward(clean), renamed.forward(clean), atol=1e-5)
    result = compare_circuits(model, renamed, clean, corrupt, _metric, _metric, top=8, names=("gpt2", "renamed"))
    for m in result.matches:
        layer, head = int(m["a"][1]), int(m["a"][3])
        expected = f"L1H{PERM.index(head)}" if layer == 1 else m["a"]
        assert m["b"] == expected and m["cosine"] > 0.999, m
    assert torch.allclose(result["effect_b"][1], result["effect_a"][1][PERM], atol=1e-5)
    assert len(result.plot().data) == 3


def test_compare_bad_input() -> None:
    model = HookedModel(*tiny_model("gpt2"))
    clean, corrupt = _prompts()
    with pytest.raises(ConfigError, match="at least 2"):
        compare_circuits(model, model, clean[:1], corrupt[:1], _metric, _metric)
    with pytest.raises(ConfigError, match="top"):
        compare_circuits(model, model, clean, corrupt, _metric, _metric, top=0)
