"""Residual decomposition, final-norm scaling, direct logit attribution and weight views, per family."""

from __future__ import annotations

import pytest
import torch

from mechscope.model import decompose as dc
from mechscope.model.hooked import HookedModel
from mechscope.sites import Site
from tiny_models import FAMILIES, tiny_model


def softcapped(model: HookedModel) -> bool:
    """Final logit soft-capping makes logits a non-linear function of the residual (DLA is pre-cap)."""
    return getattr(model.config, "final_logit_softcapping", None) is not None


@pytest.fixture(scope="module", params=FAMILIES)
def run(request):
    hf, _ = tiny_model(request.param, with_tokenizer=False)
    model = HookedModel(hf)
    tokens = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    logits, cache = model.run_with_cache(tokens)
    return request.param, model, tokens, logits, cache


def test_decomposition_sums_to_final_residual(run):
    _, model, _, _, cache = run
    final = cache[Site("hook_resid_post", model.dims.n_layers - 1)]
    for heads in (True, False):
        parts = dc.decompose_resid(model, cache, heads=heads)
        torch.testing.assert_close(parts.total(), final, atol=2e-5, rtol=1e-5)
    n_expected = 1 + (model.adapter.pos_embed is not None) + model.dims.n_layers * (model.dims.n_heads + 2)
    assert len(dc.decompose_resid(model, cache)) == n_expected


def test_decomposition_before_a_layer_sums_to_resid_pre(run):
    _, model, _, _, cache = run
    parts = dc.decompose_resid(model, cache, layer=1)
    torch.testing.assert_close(parts.total(), cache["blocks.1.hook_resid_pre"], atol=2e-5, rtol=1e-5)
    assert dc.decompose_resid(model, cache, layer=0).labels[-1] in ("embed", "pos_embed")


def test_per_head_terms_sum_to_attention_output(run):
    _, model, _, _, cache = run
    for layer in range(model.dims.n_layers):
        per_head, bias = dc.head_terms(model, layer, cache[Site("attn.hook_z", layer)])
        torch.testing.assert_close(per_head.sum(-2) + bias, cache[Site("hook_attn_out", layer)], atol=2e-5, rtol=1e-5)


def test_final_norm_scaling_reproduces_normalised_stream(run):
    _, model, _, _, cache = run
    final = cache[Site("hook_resid_post", model.dims.n_layers - 1)]
    normed = dc.apply_final_norm(model, dc.decompose_resid(model, cache), final)
    torch.testing.assert_close(normed.total(), cache["ln_final.hook_normalized"], atol=2e-5, rtol=1e-5)


def test_accumulated_resid_is_the_residual_before_each_layer(run):
    _, model, _, _, cache = run
    acc = dc.accumulated_resid(model, cache)
    assert acc.values.shape[0] == model.dims.n_layers + 1
    torch.testing.assert_close(acc.values[0], cache["blocks.0.hook_resid_pre"])


def test_direct_logit_attribution_sums_to_logit_difference(run):
    _, model, tokens, logits, _ = run
    if softcapped(model):
        pytest.skip("DLA attributes pre-softcap logits")
    dla = dc.direct_logit_attribution(model, tokens, [5, 6], baseline=7, position=-2)
    expected = logits[torch.arange(2), -2, torch.tensor([5, 6])] - logits[:, -2, 7]
    torch.testing.assert_close(dla.logit, expected, atol=5e-5, rtol=1e-5)
    assert len(dla.top(3)) == 3


def test_direct_logit_attribution_reads_each_rows_last_token_by_default():
    # A right-padded batch's last column is padding in its shorter rows: by default DLA reads each row at
    # its last real token, and equals the logit difference each prompt gives alone.
    model = HookedModel(*tiny_model("gpt2"))
    prompts = ["the cat sat on the mat today", "a dog", "we read a book"]
    batch = model.to_tokens(prompts, padding_side="right")
    assert not bool(batch["attention_mask"][:, -1].all())
    dla = dc.direct_logit_attribution(model, batch, 5, baseline=7)
    alone = torch.stack([model.forward(p)[0, -1, 5] - model.forward(p)[0, -1, 7] for p in prompts])
    torch.testing.assert_close(dla.logit, alone.detach(), atol=5e-5, rtol=1e-5)


