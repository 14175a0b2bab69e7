"""Reading and writing activations: hook semantics, run_with_cache, gradients, padding, cache files."""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import save_file

from mechscope.errors import ConfigError, MechscopeError, ShapeError, SiteError
from mechscope.model.cache import ActivationCache
from mechscope.model.hooked import HookedModel
from mechscope.sites import PATTERN_KINDS, Site
from tiny_models import FAMILIES, VOCAB, attention_bases, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-5
BATCH, POS = 2, 8


@functools.cache
def hooked(family: str = "llama", base: str | None = None) -> HookedModel:
    model, tok = tiny_model(family, attn_implementation=base or attention_bases(family)[0])
    return HookedModel(model, tok)


def _ids(seed: int = 0, batch: int = BATCH, pos: int = POS) -> torch.Tensor:
    return torch.randint(4, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def m() -> HookedModel:
    return hooked("llama")


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return _ids()


@pytest.fixture(scope="module")
def clean(m, ids):
    with torch.no_grad():
        return m.run_with_cache(ids)


# Reading and writing ------------------------------------------------------------------------------------
def test_returning_none_keeps_the_activation(m, ids, clean):
    seen = {}

    def read(act, ctx):
        seen[ctx.name] = act.clone()
        assert ctx.model is m and ctx.site == Site.parse(ctx.name)
        assert ctx.layer == Site.parse(ctx.name).layer

    with torch.no_grad(), m.hooks({s: read for s in m.sites()}):
        logits = m(ids)
    torch.testing.assert_close(logits, clean[0], atol=0, rtol=0)
    assert set(seen) == set(m.site_names)
    for name, act in seen.items():
        torch.testing.assert_close(act, clean[1][name], atol=ATOL, rtol=0)


def test_editing_in_place_and_returning_none_writes(m, ids, clean):
    def zero_last_position(act, ctx):
        act[:, -1] = 0

    with torch.no_grad(), m.hooks({"blocks.1.hook_resid_pre": zero_last_position}):
        logits, cache = m.run_with_cache(ids, sites=["blocks.1.hook_resid_pre"])
    assert bool((cache["blocks.1.hook_resid_pre"][:, -1] == 0).all())
    torch.testing.assert_close(logits[:, :-1], clean[0][:, :-1], atol=ATOL, rtol=0)  # causal
    assert (logits[:, -1] - clean[0][:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "site", ["hook_embed", "blocks.0.hook_resid_mid", "blocks.0.attn.hook_v", "blocks.1.mlp.hook_post", "logits"]
)
def test_returning_a_tensor_replaces_it(m, ids, clean, site):
    replacement = torch.randn(clean[1][site].shape, generator=torch.Generator().manual_seed(3))
    # The outer block writes; run_with_cache's own (inner) reader sees the replacement.
    with torch.no_grad(), m.hooks({site: lambda act, ctx: replacement}):
        logits, cache = m.run_with_cache(ids, sites=[site])
    # (hook_resid_mid is written back as resid_pre + (new - resid_pre): equal up to rounding)
    torch.testing.assert_close(cache[site], replacement, atol=ATOL, rtol=0)
    assert (logits - clean[0]).abs().max() > 1e-3
    if site == "logits":
        torch.testing.assert_close(logits, replacement, atol=0, rtol=0)


def test_replacing_resid_mid_moves_only_the_residual(m, ids, clean):
    """Writing hook_resid_mid changes resid_mid; resid_pre of the same layer is untouched."""
    site = "blocks.0.hook_resid_mid"
    target = clean[1][site] + 1.0
    with torch.no_grad(), m.hooks({site: lambda act, ctx: target}):
        _, cache = m.run_with_cache(ids, sites=[site, "blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"])
    torch.testing.assert_close(cache[site], target, atol=ATOL, rtol=0)
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], clean[1]["blocks.0.hook_resid_pre"], atol=0, rtol=0)
    mlp_out = cache["blocks.0.hook_resid_post"] - cache[site]
    assert (mlp_out - clean[1]["blocks.0.hook_mlp_out"]).abs().max() > 1e-3  # the MLP read the new value


def test_several_functions_on_one_site_run_in_order(m, ids):
    order = []
    fns = [
        lambda act, ctx: order.append("a") or act * 2,
        lambda act, ctx: order.append("b"),
        lambda act, ctx: order.append("c") or act + 1,
    ]
    with torch.no_grad(), m.hooks({"blocks.0.hook_attn_out": fns}):
        _, cache = m.run_with_cache(ids, sites=["blocks.0.hook_attn_out"])
    with torch.no_grad():
        _, plain = m.run_with_cache(ids, sites=["blocks.0.hook_attn_out"])
    assert order == ["a", "b", "c"]
    torch.testing.assert_close(
        cache["blocks.0.hook_attn_out"], plain["blocks.0.hook_attn_out"] * 2 + 1, atol=ATOL, rtol=0
    )


