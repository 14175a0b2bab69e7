"""Write a real GGUF file from a tiny random Llama, the way llama.cpp's converter lays it out.

Architecture metadata under llama.cpp's keys, tensors under llama.cpp's names (q and k rows permuted
the way ``convert_hf_to_gguf.py`` does, which transformers' GGUF reader undoes), and a byte-level BPE
tokenizer (tokens, types, merges, special ids). Used by the GGUF tests to run transformers' GGUF route
and mechscope's cache on real files, without any package or download.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tiny_models import BOS, EOS, PAD, UNK, tiny_model


def _permute(weight: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    heads = n_head_kv if n_head != n_head_kv else n_head
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def write_tiny_gguf(path: Path, family: str = "llama", seed: int = 0) -> tuple[Any, Any]:
    """Write a GGUF file of a tiny random `family` Llama at `path`; returns (hf_model, tokenizer)."""
    import gguf

    model, tok = tiny_model(family, seed=seed)
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"mechscope tiny {family}")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)

    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    tokens = [""] * cfg.vocab_size
    for token, index in vocab.items():
        tokens[index] = token
    for index in range(len(vocab), cfg.vocab_size):  # the model's vocabulary is larger than the tokenizer's
        tokens[index] = f"<unused{index}>"
    specials = {PAD, BOS, EOS, UNK}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in specials else (5 if i >= len(vocab) else 1) for i in range(cfg.vocab_size)])
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_pad_token_id(PAD)
    writer.add_unk_token_id(UNK)

    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        writer.add_tensor("output.weight", state["lm_head.weight"])
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for layer in range(cfg.num_hidden_layers):
        for hf, ours in names.items():
            weight = state[f"model.layers.{layer}.{hf}.weight"]
            if ours == "attn_q":
                weight = _permute(weight, cfg.num_attention_heads, cfg.num_attention_heads)
            elif ours == "attn_k":
                weight = _permute(weight, cfg.num_attention_heads, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{layer}.{ours}.weight", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, tok


def reference_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits
