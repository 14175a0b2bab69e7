"""The model core's structure: layout objects, the session list HookedModel owns, cached per-head results,
and adapters registered at run time."""

from __future__ import annotations

import pytest
import torch
import transformers

from mechscope.errors import AdapterError
from mechscope.model.adapters import ADAPTERS, Adapter, adapter_for, register_adapter, unregister_adapter
from mechscope.model.hooked import HookedModel
from mechscope.model.layouts import HeadSizes, Orientation, QKVLayout, qkv_layout, register_qkv_layout
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

SIZES = HeadSizes(n_heads=4, n_kv_heads=2, d_head=3)
MHA = HeadSizes(n_heads=3, n_kv_heads=3, d_head=2)


@pytest.mark.parametrize(("name", "sizes"), [("gpt2_fused", SIZES), ("concat_fused", SIZES), ("neox_interleaved", MHA)])
def test_fused_layouts_split_and_fuse_consistently_and_index_each_head(name, sizes):
    """fuse(split(W) applied to x) == x @ W, and head_outputs selects exactly that head's outputs."""
    layout = qkv_layout(name)
    d_in = 5
    out = sum(sizes.widths)
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(d_in, out, generator=gen), torch.randn(out, generator=gen)
    x = torch.randn(2, 7, d_in, generator=gen)
    ws, bs = layout.split(weight, bias, sizes)
    heads = [sizes.n_heads, sizes.n_kv_heads, sizes.n_kv_heads]
    q, k, v = [(x @ w + b).reshape(2, 7, h, sizes.d_head) for w, b, h in zip(ws, bs, heads, strict=True)]
    fused = x @ weight + bias
    torch.testing.assert_close(layout.fuse(q, k, v), fused)
    own_kv = sizes.n_heads == sizes.n_kv_heads
    for head in range(sizes.n_heads):
        ranges = layout.head_outputs(head, sizes, with_kv=own_kv)
        torch.testing.assert_close(fused[..., list(ranges[0])], q[..., head, :])
        if len(ranges) == 3:
            torch.testing.assert_close(fused[..., list(ranges[1])], k[..., head, :])
            torch.testing.assert_close(fused[..., list(ranges[2])], v[..., head, :])


def test_orientation_reads_and_writes_both_storage_conventions():
    w_out_in = torch.arange(6.0).reshape(2, 3)  # [out, in]
    for conv1d, stored in ((False, w_out_in), (True, w_out_in.T)):
        o = Orientation(conv1d)
        torch.testing.assert_close(o.out_in(stored), w_out_in)
        torch.testing.assert_close(o.in_out(stored), w_out_in.T)
        torch.testing.assert_close(o.stored_from_out_in(w_out_in), stored)
        assert stored.shape[o.axis("out")] == 2 and stored.shape[o.axis("in")] == 3
        basis = torch.tensor([[1.0, 0.0]])  # remove output 0
        projected = o.out_in(o.project_out_of_outputs(stored, basis))
        torch.testing.assert_close(projected[0], torch.zeros(3))
        torch.testing.assert_close(projected[1], w_out_in[1])


def test_layout_registries_refuse_taken_names():
    class Again(QKVLayout):
        name = "separate"

    with pytest.raises(AdapterError, match="already registered"):
        register_qkv_layout(Again())
    with pytest.raises(AdapterError, match="qkv_layout must be one of"):
        Adapter(family="x", model_types=("x",), embed="e", layers="l", final_norm="n", unembed="u", qkv_layout="odd")


def test_cached_head_results_use_the_weights_of_the_run_not_later_edits():
    hf, tok = tiny_model("llama")
    model = HookedModel(hf, tok)
    site = "blocks.1.attn.hook_result"
    _, cache = model.run_with_cache("the cat sat on the mat", [site])
    _, fresh = model.run_with_cache("the cat sat on the mat", [site])
    expected = fresh[site].clone()
    o_proj = model.layer_module(1, model.adapter.o_proj)
    with torch.no_grad():
        o_proj.weight.mul_(3.0)  # edit the weights in place after caching, before reading
    try:
        torch.testing.assert_close(cache[site], expected)
    finally:
        with torch.no_grad():
            o_proj.weight.div_(3.0)


def test_the_model_owns_its_session_list_and_hooks_nest():
    hf, tok = tiny_model("gpt2")
    model = HookedModel(hf, tok)
    assert not model.hooks_active
    with model.hooks({"blocks.0.hook_resid_pre": lambda a, c: None}) as outer:
        with model.hooks({"blocks.1.hook_resid_pre": lambda a, c: None}) as inner:
            assert model._sessions == [outer, inner] and model.hooks_active
        assert model._sessions == [outer]
        with pytest.raises(RuntimeError), model.hooks({"blocks.1.hook_resid_pre": lambda a, c: None}):
            raise RuntimeError("boom")
        assert model._sessions == [outer]
    assert not model.hooks_active


class _CustomConfig(transformers.LlamaConfig):
    model_type = "mechscope_test_custom_llama"


def test_register_adapter_teaches_a_new_family_and_refuses_taken_names():
    hf_ref, _ = tiny_model("llama")
    config = _CustomConfig(**{k: v for k, v in hf_ref.config.to_dict().items() if k != "model_type"})
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.load_state_dict(hf_ref.state_dict())
    with pytest.raises(AdapterError, match="no adapter"):
        adapter_for(config)
    llama = next(a for a in ADAPTERS if a.family == "llama")
    custom = Adapter(
        family="mechscope_test_custom",
        model_types=(_CustomConfig.model_type,),
        embed=llama.embed,
        layers=llama.layers,
        final_norm=llama.final_norm,
        unembed=llama.unembed,
    )
    register_adapter(custom)
    try:
        with pytest.raises(AdapterError, match="already have an adapter"):
            register_adapter(custom)
        with pytest.raises(AdapterError, match="already have an adapter"):
            register_adapter(Adapter(**{**custom.__dict__, "family": "another", "model_types": ("llama",)}))
        ids = torch.tensor([[5, 6, 7, 8]])
        model = HookedModel(hf)
        with torch.no_grad():
            torch.testing.assert_close(model.forward(ids), hf(input_ids=ids).logits)
        assert model.adapter.family == "mechscope_test_custom"
    finally:
        unregister_adapter("mechscope_test_custom")
    with pytest.raises(AdapterError, match="built-in"):
        unregister_adapter("llama")


def test_hook_sessions_are_thread_local():
    """A forward in a thread without a session sees no hooks, while another thread's session is active."""
    import threading

    hf, tok = tiny_model("llama")
    model = HookedModel(hf, tok)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        clean = model.forward(ids)
    opened, done = threading.Event(), threading.Event()
    inside: list[torch.Tensor] = []

    def hooked_thread() -> None:
        zero = {f"blocks.{i}.hook_resid_post": (lambda a, c: torch.zeros_like(a)) for i in range(2)}
        with model.hooks(zero), model.hooks({"blocks.0.attn.hook_pattern": lambda a, c: a * 0.5}):
            opened.set()
            done.wait(timeout=60)
            with torch.no_grad():
                inside.append(model.forward(ids))

    worker = threading.Thread(target=hooked_thread)
    worker.start()
    try:
        assert opened.wait(timeout=60)
        with torch.no_grad():
            for _ in range(5):
                torch.testing.assert_close(model.forward(ids), clean, atol=0, rtol=0)
    finally:
        done.set()
        worker.join(timeout=60)
    assert inside and not torch.allclose(inside[0], clean)  # the session still acts in its own thread
    assert not model.hooks_active


def test_inputs_are_checked_where_they_enter():
    from mechscope.errors import ConfigError
    from mechscope.model.hooked import ContextLengthWarning

    gpt2 = HookedModel(*tiny_model("gpt2"))  # learned positions, n_positions=64
    with pytest.raises(ConfigError, match="at least one token"):
        gpt2.forward(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"prompts \[1\] have no tokens"):
        gpt2.forward({"input_ids": torch.tensor([[5, 6], [0, 0]]), "attention_mask": torch.tensor([[1, 1], [0, 0]])})
    with pytest.raises(ConfigError, match="70 tokens is longer than this model's context of 64"):
        gpt2.forward(torch.full((1, 70), 5))
    llama = HookedModel(*tiny_model("llama"))  # rotary positions, max_position_embeddings=64
    with pytest.warns(ContextLengthWarning, match="runs past the 64 positions"):
        logits = llama.forward(torch.full((1, 70), 5))
    assert logits.shape == (1, 70, llama.dims.d_vocab)


def test_hook_helpers_name_the_valid_range_and_refuse_non_finite_values():
    from mechscope.errors import ConfigError, ShapeError
    from mechscope.model import hook_fns

    model = HookedModel(*tiny_model("gpt2"))  # 4 heads
    for fn, needle in (
        (hook_fns.zero(heads=[7]), r"heads \[7\] are out of range .* n_heads axis has 4 entries"),
        (hook_fns.zero(positions=[9]), r"positions \[9\] are out of range"),
        (hook_fns.scale(2.0, batch=[3]), r"batch rows \[3\] are out of range"),
    ):
        with pytest.raises(ShapeError, match=needle), model.hooks({"blocks.0.attn.hook_z": fn}):
            model.forward("the cat")
    assert not model.hooks_active
    with pytest.raises(ConfigError, match="finite"):
        hook_fns.scale(float("nan"))
    with pytest.raises(ConfigError, match="NaN or infinite"):
        hook_fns.add(torch.tensor([float("inf")] * model.dims.d_model))