@pytest.mark.parametrize(
    "site", ["blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern", "blocks.0.attn.hook_result"]
)
def test_wrong_shape_return_raises_shape_error(m, ids, site):
    bad_shape = None

    def wrong(act, ctx):
        nonlocal bad_shape
        bad = act[..., :-1]
        bad_shape = tuple(bad.shape)
        return bad

    with pytest.raises(ShapeError) as info, torch.no_grad(), m.hooks({site: wrong}):
        m(ids)
    message = str(info.value)
    good_shape = tuple(m.run_with_cache(ids, sites=[site])[1][site].shape)
    assert site in message
    assert str(bad_shape) in message and str(good_shape) in message
    assert isinstance(info.value, MechscopeError)


# run_with_cache -----------------------------------------------------------------------------------------
def test_cache_only_requested_sites(m, ids, clean):
    sites = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern", Site("hook_embed")]
    logits, cache = m.run_with_cache(ids, sites=sites)
    assert sorted(cache) == sorted(["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern", "hook_embed"])
    assert len(cache) == 3
    for name in cache:
        torch.testing.assert_close(cache[name], clean[1][name], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, clean[0], atol=ATOL, rtol=0)
    with pytest.raises(SiteError, match="was not cached"):
        cache["blocks.0.hook_resid_post"]
    _, single = m.run_with_cache(ids, sites="blocks.0.hook_mlp_out")
    assert list(single) == ["blocks.0.hook_mlp_out"]


def test_cached_tensors_are_detached(m, ids):
    _, cache = m.run_with_cache(ids, sites=["blocks.0.hook_resid_post"])
    assert not cache["blocks.0.hook_resid_post"].requires_grad


@pytest.mark.parametrize("positions", [[0, 3], [-1], [2, -1, 0]])
def test_cache_positions(m, ids, clean, positions):
    _, cache = m.run_with_cache(ids, positions=positions)
    assert cache.positions == positions
    absolute = torch.tensor([p % POS for p in positions])
    assert set(cache) == set(clean[1])
    for name in cache:
        site = Site.parse(name)
        expected = clean[1][name].index_select(site.pos_axis, absolute)
        assert cache[name].shape == expected.shape, name
        torch.testing.assert_close(cache[name], expected, atol=ATOL, rtol=0)
    # Pattern sites keep every key position and only the chosen query positions.
    assert cache["blocks.0.attn.hook_pattern"].shape[-1] == POS


@pytest.mark.parametrize("positions", [[POS], [-POS - 1]])
def test_cache_positions_out_of_range(m, ids, positions):
    with pytest.raises(ConfigError, match=str(positions[0])):
        m.run_with_cache(ids, sites=["blocks.0.hook_resid_post"], positions=positions)


def test_lazy_hook_result_equals_the_hooked_one(m, ids):
    site = "blocks.1.attn.hook_result"
    _, lazy = m.run_with_cache(ids, sites=[site])
    assert site in lazy
    eager = {}
    with torch.no_grad(), m.hooks({site: lambda act, ctx: eager.__setitem__("x", act.clone())}):
        _, inside = m.run_with_cache(ids, sites=[site])  # hooked by the outer block: computed eagerly
    torch.testing.assert_close(lazy[site], eager["x"], atol=ATOL, rtol=0)
    torch.testing.assert_close(inside[site], eager["x"], atol=0, rtol=0)
    z = m.run_with_cache(ids, sites=["blocks.1.attn.hook_z"])[1]["blocks.1.attn.hook_z"]
    w_o = m.weights.W_O_layer(1)
    manual = torch.einsum("bphk,hkd->bphd", z, w_o)
    torch.testing.assert_close(lazy[site], manual, atol=ATOL, rtol=0)


def test_stop_at_layer(m, ids, clean):
    ran = []
    handle = m.layer(1).register_forward_hook(lambda *a: ran.append(1))
    try:
        logits, cache = m.run_with_cache(ids, sites=["blocks.0.hook_resid_post", "hook_embed"], stop_at_layer=1)
    finally:
        handle.remove()
    assert logits is None
    assert ran == []
    assert sorted(cache) == ["blocks.0.hook_resid_post", "hook_embed"]
    torch.testing.assert_close(
        cache["blocks.0.hook_resid_post"], clean[1]["blocks.0.hook_resid_post"], atol=ATOL, rtol=0
    )
    with pytest.raises(ConfigError, match="stop_at_layer"):
        m.run_with_cache(ids, sites=["blocks.1.hook_resid_pre"], stop_at_layer=1)
    with pytest.raises(ConfigError, match="stop_at_layer"):
        m.run_with_cache(ids, sites=["logits"], stop_at_layer=0)
    with pytest.raises(ConfigError, match=r"0\.\.2"):
        m.run_with_cache(ids, sites=["hook_embed"], stop_at_layer=5)
    logits, cache = m.run_with_cache(ids, sites=["blocks.1.hook_resid_post"], stop_at_layer=2)
    torch.testing.assert_close(
        cache["blocks.1.hook_resid_post"], clean[1]["blocks.1.hook_resid_post"], atol=ATOL, rtol=0
    )
    assert m._sessions == []
    assert not m.layer(0)._forward_pre_hooks and not m.layer(1)._forward_pre_hooks


# Gradients ----------------------------------------------------------------------------------------------
def _loss(logits: torch.Tensor) -> torch.Tensor:
    return logits[0, -1, 5] - logits[1, 2, 7] + 0.1 * logits.pow(2).mean()


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_gradients_match_plain_autograd(family):
    m = hooked(family)
    ids = _ids()
    sites = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern", "hook_embed"]
    result = m.run_with_grads(ids, _loss, sites)
    assert all(p.grad is None for p in m.hf_model.parameters())
    assert torch.is_tensor(result.loss) and result.loss.ndim == 0
    # Reference: plain torch on HF's modules, making layer 0's output a leaf.
    leaf = {}

    def make_leaf(_module, _args, output):
        hidden = output if torch.is_tensor(output) else output[0]
        hidden = hidden.detach().requires_grad_(True)
        leaf["h"] = hidden
        return hidden if torch.is_tensor(output) else (hidden, *output[1:])

    handle = m.layer(0).register_forward_hook(make_leaf)
    try:
        with torch.enable_grad():
            logits = m.hf_model(input_ids=ids).logits
            loss = _loss(logits)
            loss.backward()
    finally:
        handle.remove()
    torch.testing.assert_close(result.loss, loss.detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(result.activations["blocks.0.hook_resid_post"], leaf["h"].detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(result.gradients["blocks.0.hook_resid_post"], leaf["h"].grad, atol=1e-6, rtol=1e-4)
    for name in sites:
        assert result.gradients[name].shape == result.activations[name].shape
        assert result.gradients[name].abs().max() > 0
    m.hf_model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "gpt_neox_sequential"])
def test_gradients_at_every_site_match_finite_differences(family):
    """d loss / d site, for every site, against central differences of a write at that site (fp64).

    These families compute in fp64 end to end (their norms do not upcast to fp32), so differences are
    exact enough; only the eager softmax behind scores/pattern runs in fp32, hence a looser check there.
    """
    model, _ = tiny_model(family, with_tokenizer=False)
    m = HookedModel(model.double())
    ids = _ids(pos=5)

    def loss_fn(logits):
        return logits[:, -1].log_softmax(-1)[:, 9].sum() + logits[:, 1, 3].sum()

    result = m.run_with_grads(ids, loss_fn, m.sites())
    gen = torch.Generator().manual_seed(0)
    for site in m.sites():
        grad = result.gradients[site]
        assert grad.shape == result.activations[site].shape
        direction = torch.randn(grad.shape, generator=gen, dtype=torch.float64)
        loose = site.kind in PATTERN_KINDS
        eps = 1e-3 if loose else 1e-5

        def shifted(sign, site=site, direction=direction, eps=eps):
            with torch.no_grad(), m.hooks({site: lambda act, ctx: act + sign * eps * direction}):
                return loss_fn(m(ids))

        numeric = (shifted(1) - shifted(-1)) / (2 * eps)
        analytic = (grad * direction).sum()
        assert numeric.abs() > 1e-4, site  # the loss depends on every site
        torch.testing.assert_close(
            analytic,
            numeric,
            atol=1e-4 if loose else 1e-6,
            rtol=1e-3 if loose else 1e-5,
            msg=lambda s, site=site: f"{site}: {s}",
        )


def test_gradient_is_causal(m, ids):
    result = m.run_with_grads(ids, lambda logits: logits[:, 3].sum(), ["blocks.1.hook_resid_mid"])
    grad = result.gradients["blocks.1.hook_resid_mid"]
    assert grad[:, 4:].abs().max() == 0
    assert grad[:, 3].abs().max() > 0


def test_loss_must_be_scalar(m, ids):
    with pytest.raises(ConfigError, match="scalar"):
        m.run_with_grads(ids, lambda logits: logits.sum(-1), ["blocks.0.hook_resid_post"])
    assert m._sessions == []


