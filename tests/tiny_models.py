"""Tiny random Hugging Face causal LMs built from configs (no downloads), one per supported family.

``tiny_model(family, **overrides)`` returns ``(hf_model, tokenizer)``: a 2-layer fp32 model in eval
mode whose weights depend only on the seed (so an ``sdpa`` and an ``eager`` build share weights), and a
real in-process fast tokenizer (byte-level BPE trained on a few sentences, vocab < every model's vocab).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from functools import lru_cache
from typing import Any

import torch
import transformers

VOCAB = 128
PAD, BOS, EOS, UNK = 0, 1, 2, 3

_SPECIAL_IDS = dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
_LLAMA_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    **_SPECIAL_IDS,
)

#: family variant -> (config class, causal LM class, config kwargs). Variants of one HF family share
#: an adapter; they differ in the feature under test (parallel residual, tied embeddings, ...).
_SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, **_SPECIAL_IDS),
    ),
    "gpt_neox": (  # Pythia: parallel attention and MLP, partial rotary, untied
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            use_parallel_residual=True,
            tie_word_embeddings=False,
            **_SPECIAL_IDS,
        ),
    ),
    "gpt_neox_sequential": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            use_parallel_residual=False,
            tie_word_embeddings=False,
            **_SPECIAL_IDS,
        ),
    ),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(**_LLAMA_SIZES, tie_word_embeddings=False)),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(**_LLAMA_SIZES, tie_word_embeddings=True)),
    "mistral": (  # sliding window (4) shorter than the test sequences
        "MistralConfig",
        "MistralForCausalLM",
        dict(**_LLAMA_SIZES, sliding_window=4, tie_word_embeddings=False),
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(**_LLAMA_SIZES, tie_word_embeddings=True)),
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(**_LLAMA_SIZES, attention_bias=False, tie_word_embeddings=False),
    ),
    "gemma2": (  # softcapping (attention + final logits), post-norms, alternating sliding window
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            **_LLAMA_SIZES,
            query_pre_attn_scalar=8,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
            tie_word_embeddings=True,
        ),
    ),
    "gemma3_text": (  # q/k norms, post-norms, sliding window, separate local rope
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            **_LLAMA_SIZES,
            query_pre_attn_scalar=8,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            final_logit_softcapping=3.0,
            tie_word_embeddings=True,
        ),
    ),
    "phi3": (  # fused qkv and gate_up
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(
            {k: v for k, v in _LLAMA_SIZES.items() if k != "head_dim"},
            tie_word_embeddings=False,
        ),
    ),
    "olmo2": (  # post-norms only, q/k norms
        "Olmo2Config",
        "Olmo2ForCausalLM",
        dict(**_LLAMA_SIZES, tie_word_embeddings=False),
    ),
}

#: Every family variant, for ``pytest.mark.parametrize``.
FAMILIES: list[str] = list(_SPECS)
#: Families whose HF implementation refuses the sdpa base (softcapping needs eager).
EAGER_ONLY: frozenset[str] = frozenset({"gemma2"})


def attention_bases(family: str) -> list[str]:
    """The attention implementations a family can be built with."""
    return ["eager"] if family in EAGER_ONLY else ["sdpa", "eager"]


def tiny_config(family: str, **overrides: Any) -> Any:
    if family not in _SPECS:
        raise KeyError(f"unknown tiny family {family!r}; known: {FAMILIES}")
    config_cls, _, kwargs = _SPECS[family]
    return getattr(transformers, config_cls)(**{**kwargs, **overrides})


def tiny_model(
    family: str,
    *,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    with_tokenizer: bool = True,
    **overrides: Any,
) -> tuple[Any, Any]:
    """A tiny random causal LM of `family` (fp32, eval mode) and a tiny fast tokenizer (or None)."""
    if attn_implementation == "sdpa" and family in EAGER_ONLY:
        attn_implementation = "eager"
    config = tiny_config(family, **overrides)
    model_cls = getattr(transformers, _SPECS[family][1])
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    # Random init leaves norms at their identity values; perturb every parameter so that norms,
    # biases and offsets all matter and a wrong site shows up in the numbers.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    model.eval()
    return model, (tiny_tokenizer() if with_tokenizer else None)


def model_type(family: str) -> str:
    return str(tiny_config(family).model_type)


# Tokenizer ------------------------------------------------------------------------------------------------
SENTENCES = [
    "The Eiffel Tower is in Paris.",
    "When Mary and John went to the store, John gave a drink to Mary.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "A cat sat on the mat and looked at the dog.",
    "One two three four five six seven eight nine ten.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! This is a tiny tokenizer for tests.",
]


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8,
        special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(SENTENCES * 3, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS)]
    )
    assert tokenizer.token_to_id("<pad>") == PAD and tokenizer.token_to_id("<eos>") == EOS
    assert tokenizer.get_vocab_size() <= VOCAB
    return str(tokenizer.to_str())


def tiny_tokenizer(padding_side: str = "right") -> Any:
    """A fresh HF fast tokenizer (byte-level BPE, ``<bos>`` prepended, pad id 0)."""
    from tokenizers import Tokenizer

    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side=padding_side,
    )
