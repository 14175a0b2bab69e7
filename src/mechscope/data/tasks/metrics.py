"""Next-token metrics on a Hugging Face causal LM: the one scoring rule every planted task uses.

A prediction is the argmax of the logits after the last prompt token (greedy, no sampling), so metrics
are deterministic for given weights. Prompts are right-padded and read at their own last position,
which is exact for absolute and rotary position embeddings alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mechscope.data.tasks.base import Example
from mechscope.errors import ConfigError
from mechscope.model.tokens import encode, pad_rows


def first_token_id(tokenizer, text: str) -> int:
    """The id of the first token of `text` (a target such as ``" Mara"``)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"expected a non-empty target text, got {text!r}")
    return int(ids[0])


@torch.no_grad()
def next_token_predictions(model, tokenizer, prompts: Sequence[str], batch_size: int = 64) -> list[int]:
    """Greedy next-token id after each prompt.

    Prompts are batched by token length (less padding), without a KV cache, and where the model supports
    ``logits_to_keep`` only the positions from the batch's shortest prompt's last token on are projected onto
    the vocabulary (rows of a batch have similar lengths); every row is still read at its own last token, so
    the predictions are those of running each prompt alone.
    """
    import inspect

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
    encoded_all = [encode(tokenizer, p) for p in prompts]  # as text: BOS where the tokenizer adds one
    order = sorted(range(len(encoded_all)), key=lambda i: len(encoded_all[i]))
    out: list[int] = [0] * len(encoded_all)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        encoded = [encoded_all[i] for i in rows]
        batch = pad_rows(encoded, pad)
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        width = input_ids.shape[1]
        last = (mask.sum(dim=1) - 1).to(device)
        kwargs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "use_cache": False}
        if keep_last:  # an int (the API every transformers 5.x reads alike): the tail from the shortest row's last
            first = int(last.min())
            tail = model(**kwargs, logits_to_keep=width - first).logits  # [rows, width - first, vocab]
            logits = tail[torch.arange(len(encoded), device=device), last - first]
        else:
            logits = model(**kwargs).logits[torch.arange(len(encoded), device=device), last]
        for row, token in zip(rows, logits.argmax(-1).tolist(), strict=True):
            out[row] = int(token)
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