# Cache files --------------------------------------------------------------------------------------------
def test_cache_save_load_round_trip(m, ids, tmp_path):
    sites = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_result", "blocks.1.attn.hook_pattern"]
    _, cache = m.run_with_cache(ids, sites=sites, positions=[1, -1])
    path = cache.save(tmp_path / "sub" / "acts.safetensors")
    assert path.is_file()
    loaded = ActivationCache.load(path)
    assert sorted(loaded) == sorted(sites)
    assert loaded.positions == [1, -1]
    assert loaded.meta["model_type"] == "llama"
    for name in sites:
        torch.testing.assert_close(loaded[name], cache[name], atol=0, rtol=0)
    assert not list(tmp_path.glob("**/*.tmp"))


def test_cache_load_rejects_other_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(ConfigError, match="not a mechscope activation cache"):
        ActivationCache.load(plain)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        ActivationCache.load(garbage)
    with pytest.raises(ConfigError, match="no activation cache file"):
        ActivationCache.load(tmp_path / "missing.safetensors")
    newer = tmp_path / "newer.safetensors"
    save_file(
        {"hook_embed": torch.zeros(1, 2, 3)},
        str(newer),
        metadata={"format": "mechscope.activation_cache", "schema_version": "99"},
    )
    with pytest.raises(ConfigError, match="schema version 99"):
        ActivationCache.load(newer)


def test_cache_stack(m, ids, clean):
    stacked = clean[1].stack("hook_resid_post")
    assert stacked.shape == (2, BATCH, POS, 32)
    torch.testing.assert_close(stacked[1], clean[1]["blocks.1.hook_resid_post"], atol=0, rtol=0)
    with pytest.raises(SiteError, match="no cached site of kind"):
        ActivationCache({"hook_embed": torch.zeros(1)}).stack("hook_resid_post")


# Padding ------------------------------------------------------------------------------------------------
PROMPTS = [
    "The cat sat on the mat and looked at the dog.",
    "Hello world!",
    "The capital of France is Paris",
]
_PAD_SITES_KINDS = (
    "hook_embed",
    "hook_pos_embed",
    "hook_resid_pre",
    "attn.hook_z",
    "hook_attn_out",
    "mlp.hook_post",
    "hook_resid_post",
    "ln_final.hook_normalized",
    "logits",
)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_prompts_run_alone(family, side):
    m = hooked(family)
    tok = tiny_tokenizer()
    batch = m.to_tokens(PROMPTS, padding_side=side)
    lengths = batch["attention_mask"].sum(-1).tolist()
    width = batch["input_ids"].shape[1]
    assert len(set(lengths)) == len(PROMPTS)  # really padded
    sites = [s for s in m.sites() if s.kind in _PAD_SITES_KINDS] + m.sites(kinds="attn.hook_pattern")
    with torch.no_grad():
        logits, cache = m.run_with_cache(batch, sites=sites)
    for row, prompt in enumerate(PROMPTS):
        alone_ids = torch.tensor([tok(prompt)["input_ids"]])
        n = alone_ids.shape[1]
        assert n == lengths[row]
        with torch.no_grad():
            alone_logits, alone = m.run_with_cache(alone_ids, sites=sites)
        real = slice(width - n, width) if side == "left" else slice(0, n)
        torch.testing.assert_close(logits[row, real.stop - 1], alone_logits[0, -1], atol=ATOL, rtol=0)
        for site in sites:
            got = cache[site][row]
            got = got[:, real, real] if site.kind == "attn.hook_pattern" else got[real]
            torch.testing.assert_close(got, alone[site][0], atol=ATOL, rtol=0, msg=lambda s, site=site: f"{site}: {s}")


def test_text_batches_use_the_tokenizer_padding_side():
    m = hooked("gpt2")
    assert m.tokenizer.padding_side == "right"
    right = m.to_tokens(PROMPTS)
    assert bool((right["attention_mask"][:, 0] == 1).all())
    left = m.to_tokens(PROMPTS, padding_side="left")
    assert bool((left["attention_mask"][:, -1] == 1).all())
    with torch.no_grad():
        from_text = m(PROMPTS)
        from_ids = m(right)
    torch.testing.assert_close(from_text, from_ids, atol=0, rtol=0)


def test_generation_with_left_padding_matches_single_prompts():
    m = hooked("llama")
    with torch.no_grad():
        batched = m.generate_text(PROMPTS, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        single = [m.generate_text(p, max_new_tokens=4, min_new_tokens=4, do_sample=False)[0] for p in PROMPTS]
    assert batched == single
    assert all(len(t) > 0 for t in batched)
