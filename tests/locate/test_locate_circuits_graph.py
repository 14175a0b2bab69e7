"""Circuit graph: structure, and the edge-level forward's definition (all kept = model, all ablated =
an independently computed run, removing a whole receiver group = patching that component)."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import AdapterError, ShapeError
from mechscope.locate.circuits.ablation import ablation_values
from mechscope.locate.circuits.forward import graph_forward, node_outputs
from mechscope.locate.circuits.graph import Graph, GraphError
from mechscope.model.hooked import HookedModel
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

FAMILIES = ["gpt2", "llama", "gpt_neox", "phi3", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return HookedModel(tiny_model(request.param, with_tokenizer=False)[0])


def pair(batch: int = 2, pos: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(4, 100, (batch, pos), generator=gen)
    corrupt = torch.randint(4, 100, (batch, pos), generator=gen)
    return clean, corrupt


def test_edge_counts_follow_the_block_structure():
    seq = Graph(n_layers=3, n_heads=4, n_kv_heads=2, parallel=False)
    par = Graph(n_layers=3, n_heads=4, n_kv_heads=2, parallel=True)
    recv_attn = 4 + 2 * 2
    n_up = 1 + 3 * 5
    expected_seq = sum(recv_attn * (1 + 5 * layer) + (1 + 5 * layer + 4) for layer in range(3)) + n_up
    assert seq.n_edges == expected_seq
    assert par.n_edges == expected_seq - 3 * 4  # parallel MLPs do not read their own layer's heads
    assert "a0.h1->m0" in seq.edge_names and "a0.h1->m0" not in par.edge_names
    assert "a1.kv0.k" in [n.name for n in seq.receivers]
    mha = Graph(n_layers=1, n_heads=2, n_kv_heads=2, parallel=False)
    assert [n.name for n in mha.receivers][:6] == ["a0.h0.q", "a0.h1.q", "a0.h0.k", "a0.h1.k", "a0.h0.v", "a0.h1.v"]
    # Edges only go forward: from an earlier layer, or from a head into its own layer's sequential MLP.
    up, recv = seq.edge_index
    for u, r in zip(up.tolist(), recv.tolist()):
        src, dst = seq.upstream[u], seq.receivers[r]
        if src.layer is not None and dst.layer is not None:
            assert src.layer < dst.layer or (src.kind == "head" and dst.kind == "mlp" and src.layer == dst.layer)


def test_dense_and_flat_round_trip_and_errors():
    g = Graph(n_layers=2, n_heads=2, n_kv_heads=1, parallel=False)
    values = torch.arange(g.n_edges, dtype=torch.float32)
    assert torch.equal(g.flat(g.dense(values)), values)
    assert g.edge(g.edge_names[5]) == 5
    with pytest.raises(GraphError, match=r"unknown upstream node 'a9\.h0'"):
        g.edge("a9.h0->logits")
    with pytest.raises(GraphError, match="unknown receiver node"):
        g.edge("input->a0.h0.x")
    with pytest.raises(GraphError, match=r"no edge 'a1\.h0->a0\.h0\.q'"):
        g.edge("a1.h0->a0.h0.q")
    with pytest.raises(ShapeError, match="n_edges"):
        g.dense(torch.ones(3))
    with pytest.raises(ShapeError):
        Graph(n_layers=1, n_heads=3, n_kv_heads=2, parallel=False)


def test_biased_post_norm_attention_is_refused():
    hf = tiny_model("gemma3_text", with_tokenizer=False)[0]
    with torch.no_grad():
        hf.model.layers[1].self_attn.o_proj.bias = torch.nn.Parameter(torch.full((hf.config.hidden_size,), 0.1))
    with pytest.raises(AdapterError, match="attention output bias"):
        Graph.from_model(HookedModel(hf))


def test_graph_of_another_model_is_refused(model):
    other = Graph(n_layers=5, n_heads=1, n_kv_heads=1, parallel=False)
    clean, _ = pair()
    with pytest.raises(GraphError, match="does not match"):
        graph_forward(model, other, model.prepare_inputs(clean), torch.ones(other.n_edges))


def test_every_edge_kept_reproduces_the_model(model):
    g = Graph.from_model(model)
    clean, corrupt = pair()
    tokens = model.prepare_inputs(clean)
    reference = model.forward(tokens)
    # A mask that requires grad forces every receiver to be rebuilt from its own residual.
    mask = torch.ones(g.n_edges, requires_grad=True)
    _, outs, ablated = ablation_values(model, g, tokens, model.prepare_inputs(corrupt), "resample")
    rebuilt = graph_forward(model, g, tokens, mask, ablated=ablated)
    torch.testing.assert_close(rebuilt, reference, rtol=0, atol=1e-5)
    fixed = graph_forward(model, g, tokens, mask, fixed_delta=outs - ablated)
    torch.testing.assert_close(fixed, reference, rtol=0, atol=1e-5)


def test_node_outputs_decompose_the_final_residual(model):
    g = Graph.from_model(model)
    clean, _ = pair()
    tokens = model.prepare_inputs(clean)
    _, outs = node_outputs(model, g, tokens)
    final = {}
    norm = model.module(model.adapter.final_norm)
    handle = norm.register_forward_pre_hook(lambda _m, args: final.setdefault("x", args[0]))
    try:
        model.forward(tokens)
    finally:
        handle.remove()
    bias = model.weights.b_O.sum(0)
    torch.testing.assert_close(outs.sum(2) + bias, final["x"], rtol=0, atol=1e-5)


def _final_logits(model, resid):
    logits = model.module(model.adapter.unembed)(model.module(model.adapter.final_norm)(resid))
    cap = getattr(model.hf_model.config, "final_logit_softcapping", None)  # Gemma 2
    return logits if cap is None else torch.tanh(logits / cap) * cap


@pytest.mark.parametrize("ablation", ["zero", "resample"])
def test_only_input_to_logits_kept_equals_an_independent_run(model, ablation):
    g = Graph.from_model(model)
    clean, corrupt = pair()
    ct, xt = model.prepare_inputs(clean), model.prepare_inputs(corrupt)
    _, clean_outs, ablated = ablation_values(model, g, ct, xt, ablation)
    mask = torch.zeros(g.n_edges)
    mask[g.edge("input->logits")] = 1
    got = graph_forward(model, g, ct, mask, ablated=ablated)
    bias = model.weights.b_O.sum(0)
    with torch.no_grad():
        if ablation == "zero":
            expected = _final_logits(model, clean_outs[:, :, 0] + bias)
        else:
            _, corrupt_outs = node_outputs(model, g, xt)
            expected = _final_logits(model, corrupt_outs[:, :, 1:].sum(2) + bias + clean_outs[:, :, 0])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("component", ["attn", "mlp", "logits"])
def test_cutting_a_receiver_group_equals_patching_the_component(model, component):
    g = Graph.from_model(model)
    clean, corrupt = pair()
    ct, xt = model.prepare_inputs(clean), model.prepare_inputs(corrupt)
    _, _, ablated = ablation_values(model, g, ct, xt, "resample")
    layer = model.dims.n_layers - 1
    group = {"attn": g.attn_group(layer), "mlp": g.mlp_group(layer), "logits": g.logits_group()}[component]
    dense = torch.ones(g.valid.shape)
    dense[:, group.receivers] = 0
    got = graph_forward(model, g, ct, dense, ablated=ablated)
    if component == "logits":
        expected = model.forward(xt)
    else:
        site = f"blocks.{layer}.hook_{component}_out"
        _, cache = model.run_with_cache(xt, sites=[site])
        with model.hooks({site: lambda _a, _c: cache[site]}):
            expected = model.forward(ct)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_resampling_a_run_with_itself_is_a_no_op(model):
    g = Graph.from_model(model)
    clean, _ = pair()
    ct = model.prepare_inputs(clean)
    _, _, ablated = ablation_values(model, g, ct, ct, "resample")
    mask = torch.rand(g.n_edges, generator=torch.Generator().manual_seed(0)) > 0.5
    torch.testing.assert_close(graph_forward(model, g, ct, mask, ablated=ablated), model.forward(ct), rtol=0, atol=1e-5)


def test_bad_ablation_shapes_are_refused(model):
    g = Graph.from_model(model)
    clean, _ = pair()
    with pytest.raises(ShapeError, match="ablated values must be"):
        graph_forward(model, g, model.prepare_inputs(clean), torch.ones(g.n_edges), ablated=torch.zeros(1, 3, 2, 1))
    with pytest.raises(ShapeError, match="edge mask must be"):
        graph_forward(model, g, model.prepare_inputs(clean), torch.ones(4))


def test_ablation_values_follow_their_definitions(model):
    g = Graph.from_model(model)
    clean, corrupt = pair()
    ct, xt = model.prepare_inputs(clean), model.prepare_inputs(corrupt)
    _, clean_outs = node_outputs(model, g, ct)
    _, corrupt_outs = node_outputs(model, g, xt)
    torch.testing.assert_close(ablation_values(model, g, ct, None, "mean")[2], clean_outs.mean(0, keepdim=True))
    torch.testing.assert_close(ablation_values(model, g, ct, xt, "mean")[2], corrupt_outs.mean(0, keepdim=True))
    torch.testing.assert_close(ablation_values(model, g, ct, xt, "resample")[2], corrupt_outs)
    assert not ablation_values(model, g, ct, xt, "zero")[2].any()


def test_mean_ablation_on_a_left_padded_batch_leaves_each_rows_bos_out_of_the_mean():
    # Left padding puts each row's BOS at another position; averaged in, it would swamp the text tokens there
    # (Gemma's BOS residual is 14x a text token's). The mean is over the rows with text at a position; a BOS
    # keeps its own output, the same in every prompt.
    hf, tok = tiny_model("llama")
    model = HookedModel(hf, tok)
    g = Graph.from_model(model)
    texts = ["a b c d e f g h", "a b c", "a b c d e"]
    batch = model.to_tokens(texts, padding_side="left")
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    bos = real & (ids == tok.bos_token_id)
    assert bos.sum() == 3 and len(set(bos.int().argmax(1).tolist())) == 3  # three BOS positions
    _, outs = node_outputs(model, g, batch)
    ablated = ablation_values(model, g, batch, None, "mean")[2]
    assert ablated.shape == outs.shape
    text = real & ~bos
    for row in range(3):
        for pos in range(ids.shape[1]):
            if bos[row, pos]:
                torch.testing.assert_close(ablated[row, pos], outs[row, pos])
            elif text[row, pos]:
                torch.testing.assert_close(ablated[row, pos], outs[text[:, pos], pos].mean(0), rtol=1e-5, atol=1e-6)
    # the BOS's output is the same wherever it sits, which is what keeping it relies on
    firsts = outs[bos]
    torch.testing.assert_close(firsts, firsts[:1].expand_as(firsts), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["q", "k", "v"])
def test_cutting_one_head_input_equals_patching_that_heads_q_k_or_v(model, kind):
    # Every edge into one query (or key/value head) removed with resample ablation = that head's
    # q/k/v (after rotary) patched from the corrupted run: each head input is rebuilt on its own.
    g = Graph.from_model(model)
    clean, corrupt = pair()
    ct, xt = model.prepare_inputs(clean), model.prepare_inputs(corrupt)
    _, _, ablated = ablation_values(model, g, ct, xt, "resample")
    layer, head = model.dims.n_layers - 1, 1
    receiver = next(i for i, n in enumerate(g.receivers) if n.layer == layer and n.kind == kind and n.head == head)
    dense = torch.ones(g.valid.shape)
    dense[:, receiver] = 0
    got = graph_forward(model, g, ct, dense, ablated=ablated)
    site = f"blocks.{layer}.attn.hook_{kind}"
    _, cache = model.run_with_cache(xt, sites=[site])

    def patch(activation: torch.Tensor, _ctx: object) -> torch.Tensor:
        out = activation.clone()
        out[:, :, head] = cache[site][:, :, head]
        return out

    with model.hooks({site: patch}):
        expected = model.forward(ct)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - model.forward(ct)).abs().max() > 1e-4  # the cut changed something
