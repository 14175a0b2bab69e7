"""Adapter conformance: one suite, every supported family, tiny random models built from configs.

Each check compares mechscope against Hugging Face's own computation (logits, hidden states,
attention weights) or against an identity that must hold by definition (residual sums, per-head
sums), so a wrong module path, split or transform in an adapter fails here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from mechscope.model.attention import HANDLERS_ATTR
from mechscope.model.hooked import HookedModel
from mechscope.sites import ATTENTION_INTERNAL_KINDS, Site
from tiny_models import FAMILIES, VOCAB, attention_bases, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-5
BATCH, POS = 2, 10  # longer than the sliding windows (4) of mistral / gemma
FAMILY_BASES = [(f, b) for f in FAMILIES for b in attention_bases(f)]
_IDS = pytest.mark.parametrize("family,base", FAMILY_BASES, ids=[f"{f}-{b}" for f, b in FAMILY_BASES])
_FAM = pytest.mark.parametrize("family", FAMILIES)

# What each family has, written out here independently of the adapters.
_GATED_LLAMA = dict(pos_embed=False, parallel=False, norms=True, gated=True)
FEATURES: dict[str, dict[str, bool]] = {
    "gpt2": dict(pos_embed=True, parallel=False, norms=True, gated=False),
    "gpt_neox": dict(pos_embed=False, parallel=True, norms=True, gated=False),
    "gpt_neox_sequential": dict(pos_embed=False, parallel=False, norms=True, gated=False),
    "llama": _GATED_LLAMA,
    "llama_tied": _GATED_LLAMA,
    "mistral": _GATED_LLAMA,
    "qwen2": _GATED_LLAMA,
    "qwen3": _GATED_LLAMA,
    "gemma2": _GATED_LLAMA,
    "gemma3_text": _GATED_LLAMA,
    "phi3": _GATED_LLAMA,
    "olmo2": dict(pos_embed=False, parallel=False, norms=False, gated=True),
}
#: Expected sizes (see tiny_models): (n_heads, n_kv_heads, d_head, d_mlp).
SIZES: dict[str, tuple[int, int, int, int]] = {
    "gpt2": (4, 4, 8, 128),
    "gpt_neox": (4, 4, 8, 64),
    "gpt_neox_sequential": (4, 4, 8, 64),
    **{f: (4, 2, 8, 48) for f in FAMILIES if f not in ("gpt2", "gpt_neox", "gpt_neox_sequential")},
}
#: HF module (per layer) whose *input* is the attention output before its post-norm.
POST_ATTN_NORM = {f: "model.layers.{L}.post_attention_layernorm" for f in ("gemma2", "gemma3_text", "olmo2")}
#: Families whose attention reads a sliding window in some layer (KV cache trimmed while generating).
SLIDING = {"mistral", "gemma2", "gemma3_text"}


@dataclass
class Case:
    family: str
    base: str
    model: HookedModel
    ids: torch.Tensor
    hf_logits: torch.Tensor  # HF's own logits with the same base, computed before wrapping
    hf_eager_logits: torch.Tensor  # HF eager attention, same weights
    hf_hidden: tuple[torch.Tensor, ...]  # HF output_hidden_states (eager model)
    hf_attentions: tuple[torch.Tensor, ...]  # HF eager attention weights


def _ids(seed: int = 0, batch: int = BATCH, pos: int = POS) -> torch.Tensor:
    return torch.randint(4, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


@functools.cache
def case(family: str, base: str) -> Case:
    ids = _ids()
    model, tok = tiny_model(family, attn_implementation=base)
    with torch.no_grad():
        hf_logits = model(ids).logits
        # A separate eager build (same seed, same weights) for references that install HF's
        # output-recording hooks, so the wrapped model's modules stay hook-free.
        eager, _ = tiny_model(family, attn_implementation="eager", with_tokenizer=False)
        out = eager(ids, output_hidden_states=True, output_attentions=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), eager.state_dict().values()))
    return Case(family, base, HookedModel(model, tok), ids, hf_logits, out.logits, out.hidden_states, out.attentions)


@functools.cache
def full_cache(family: str, base: str) -> Any:
    c = case(family, base)
    with torch.no_grad():
        logits, cache = c.model.run_with_cache(c.ids)
    return logits, cache


def _all_hook_dicts(module: torch.nn.Module) -> list[dict[Any, Any]]:
    return [
        module._forward_hooks,
        module._forward_pre_hooks,
        module._forward_hooks_with_kwargs,
        module._forward_pre_hooks_with_kwargs,
        module._backward_hooks,
    ]


def assert_no_hooks(model: HookedModel) -> None:
    for name, module in model.hf_model.named_modules():
        for hooks in _all_hook_dicts(module):
            assert not hooks, f"hook left on {name or 'model'}: {hooks}"
        assert HANDLERS_ATTR not in module.__dict__, f"attention handler left on {name}"
        assert not module.__dict__.get("_mechscope_attention_chain"), f"attention chain left on {name}"
    assert model._sessions == []


# Logits -------------------------------------------------------------------------------------------------
@_IDS
def test_logits_equal_hf(family, base):
    c = case(family, base)
    assert c.model.attention_base == base
    assert c.model.config._attn_implementation == f"mechscope_{base}"
    with torch.no_grad():
        logits = c.model(c.ids)
    assert logits.shape == (BATCH, POS, VOCAB)
    torch.testing.assert_close(logits, c.hf_logits, atol=ATOL, rtol=0)


@_IDS
def test_attention_sites_eager_path_equals_hf_eager(family, base):
    """Hooks on every attention-internal site force mechscope's eager attention; it equals HF's eager."""
    c = case(family, base)
    sites = [s for s in c.model.sites() if s.is_attention_internal]
    assert {s.kind for s in sites} == ATTENTION_INTERNAL_KINDS
    calls: list[str] = []

    def replace_by_clone(act, ctx):
        calls.append(ctx.name)
        return act.clone()

    with torch.no_grad(), c.model.hooks({s: replace_by_clone for s in sites}):
        logits = c.model(c.ids)
    assert sorted(calls) == sorted(s.name for s in sites)
    torch.testing.assert_close(logits, c.hf_eager_logits, atol=ATOL, rtol=0)
    assert_no_hooks(c.model)


@_IDS
def test_pattern_equals_hf_attention_weights(family, base):
    c = case(family, base)
    _, cache = full_cache(family, base)
    for layer, hf_weights in enumerate(c.hf_attentions):
        torch.testing.assert_close(cache[f"blocks.{layer}.attn.hook_pattern"], hf_weights, atol=ATOL, rtol=0)


@_IDS
def test_attention_internals_are_consistent(family, base):
    """scores = softcap(q k^T * scaling) (q, k after rotary), pattern = softmax(scores), z = pattern v."""
    c = case(family, base)
    _, cache = full_cache(family, base)
    groups = c.model.dims.n_heads // c.model.dims.n_kv_heads
    softcap = getattr(c.model.config, "attn_logit_softcapping", None)
    for layer in range(c.model.dims.n_layers):
        attn = c.model.layer_module(layer, c.model.adapter.attn)
        q = cache[f"blocks.{layer}.attn.hook_q"]  # [b, p, h, d]
        k = cache[f"blocks.{layer}.attn.hook_k"].repeat_interleave(groups, dim=2)
        v = cache[f"blocks.{layer}.attn.hook_v"].repeat_interleave(groups, dim=2)
        scores = cache[f"blocks.{layer}.attn.hook_attn_scores"]
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        expected = torch.einsum("bqhd,bkhd->bhqk", q, k) * attn.scaling
        if softcap is not None:
            expected = torch.tanh(expected / softcap) * softcap
        visible = scores > -1e30
        causal = torch.ones(POS, POS, dtype=torch.bool).tril()
        assert bool((visible <= causal).all()), "a future position is visible"
        assert bool(visible.diagonal(dim1=-2, dim2=-1).all()), "a position cannot see itself"
        torch.testing.assert_close(scores[visible], expected[visible], atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(pattern, scores.softmax(-1), atol=ATOL, rtol=0)
        torch.testing.assert_close(
            cache[f"blocks.{layer}.attn.hook_z"], torch.einsum("bhqk,bkhd->bqhd", pattern, v), atol=ATOL, rtol=0
        )
        layer_types = getattr(c.model.config, "layer_types", None) or ["sliding_attention"] * 2
        if family in SLIDING and layer_types[layer] == "sliding_attention":
            assert not bool(visible[..., POS - 1, 0].any()), "the sliding window is not applied"


#: Activation attribute of each family's HF MLP module (default ``act_fn``).
ACT_ATTR = {"gpt2": "act", "gpt_neox": "act", "gpt_neox_sequential": "act", "phi3": "activation_fn"}
#: q/k norms applied before rotary: per head ("head") or over the flat projection ("flat").
QK_NORM = {"qwen3": "head", "gemma3_text": "head", "olmo2": "flat"}
#: HF module (per layer) normalising the MLP output before the residual add.
POST_MLP_NORM = {f: "model.layers.{L}.post_feedforward_layernorm" for f in ("gemma2", "gemma3_text", "olmo2")}


@_IDS
def test_projection_sites_match_weight_views(family, base):
    """q/k/v, MLP pre/pre_linear/post/out and embeddings recomputed from the inputs and weight views.

    Checks the fused-projection splits (GPT-2, NeoX interleaved, Phi-3) and gate/up order, and that
    ln1/ln2 are the norms that feed attention and the MLP. Rotary is the identity at position 0, so q
    and k are compared there; later positions are covered by the scores check above.
    """
    c = case(family, base)
    m = c.model
    _, cache = full_cache(family, base)
    norms, gated = FEATURES[family]["norms"], FEATURES[family]["gated"]
    torch.testing.assert_close(cache["hook_embed"], m.weights.W_E[c.ids], atol=ATOL, rtol=0)
    if FEATURES[family]["pos_embed"]:
        torch.testing.assert_close(cache["hook_pos_embed"][0], m.weights.W_pos[:POS], atol=0, rtol=0)
    for layer in range(m.dims.n_layers):
        name = lambda kind, layer=layer: f"blocks.{layer}.{kind}"  # noqa: E731
        x_attn = cache[name("ln1.hook_normalized" if norms else "hook_resid_pre")]
        x_mlp = cache[name("ln2.hook_normalized" if norms else "hook_resid_mid")]
        w_q, w_k, w_v, b_q, b_k, b_v = m.weights.qkv(layer)
        v = torch.einsum("bpd,hde->bphe", x_attn, w_v) + b_v
        torch.testing.assert_close(cache[name("attn.hook_v")], v, atol=ATOL, rtol=0)
        q0 = torch.einsum("bd,hde->bhe", x_attn[:, 0], w_q) + b_q
        k0 = torch.einsum("bd,hde->bhe", x_attn[:, 0], w_k) + b_k
        attn = m.layer_module(layer, m.adapter.attn)
        if QK_NORM.get(family) == "head":
            q0, k0 = attn.q_norm(q0), attn.k_norm(k0)
        elif QK_NORM.get(family) == "flat":
            q0, k0 = attn.q_norm(q0.flatten(-2)).view_as(q0), attn.k_norm(k0.flatten(-2)).view_as(k0)
        torch.testing.assert_close(cache[name("attn.hook_q")][:, 0], q0, atol=ATOL, rtol=0)
        torch.testing.assert_close(cache[name("attn.hook_k")][:, 0], k0, atol=ATOL, rtol=0)

        w = m.weights.mlp(layer)
        pre = x_mlp @ (w["W_gate"] if gated else w["W_in"]) + (w["b_gate"] if gated else w["b_in"])
        torch.testing.assert_close(cache[name("mlp.hook_pre")], pre, atol=ATOL, rtol=0)
        act = getattr(m.layer_module(layer, m.adapter.mlp), ACT_ATTR.get(family, "act_fn"))
        post = act(pre)
        if gated:
            linear = x_mlp @ w["W_in"] + w["b_in"]
            torch.testing.assert_close(cache[name("mlp.hook_pre_linear")], linear, atol=ATOL, rtol=0)
            post = post * linear
        torch.testing.assert_close(cache[name("mlp.hook_post")], post, atol=ATOL, rtol=0)
        out = post @ w["W_out"] + w["b_out"]
        if family in POST_MLP_NORM:
            out = m.hf_model.get_submodule(POST_MLP_NORM[family].format(L=layer))(out)
        torch.testing.assert_close(cache[name("hook_mlp_out")], out, atol=ATOL, rtol=0)


# Inventory and shapes ------------------------------------------------------------------------------------
def expected_site_names(family: str) -> list[str]:
    f = FEATURES[family]
    names = ["hook_embed"] + (["hook_pos_embed"] if f["pos_embed"] else [])
    for layer in range(2):
        kinds = ["hook_resid_pre"]
        kinds += ["ln1.hook_normalized"] if f["norms"] else []
        kinds += ["attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern"]
        kinds += ["attn.hook_z", "attn.hook_result", "hook_attn_out"]
        kinds += [] if f["parallel"] else ["hook_resid_mid"]
        kinds += ["ln2.hook_normalized"] if f["norms"] else []
        kinds += ["mlp.hook_pre"] + (["mlp.hook_pre_linear"] if f["gated"] else [])
        kinds += ["mlp.hook_post", "hook_mlp_out", "hook_resid_post"]
        names += [f"blocks.{layer}.{k}" for k in kinds]
    return [*names, "ln_final.hook_normalized", "logits"]


@_FAM
def test_site_inventory_is_exact(family):
    model = case(family, attention_bases(family)[0]).model
    assert model.site_names == expected_site_names(family)
    d = model.dims
    assert (d.n_layers, d.d_model, d.d_vocab) == (2, 32, VOCAB)
    assert (d.n_heads, d.n_kv_heads, d.d_head, d.d_mlp) == SIZES[family]
    assert d.parallel == FEATURES[family]["parallel"]
    assert d.gated == FEATURES[family]["gated"]


TIED = {"gpt2", "llama_tied", "qwen2", "gemma2", "gemma3_text"}


@_FAM
def test_tied_and_untied_embeddings(family):
    m = case(family, attention_bases(family)[0]).model
    embed, unembed = m.module(m.adapter.embed).weight, m.module(m.adapter.unembed).weight
    assert (embed.data_ptr() == unembed.data_ptr()) == (family in TIED)
    assert m.weights.W_U.shape == (32, VOCAB)
    if family not in TIED:
        assert not torch.equal(embed, unembed)


@_IDS
def test_cached_shapes_are_exact(family, base):
    c = case(family, base)
    logits, cache = full_cache(family, base)
    d = c.model.dims
    size = dict(
        batch=BATCH,
        pos=POS,
        query_pos=POS,
        key_pos=POS,
        d_model=d.d_model,
        n_heads=d.n_heads,
        n_kv_heads=d.n_kv_heads,
        d_head=d.d_head,
        d_mlp=d.d_mlp,
        d_vocab=d.d_vocab,
    )
    assert list(cache) == c.model.site_names  # every site, in forward order
    for name in cache:
        expected = tuple(size[axis] for axis in Site.parse(name).axes)
        assert tuple(cache[name].shape) == expected, name
    n_heads, n_kv, d_head, d_mlp = SIZES[family]
    assert cache["blocks.1.attn.hook_k"].shape == (BATCH, POS, n_kv, d_head)
    assert cache["blocks.1.attn.hook_pattern"].shape == (BATCH, n_heads, POS, POS)
    assert cache["blocks.0.attn.hook_result"].shape == (BATCH, POS, n_heads, 32)
    assert cache["blocks.0.mlp.hook_post"].shape == (BATCH, POS, d_mlp)
    torch.testing.assert_close(cache["logits"], logits, atol=0, rtol=0)
    torch.testing.assert_close(logits, c.hf_logits, atol=ATOL, rtol=0)


# Residual stream ---------------------------------------------------------------------------------------
@_IDS
@pytest.mark.parametrize("every_site", [True, False], ids=["every-site", "resid-only"])
def test_resid_sites_equal_hf_hidden_states(family, base, every_site):
    """Against HF's output_hidden_states, with every site cached (mechscope's eager attention) and
    with residual sites only (the base attention kernel untouched)."""
    c = case(family, base)
    if every_site:
        _, cache = full_cache(family, base)
    else:
        kinds = ["hook_resid_pre", "hook_resid_post", "ln_final.hook_normalized"]
        _, cache = c.model.run_with_cache(c.ids, sites=c.model.sites(kinds=kinds))
    hidden = c.hf_hidden  # (embeddings, layer 0 output, ..., final-normed last layer output)
    n = c.model.dims.n_layers
    assert len(hidden) == n + 1
    for layer in range(n):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], hidden[layer], atol=ATOL, rtol=0)
    for layer in range(n - 1):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_post"], hidden[layer + 1], atol=ATOL, rtol=0)
    torch.testing.assert_close(cache["ln_final.hook_normalized"], hidden[n], atol=ATOL, rtol=0)
    # The final norm is a real step: its input (last resid_post) is not its output.
    assert (cache[f"blocks.{n - 1}.hook_resid_post"] - hidden[n]).abs().max() > 1e-2


@_IDS
def test_residual_decomposition(family, base):
    c = case(family, base)
    _, cache = full_cache(family, base)
    embed = cache["hook_embed"] + (cache.get("hook_pos_embed", 0))
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], embed, atol=ATOL, rtol=0)
    total = embed
    for layer in range(c.model.dims.n_layers):
        pre = cache[f"blocks.{layer}.hook_resid_pre"]
        attn, mlp = cache[f"blocks.{layer}.hook_attn_out"], cache[f"blocks.{layer}.hook_mlp_out"]
        post = cache[f"blocks.{layer}.hook_resid_post"]
        if FEATURES[family]["parallel"]:
            assert f"blocks.{layer}.hook_resid_mid" not in cache
            torch.testing.assert_close(post, pre + attn + mlp, atol=ATOL, rtol=0)
        else:
            mid = cache[f"blocks.{layer}.hook_resid_mid"]
            torch.testing.assert_close(mid, pre + attn, atol=ATOL, rtol=0)
            torch.testing.assert_close(post, mid + mlp, atol=ATOL, rtol=0)
        if layer + 1 < c.model.dims.n_layers:
            torch.testing.assert_close(cache[f"blocks.{layer + 1}.hook_resid_pre"], post, atol=0, rtol=0)
        total = total + attn + mlp
    # Embeddings + every attention and MLP output sum to the final residual stream.
    torch.testing.assert_close(total, cache[f"blocks.{c.model.dims.n_layers - 1}.hook_resid_post"], atol=1e-4, rtol=0)


@_IDS
def test_head_results_sum_to_attention_output(family, base):
    c = case(family, base)
    m = c.model
    n = m.dims.n_layers
    # Attention output before any post-norm: the post-norm's input, via a plain torch hook.
    pre_norm: dict[int, torch.Tensor] = {}
    handles = []
    if family in POST_ATTN_NORM:
        for layer in range(n):
            module = m.hf_model.get_submodule(POST_ATTN_NORM[family].format(L=layer))
            handles.append(
                module.register_forward_pre_hook(lambda _m, args, layer=layer: pre_norm.__setitem__(layer, args[0]))
            )
    eager_results: dict[str, torch.Tensor] = {}
    record = lambda act, ctx: eager_results.__setitem__(ctx.name, act.clone())  # noqa: E731
    try:
        with torch.no_grad():
            _, cache = m.run_with_cache(c.ids)  # hook_result expanded lazily from hook_z
            with m.hooks({f"blocks.{layer}.attn.hook_result": record for layer in range(n)}):
                logits = m(c.ids)  # hook_result computed in a hook on the output projection
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(logits, c.hf_logits, atol=ATOL, rtol=0)
    for layer in range(n):
        name = f"blocks.{layer}.attn.hook_result"
        summed = cache[name].sum(dim=2) + m.weights.b_O_layer(layer)
        target = pre_norm[layer] if family in POST_ATTN_NORM else cache[f"blocks.{layer}.hook_attn_out"]
        torch.testing.assert_close(summed, target, atol=ATOL, rtol=0)
        torch.testing.assert_close(eager_results[name], cache[name], atol=ATOL, rtol=0)
        if family in POST_ATTN_NORM:  # the post-norm is a real step
            assert (target - cache[f"blocks.{layer}.hook_attn_out"]).abs().max() > 1e-2


# Writing -----------------------------------------------------------------------------------------------
@_IDS
def test_replacing_every_site_by_itself_changes_nothing(family, base):
    c = case(family, base)
    calls: dict[str, int] = {}

    def same(act, ctx):
        calls[ctx.name] = calls.get(ctx.name, 0) + 1
        return act.clone()

    with torch.no_grad():
        clean = c.model(c.ids)
        with c.model.hooks({s: same for s in c.model.sites()}):
            patched = c.model(c.ids)
    assert calls == {name: 1 for name in c.model.site_names}  # every site fired exactly once
    assert (patched - clean).abs().max() < ATOL
    assert_no_hooks(c.model)


@_FAM
def test_noise_at_any_site_changes_logits(family):
    c = case(family, attention_bases(family)[0])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        clean = c.model(c.ids)
        unchanged = []
        for site in c.model.sites():

            def noise(act, ctx):
                return act + torch.randn(act.shape, generator=gen)

            with c.model.hooks({site: noise}):
                noisy = c.model(c.ids)
            if (noisy - clean).abs().max() < 1e-3:
                unchanged.append(site.name)
    assert unchanged == [], f"writing these sites had no effect: {unchanged}"


# Generation --------------------------------------------------------------------------------------------
@_IDS
def test_hooks_fire_at_every_generation_step(family, base):
    c = case(family, base)
    m = c.model
    prompt, new = c.ids[:, :6], 4
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    kwargs.update(output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        plain = m.generate(prompt, **kwargs)
    seen: dict[str, list[tuple[int, ...]]] = {}
    sites = ["hook_embed", "blocks.0.attn.hook_pattern", "blocks.1.attn.hook_q", "blocks.1.hook_resid_post", "logits"]

    def record(act, ctx):
        seen.setdefault(ctx.name, []).append(tuple(act.shape))

    with torch.no_grad(), m.hooks({s: record for s in sites}):
        hooked = m.generate(prompt, **kwargs)
    assert_no_hooks(m)
    assert set(seen) == set(sites)
    for name, shapes in seen.items():
        assert len(shapes) == new, (name, shapes)  # prompt forward + one per new token after it
        axes = Site.parse(name).axes
        pos_axis = axes.index("query_pos") if "query_pos" in axes else axes.index("pos")
        # HF's generate computes logits at the last position only (logits_to_keep=1).
        first = 1 if name == "logits" else 6
        assert [s[pos_axis] for s in shapes] == [first] + [1] * (new - 1), (name, shapes)
        assert all(s[0] == BATCH for s in shapes)
    if family not in SLIDING:
        assert [s[-1] for s in seen["blocks.0.attn.hook_pattern"]] == [6, 7, 8, 9]
    # Read-only hooks (eager attention path included) do not change what is generated.
    assert torch.equal(hooked.sequences, plain.sequences)
    for a, b in zip(hooked.scores, plain.scores):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@_FAM
def test_steering_hook_changes_generation(family):
    c = case(family, attention_bases(family)[0])
    m = c.model
    prompt = c.ids[:, :6]
    direction = torch.randn(m.dims.d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = m.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        with m.hooks({"blocks.0.hook_resid_post": lambda act, ctx: act + 10 * direction}):
            steered = m.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        again = m.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert steered.shape == plain.shape
    assert torch.equal(steered[:, :6], prompt)
    assert not torch.equal(steered, plain)
    assert torch.equal(again, plain)  # the steering hook is gone after the block
    assert_no_hooks(m)


# Hook lifetime ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "gemma2", "phi3", "olmo2"])
def test_no_hook_survives_an_exception(family):
    model, _ = tiny_model(family, with_tokenizer=False)
    m = HookedModel(model)
    ids = _ids()
    assert_no_hooks(m)
    every = {s: (lambda act, ctx: None) for s in m.sites()}

    # 1. Raised in the body of the block, after a forward.
    with pytest.raises(RuntimeError, match="boom"), m.hooks(every):
        assert HANDLERS_ATTR in m.layer_module(0, m.adapter.attn).__dict__
        assert any(m.layer(0)._forward_pre_hooks.values()) or m.layer(0)._forward_pre_hooks_with_kwargs
        m(ids)
        raise RuntimeError("boom")
    assert_no_hooks(m)

    # 2. Raised inside a hook, mid-forward, from an attention-internal site and a module site.
    for site in ("blocks.1.attn.hook_pattern", "blocks.0.hook_resid_post"):

        def explode(act, ctx):
            raise ValueError(f"hook failed at {ctx.name}")

        with pytest.raises(ValueError, match="hook failed"), m.hooks({**every, site: [explode]}):
            m(ids)
        assert_no_hooks(m)

    # 3. Raised while generating.
    steps = []

    def stop_on_third(act, ctx):
        steps.append(act.shape)
        if len(steps) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), m.hooks({"blocks.0.attn.hook_z": stop_on_third}):
        m.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert_no_hooks(m)

    # 4. A bad site in the mapping: nothing is installed at all.
    with (
        pytest.raises(Exception, match=r"blocks\.7"),
        m.hooks({**every, "blocks.7.hook_resid_post": every[Site("hook_embed")]}),
    ):
        pass
    assert_no_hooks(m)

    # The model still computes HF's logits afterwards.
    with torch.no_grad():
        torch.testing.assert_close(m(ids), model(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("site", ["blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern", "blocks.0.attn.hook_q"])
def test_nested_hook_blocks_compose_and_unwind(site):
    model, _ = tiny_model("llama", with_tokenizer=False)
    m = HookedModel(model)
    ids = _ids()
    order: list[str] = []
    seen_by_inner: list[torch.Tensor] = []
    clean: list[torch.Tensor] = []

    def outer(act, ctx):
        order.append("outer")
        clean.append(act.clone())
        return act * 0.5

    def inner(act, ctx):
        order.append("inner")
        seen_by_inner.append(act.clone())

    def innermost(act, ctx):
        order.append("innermost")

    with torch.no_grad():
        base = m(ids)
        with m.hooks({site: outer}):
            with m.hooks({site: inner}), m.hooks({site: innermost}):
                nested = m(ids)
            assert order == ["outer", "inner", "innermost"]
            torch.testing.assert_close(seen_by_inner[0], clean[0] * 0.5, atol=0, rtol=0)
            order.clear()
            outer_only = m(ids)  # inner blocks are gone, outer still active
            assert order == ["outer"]
            assert len(m._sessions) == 1
        order.clear()
        after = m(ids)
    assert order == []
    assert_no_hooks(m)
    torch.testing.assert_close(nested, outer_only, atol=0, rtol=0)  # inner hooks only read
    assert (outer_only - base).abs().max() > 1e-3
    torch.testing.assert_close(after, base, atol=0, rtol=0)
