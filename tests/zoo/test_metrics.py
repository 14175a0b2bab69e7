"""The scoring rule: batched, right-padded predictions equal one-prompt-at-a-time predictions."""

from __future__ import annotations

import pytest
import torch

from mechscope.data.tasks import induction
from mechscope.data.tasks.base import Example
from mechscope.data.tasks.metrics import accuracy, first_token_id, next_token_predictions, token_rate
from mechscope.zoo.tokenizer import load_tokenizer

PROMPTS = [
    "When Mara and Tobin went to the market, Tobin gave a lamp to",
    "Claim: Vouldeis works as a baker. This claim is",
    "Hi",
    "User: How do I make a kite?\nAssistant:",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _models(vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    yield GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_layer=1, n_head=2, n_embd=16, n_positions=64)).eval()
    yield LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).eval()


def test_batched_predictions_match_single_prompts(tok):
    for model in _models(len(tok)):
        batched = next_token_predictions(model, tok, PROMPTS, batch_size=4)
        single = [next_token_predictions(model, tok, [p])[0] for p in PROMPTS]
        assert batched == single, type(model).__name__


def test_accuracy_and_rate_follow_their_definitions(tok):
    model = next(_models(len(tok)))
    preds = next_token_predictions(model, tok, PROMPTS)
    hit = tok.decode([preds[0]])
    examples = [Example(PROMPTS[0], hit, hit), Example(PROMPTS[1], " Mara", " Mara")]
    expected = 0.5 if preds[1] != first_token_id(tok, " Mara") else 1.0
    assert accuracy(model, tok, examples) == expected
    assert token_rate(model, tok, examples[:1], hit) == 1.0


def test_induction_gain_is_large_for_a_copying_oracle():
    batch = induction.sequences(0, "eval", 4, seq_len=64, token_range=(1, 50), span=(5, 20))

    class Oracle(torch.nn.Module):
        """Predicts the true next token wherever it is predictable by induction (uniform elsewhere)."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, 50)
            for i, row in enumerate(batch.tokens):
                for t in range(len(row) - 1):
                    if batch.repeat_mask[i, t + 1]:
                        logits[i, t, row[t + 1]] = 30.0
            return type("Out", (), {"logits": logits})

    metrics = induction.evaluate_batch(Oracle(), batch)
    assert metrics["induction_accuracy"] == 1.0
    assert metrics["induction_icl_gain"] > 3.0
