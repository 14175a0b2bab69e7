"""LayerNorm folding keeps the model's function and makes pre-norms pure normalisers."""

from __future__ import annotations

import pytest
import torch

from mechscope.model.folding import fold_layer_norm
from mechscope.model.hooked import HookedModel
from tiny_models import FAMILIES, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_folding_preserves_logits(family):
    hf, _ = tiny_model(family, with_tokenizer=False)
    model = HookedModel(hf)
    tokens = torch.randint(4, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    before = model(tokens)
    fold_layer_norm(model)
    torch.testing.assert_close(model(tokens), before, atol=2e-5, rtol=1e-5)
    offset = model.adapter.norm.weight_offset
    final = model.module(model.adapter.final_norm)
    torch.testing.assert_close(final.weight, torch.full_like(final.weight, 1.0 - offset))


def test_folding_unties_embeddings_instead_of_rescaling_them():
    hf, _ = tiny_model("llama_tied", with_tokenizer=False)
    model = HookedModel(hf)
    embed_before = model.weights.W_E.clone()
    fold_layer_norm(model)
    torch.testing.assert_close(model.weights.W_E, embed_before)
    assert model.module("lm_head").weight is not model.module("model.embed_tokens").weight
