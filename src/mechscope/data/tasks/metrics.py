"""Next-token metrics on a Hugging Face causal LM: the one scoring rule every planted task uses.

A prediction is the argmax of the logits after the last prompt token (greedy, no sampling), so metrics
are deterministic for given weights. Prompts are right-padded and read at their own last position,
which is exact for absolute and rotary position embeddings alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mechscope.errors import ConfigError
from mechscope.data.tasks.base import Example


def first_token_id(tokenizer, text: str) -> int:
    """The id of the first token of `text` (a target such as ``" Mara"``)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"expected a non-empty target text, got {text!r}")
    return int(ids[0])


@torch.no_grad()
def next_token_predictions(model, tokenizer, prompts: Sequence[str], batch_size: int = 64) -> list[int]:
    """Greedy next-token id after each prompt."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    out: list[int] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start : start + batch_size]]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, ids in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        last = mask.sum(dim=1) - 1
        out += logits[torch.arange(len(encoded)), last.to(device)].argmax(-1).tolist()
    return out


def accuracy(model, tokenizer, examples: Sequence[Example]) -> float:
    """Fraction of examples whose greedy next token is the first token of their target."""
    if not examples:
        return float("nan")
    preds = next_token_predictions(model, tokenizer, [ex.prompt for ex in examples])
    hits = [p == first_token_id(tokenizer, ex.target) for p, ex in zip(preds, examples, strict=True)]
    return sum(hits) / len(hits)


def token_rate(model, tokenizer, examples: Sequence[Example], token_text: str) -> float:
    """Fraction of examples whose greedy next token is the first token of `token_text`."""
    if not examples:
        return float("nan")
    wanted = first_token_id(tokenizer, token_text)
    preds = next_token_predictions(model, tokenizer, [ex.prompt for ex in examples])
    return sum(p == wanted for p in preds) / len(preds)