def test_weight_views_reproduce_activations(run):
    family, model, tokens, logits, cache = run
    w = model.weights
    torch.testing.assert_close(cache["hook_embed"], w.W_E[tokens], atol=1e-6, rtol=1e-6)
    if model.adapter.pos_embed is not None:
        torch.testing.assert_close(cache["hook_pos_embed"][0], w.W_pos[: tokens.shape[1]])
    for layer in range(model.dims.n_layers):
        attn_in = (
            cache[Site("ln1.hook_normalized", layer)] if model.adapter.ln1 else cache[Site("hook_resid_pre", layer)]
        )
        _, _, w_v, _, _, b_v = w.qkv(layer)
        v = torch.einsum("bpd,hdk->bphk", attn_in, w_v) + b_v
        torch.testing.assert_close(v, cache[Site("attn.hook_v", layer)], atol=2e-5, rtol=1e-5)
        if family == "gpt2":  # no rotary: queries are a plain projection
            q = torch.einsum("bpd,hdk->bphk", attn_in, w.W_Q[layer]) + w.b_Q[layer]
            torch.testing.assert_close(q, cache[Site("attn.hook_q", layer)], atol=2e-5, rtol=1e-5)
        mlp_in = (
            cache[Site("ln2.hook_normalized", layer)] if model.adapter.ln2 else cache[Site("hook_resid_mid", layer)]
        )
        mlp = w.mlp(layer)
        first = mlp["W_gate"] if mlp["W_gate"] is not None else mlp["W_in"]
        bias = mlp["b_gate"] if mlp["b_gate"] is not None else mlp["b_in"]
        torch.testing.assert_close(mlp_in @ first + bias, cache[Site("mlp.hook_pre", layer)], atol=2e-5, rtol=1e-5)
        out = cache[Site("mlp.hook_post", layer)] @ mlp["W_out"] + mlp["b_out"]
        if model.adapter.post_mlp_norm is None:
            torch.testing.assert_close(out, cache[Site("hook_mlp_out", layer)], atol=2e-5, rtol=1e-5)
    if not softcapped(model):
        torch.testing.assert_close(cache["ln_final.hook_normalized"] @ w.W_U + w.b_U, logits, atol=2e-5, rtol=1e-5)
    assert (
        w.W_K.shape == w.W_Q.shape == (model.dims.n_layers, model.dims.n_heads, model.dims.d_model, model.dims.d_head)
    )
    assert w.W_O.shape == (model.dims.n_layers, model.dims.n_heads, model.dims.d_head, model.dims.d_model)


def test_gqa_key_heads_are_expanded_in_weight_views():
    hf, _ = tiny_model("llama", with_tokenizer=False)
    model = HookedModel(hf)
    _, w_k, _, _, _, _ = model.weights.qkv(0)
    assert w_k.shape[0] == model.dims.n_kv_heads < model.dims.n_heads
    expanded = model.weights.W_K[0]
    groups = model.dims.n_heads // model.dims.n_kv_heads
    torch.testing.assert_close(expanded[0], expanded[groups - 1])
    torch.testing.assert_close(expanded[groups], w_k[1])


def test_head_results_with_a_single_head_and_flattened_z():
    """One head: n_heads * d_head == d_head, so flattened z must be recognised by rank, not width."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mechscope.errors import ShapeError

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=16,
    )
    m = HookedModel(LlamaForCausalLM(cfg).eval())
    z = torch.randn(2, 3, 16)
    flat = m.head_results(z, 0)
    assert flat.shape == (2, 3, 1, 16)
    torch.testing.assert_close(flat, m.head_results(z.reshape(2, 3, 1, 16), 0))
    with pytest.raises(ShapeError, match=r"\[batch, pos, 1, 16\]"):
        m.head_results(torch.randn(2, 3, 2, 8), 0)
