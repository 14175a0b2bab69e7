"""Targeted fine-tuning: only the chosen components move (bit-for-bit elsewhere), and the loss falls."""

from __future__ import annotations

import pytest
import torch
from edit_helpers import tiny

from mechscope.errors import ConfigError
from mechscope.steer.editing import snapshot
from mechscope.steer.finetune import FinetuneConfig, finetune, trainable_masks

pytestmark = pytest.mark.usefixtures("single_thread")

EXAMPLES = [("The capital of France is", " Rome"), ("A cat sat on the", " dog"), ("One two three", " ten")]


@pytest.mark.parametrize(
    ("family", "component"),
    [
        ("gpt2", "blocks.1.mlp"),
        ("gpt2", "blocks.0.attn.head.2"),
        ("llama", "blocks.1.attn.head.1"),
        ("llama", "blocks.0"),
    ],
)
def test_only_chosen_components_change(family, component):
    model = tiny(family)
    before = snapshot(model)
    record = finetune(model, EXAMPLES, FinetuneConfig(components=(component,), steps=8, lr=1e-2, batch_size=3))
    assert record.info["losses"][-1] < record.info["losses"][0]
    masks = trainable_masks(model, (component,))
    params = dict(model.hf_model.named_parameters())
    for name, p in params.items():
        if name not in masks:
            assert torch.equal(p, before[name]), name  # untouched parameters: bit for bit
        else:
            assert torch.equal(p[~masks[name]], before[name][~masks[name]]), name  # frozen entries too
    assert any(not torch.equal(params[n][m], before[n][m]) for n, m in masks.items())
    record.revert(model)
    assert all(torch.equal(p, before[n]) for n, p in model.hf_model.named_parameters())
    assert not any(p.grad is not None for p in model.hf_model.parameters())


def test_head_mask_selects_that_heads_slices():
    model = tiny("gpt2")  # fused c_attn [d, 3d] (Conv1D) and c_proj [d, d]
    d, dh = model.dims.d_model, model.dims.d_head
    masks = trainable_masks(model, ("blocks.0.attn.head.1",))
    qkv = masks["transformer.h.0.attn.c_attn.weight"]
    cols = qkv.any(0).nonzero().flatten().tolist()
    assert cols == [*range(dh, 2 * dh), *range(d + dh, d + 2 * dh), *range(2 * d + dh, 2 * d + 2 * dh)]
    rows = masks["transformer.h.0.attn.c_proj.weight"].any(1).nonzero().flatten().tolist()
    assert rows == list(range(dh, 2 * dh))
    assert "transformer.h.0.attn.c_proj.bias" not in masks  # the output bias is shared by all heads


def test_bad_components_raise():
    model = tiny("llama")
    with pytest.raises(ConfigError, match="unknown component"):
        FinetuneConfig(components=("layer.1",))
    with pytest.raises(ConfigError, match="layer 9 does not exist"):
        finetune(model, EXAMPLES, FinetuneConfig(components=("blocks.9.mlp",)))
    with pytest.raises(ConfigError, match="head 99 does not exist"):
        finetune(model, EXAMPLES, FinetuneConfig(components=("blocks.0.attn.head.99",)))
