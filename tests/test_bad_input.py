"""Bad input gives a mechscope error that names what was expected and what came.

(A model folder that does not exist is covered by the loading tests.)
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import transformers

from mechscope.errors import (
    AdapterError,
    AttentionSiteError,
    ConfigError,
    MechscopeError,
    ShapeError,
    SiteError,
)
from mechscope.model.adapters import SUPPORTED_MODEL_TYPES
from mechscope.model.attention import HANDLERS_ATTR
from mechscope.model.hooked import HookedModel
from mechscope.sites import ATTENTION_INTERNAL_KINDS
from tiny_models import VOCAB, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

IDS = torch.tensor([[5, 6, 7, 8]])


@functools.cache
def model() -> HookedModel:
    hf, tok = tiny_model("llama")
    return HookedModel(hf, tok)


def assert_clean(m: HookedModel) -> None:
    for name, module in m.hf_model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, name
        assert not module._forward_pre_hooks_with_kwargs and not module._forward_hooks_with_kwargs, name
        assert HANDLERS_ATTR not in module.__dict__, name
    assert m._sessions == []


# Unknown sites ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.run_with_cache(IDS, sites=["blocks.0.hook_resid_psot"]),
        lambda m: m.hooks({"blocks.0.hook_resid_psot": lambda a, c: None}).__enter__(),
        lambda m: m.run_with_grads(IDS, lambda logits: logits.sum(), ["blocks.0.hook_resid_psot"]),
        lambda m: m.site("blocks.0.hook_resid_psot"),
    ],
    ids=["run_with_cache", "hooks", "run_with_grads", "site"],
)
def test_unknown_site(call):
    m = model()
    with pytest.raises(SiteError) as info:
        call(m)
    message = str(info.value)
    assert "'blocks.0.hook_resid_psot'" in message  # what came
    assert "'blocks.0.hook_resid_post'" in message  # what was meant
    assert_clean(m)


def test_unknown_site_in_a_cache():
    _, cache = model().run_with_cache(IDS, sites=["blocks.0.hook_resid_post"])
    with pytest.raises(SiteError, match=r"'blocks\.1\.hook_resid_post' was not cached.*run_with_cache"):
        cache["blocks.1.hook_resid_post"]
    with pytest.raises(SiteError, match=r"Did you mean 'blocks\.0\.hook_resid_post'"):
        cache["blocks.0.hook_resid_posst"]


def test_site_past_the_last_layer():
    with pytest.raises(SiteError, match=r"'blocks\.5\.hook_resid_post' is past the last layer.*layers 0\.\.1"):
        model().run_with_cache(IDS, sites=["blocks.5.hook_resid_post"])


def test_site_the_family_lacks():
    with pytest.raises(SiteError, match=r"'hook_pos_embed'"):
        model().run_with_cache(IDS, sites=["hook_pos_embed"])


# Hook return values -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "site,make_bad",
    [
        ("blocks.0.hook_resid_post", lambda a: a[:, :-1]),
        ("blocks.0.hook_resid_post", lambda a: a[None]),
        ("blocks.1.attn.hook_z", lambda a: a.flatten(-2)),
        ("blocks.0.attn.hook_pattern", lambda a: a[:, :2]),
        ("blocks.0.mlp.hook_pre_linear", lambda a: a[..., :3]),
        ("logits", lambda a: a[..., :5]),
    ],
)
def test_hook_returning_the_wrong_shape(site, make_bad):
    m = model()
    seen = {}

    def bad(act, ctx):
        seen["good"], out = tuple(act.shape), make_bad(act)
        seen["bad"] = tuple(out.shape)
        return out

    with pytest.raises(ShapeError) as info, m.hooks({site: bad}):
        m(IDS)
    message = str(info.value)
    assert site in message
    assert f"returned shape {seen['bad']}" in message
    assert f"expected {seen['good']}" in message
    assert_clean(m)


@pytest.mark.parametrize("value", [3, "zero", [1.0, 2.0], np.zeros(3)])
def test_hook_returning_a_non_tensor(value):
    m = model()
    with pytest.raises(ShapeError) as info, m.hooks({"blocks.1.hook_mlp_out": lambda a, c: value}):
        m(IDS)
    message = str(info.value)
    assert "blocks.1.hook_mlp_out" in message and "must return None or a tensor of shape (1, 4, 32)" in message
    assert f"got {type(value).__name__}" in message
    assert_clean(m)


@pytest.mark.parametrize("fn", [None, 3, "blocks.0.hook_z"])
def test_hook_that_is_not_callable(fn):
    m = model()
    with pytest.raises(ConfigError, match=f"hook for blocks.0.hook_attn_out must be callable.*got {type(fn).__name__}"):
        m.hooks({"blocks.0.hook_attn_out": fn}).__enter__()
    assert_clean(m)


def test_hooks_that_are_not_a_mapping():
    with pytest.raises(ConfigError, match=r"hooks must be a mapping \{site: fn\}; got list"):
        model().hooks(["blocks.0.hook_attn_out"]).__enter__()


# Attention sites where attention cannot give them ------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(ATTENTION_INTERNAL_KINDS))
def test_attention_sites_without_mechscope_attention(kind):
    hf, _ = tiny_model("llama", with_tokenizer=False)
    m = HookedModel(hf, attention_sites=False)
    assert m.attention_base is None
    assert hf.config._attn_implementation == "sdpa"  # left untouched
    site = f"blocks.0.{kind}"
    assert site in m.site_names  # the site exists; this attention cannot expose it
    for call in (
        lambda: m.run_with_cache(IDS, sites=[site]),
        lambda: m.hooks({site: lambda a, c: None}).__enter__(),
    ):
        with pytest.raises(AttentionSiteError) as info:
            call()
        message = str(info.value)
        assert repr(site) in message and "'sdpa'" in message and "attention_sites=True" in message
        assert isinstance(info.value, SiteError)
    # Module-boundary sites still work, and hook_result is computed from the output projection.
    _, cache = m.run_with_cache(IDS, sites=["blocks.0.hook_attn_out", "blocks.0.attn.hook_result"])
    assert cache["blocks.0.attn.hook_result"].shape == (1, 4, 4, 32)
    summed = cache["blocks.0.attn.hook_result"].sum(2) + m.weights.b_O_layer(0)
    torch.testing.assert_close(summed, cache["blocks.0.hook_attn_out"], atol=1e-5, rtol=0)
    assert_clean(m)


def test_attention_sites_under_a_non_registry_implementation():
    hf, _ = tiny_model("llama", attn_implementation="flex_attention", with_tokenizer=False)
    m = HookedModel(hf)
    assert m.attention_base is None
    assert not m.pattern_available()
    with pytest.raises(AttentionSiteError) as info:
        m.run_with_cache(IDS, sites=["blocks.1.attn.hook_pattern"])
    message = str(info.value)
    assert "'blocks.1.attn.hook_pattern'" in message
    assert "'flex_attention'" in message  # what came
    assert "attn_implementation='sdpa' or 'eager'" in message  # what is expected


# Unsupported architectures ------------------------------------------------------------------------------
_UNSUPPORTED = {
    "opt": lambda: transformers.OPTForCausalLM(
        transformers.OPTConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            max_position_embeddings=32,
            word_embed_proj_dim=16,
        )
    ),
    "bloom": lambda: transformers.BloomForCausalLM(
        transformers.BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2)
    ),
}


@pytest.mark.parametrize("model_type", sorted(_UNSUPPORTED))
def test_unsupported_architecture(model_type):
    hf = _UNSUPPORTED[model_type]()
    with pytest.raises(AdapterError) as info:
        HookedModel(hf)
    message = str(info.value)
    assert f"model_type {model_type!r}" in message
    for supported in (
        "gpt2",
        "gpt_neox",
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma2",
        "gemma3_text",
        "phi3",
        "olmo2",
    ):
        assert supported in message
    assert set(SUPPORTED_MODEL_TYPES) >= {"gpt2", "llama", "olmo2"}
    assert "docs/adapters.md" in message
    assert isinstance(info.value, MechscopeError)


@pytest.mark.parametrize("obj", [torch.nn.Linear(2, 2), "gpt2", None, {"config": 1}])
def test_not_a_model(obj):
    with pytest.raises(AdapterError, match=f"expected a Hugging Face causal LM.*got {type(obj).__name__}"):
        HookedModel(obj)


def test_base_model_without_lm_head():
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, intermediate_size=32, num_attention_heads=2
    )
    with pytest.raises(AdapterError, match=r"LlamaModel has no module 'model\.embed_tokens'.*causal LM"):
        HookedModel(transformers.LlamaModel(config))


# Inputs -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ids,fragment",
    [
        (torch.tensor([[1, VOCAB]]), f"token ids must lie in [0, {VOCAB}); got values from 1 to {VOCAB}"),
        (torch.tensor([[-1, 5]]), f"token ids must lie in [0, {VOCAB}); got values from -1 to 5"),
        (torch.tensor([3, 1000]), "got values from 3 to 1000"),
        ({"input_ids": torch.tensor([[1, 999]])}, "got values from 1 to 999"),
    ],
)
def test_token_ids_out_of_range(ids, fragment):
    m = model()
    with pytest.raises(ConfigError) as info:
        m(ids)
    assert fragment in str(info.value)
    with pytest.raises(ConfigError, match="token ids must lie"):
        m.run_with_cache(ids, sites=["blocks.0.hook_resid_post"])
    assert_clean(m)


@pytest.mark.parametrize(
    "inputs,fragment",
    [
        (5, "inputs must be text, a list of texts, token ids [batch, pos] or a mapping with input_ids; got int"),
        (None, "got NoneType"),
        (np.array([[1, 2]]), "got ndarray"),
        (torch.tensor([1.0, 2.0]), "expected integer token ids; got dtype torch.float32"),
        (torch.ones(1, 3), "expected integer token ids; got dtype torch.float32"),
        (torch.tensor([[True, False]]), "got dtype torch.bool"),
        (torch.ones(1, 2, 3, dtype=torch.long), "expected token ids of shape [pos] or [batch, pos]; got (1, 2, 3)"),
        (torch.tensor(3), "got ()"),
        (torch.zeros(1, 0, dtype=torch.long), "expected at least one token; got token ids of shape (1, 0)"),
        ([1, 2, 3], "expected a string or a non-empty list of strings; got list of int"),
        ([], "expected a string or a non-empty list of strings; got list"),
        ({"attention_mask": torch.ones(1, 3)}, "an input mapping needs 'input_ids'; got keys ['attention_mask']"),
        (
            {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 4, dtype=torch.long)},
            "attention_mask shape (1, 4) != input_ids shape (1, 3)",
        ),
    ],
)
def test_wrong_input_types(inputs, fragment):
    m = model()
    with pytest.raises(ConfigError) as info:
        m(inputs)
    assert fragment in str(info.value)


def test_text_without_a_tokenizer():
    hf, _ = tiny_model("llama", with_tokenizer=False)
    m = HookedModel(hf)
    for call in (lambda: m("hello"), lambda: m.to_tokens("hello"), lambda: m.to_str_tokens("hi")):
        with pytest.raises(ConfigError, match="this HookedModel has no tokenizer; pass tokenizer="):
            call()


def test_bad_padding_side():
    with pytest.raises(ConfigError, match="padding_side must be 'left' or 'right'; got 'middle'"):
        model().to_tokens(["a", "b c"], padding_side="middle")


def test_tokenizer_without_pad_or_eos():
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.eos_token = None
    m = HookedModel(tiny_model("llama", with_tokenizer=False)[0], tok)
    with pytest.raises(ConfigError, match="neither a pad token nor an EOS token"):
        m.to_tokens(["a cat", "the dog sat"])


# Options ------------------------------------------------------------------------------------------------
def test_bad_options():
    m = model()
    with pytest.raises(ConfigError, match=r"stop_at_layer must be in 0\.\.2; got -1"):
        m.run_with_cache(IDS, sites=["hook_embed"], stop_at_layer=-1)
    with pytest.raises(ConfigError, match=r"site blocks\.1\.hook_resid_post is not computed before stop_at_layer=1"):
        m.run_with_cache(IDS, sites=["blocks.1.hook_resid_post"], stop_at_layer=1)
    with pytest.raises(ConfigError, match=r"positions \[4\] are out of range .* expected indices in \[-4, 4\)"):
        m.run_with_cache(IDS, sites=["blocks.0.hook_resid_post"], positions=[0, 4])
    with pytest.raises(ConfigError, match=r"loss_fn must return a scalar tensor; got Tensor \(1, 4\)"):
        m.run_with_grads(IDS, lambda logits: logits.sum(-1), ["blocks.0.hook_resid_post"])
    with pytest.raises(ConfigError, match="loss_fn must return a scalar tensor; got float"):
        m.run_with_grads(IDS, lambda logits: 1.0, ["blocks.0.hook_resid_post"])
    assert_clean(m)
    assert all(p.grad is None for p in m.hf_model.parameters())
