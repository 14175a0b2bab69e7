"""Induction / copying: sequences of uniformly random tokens in which one span occurs twice.

Generated directly in token space (there is no text form): the span length and both offsets vary per
sequence, so copying can only be done by looking back at what followed the previous occurrence of the
current token (an induction head), not by position. The ``mask`` marks the target positions whose token
is predictable from the first occurrence (2nd..last token of the repeat).
Metrics: ``induction_accuracy`` (top-1 on masked positions), ``induction_loss_first`` and
``induction_loss_repeat`` (mean loss on the same tokens at their first and second occurrence) and
``induction_icl_gain`` = first - repeat, in nats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mechscope.data.tasks.base import task_rng
from mechscope.errors import ConfigError

NAME = "induction"


@dataclass(frozen=True)
class InductionBatch:
    """Token sequences, the repeat's target positions, and the matching first-occurrence positions."""

    tokens: torch.Tensor  # [batch, pos] int64
    repeat_mask: torch.Tensor  # [batch, pos] bool: target positions inside the second occurrence
    first_mask: torch.Tensor  # [batch, pos] bool: the same tokens at their first occurrence


def sequences(
    seed: int,
    split: str,
    n: int,
    seq_len: int = 128,
    token_range: tuple[int, int] = (1, 4096),
    span: tuple[int, int] = (5, 40),
    dense: bool = False,
    segments: tuple[int, int] | None = None,
) -> InductionBatch:
    """`n` sequences for (`seed`, `split`): random tokens from `token_range` with one repeated span.

    ``dense`` (a training curriculum) instead repeats the span back to back from a random start to the
    end of the sequence, so most positions carry an induction target; ``first_mask`` then marks
    only the first occurrence. ``segments=(lo, hi)`` (with ``dense``) cuts each row into independent
    dense segments of ``lo..hi`` tokens: short look-backs at every position make induction heads form
    far sooner on CPU than long ones do.
    """
    lo, hi = token_range
    if not (0 <= lo < hi) or span[0] < 2 or 2 * span[1] + 1 > seq_len:
        raise ConfigError(f"expected 0 <= lo < hi and 2 <= span with 2*max_span < seq_len, got {token_range}, {span}")
    rng = task_rng(seed, NAME, split)
    gen = torch.Generator().manual_seed(rng.getrandbits(62))
    tokens = torch.randint(lo, hi, (n, seq_len), generator=gen)
    repeat = torch.zeros((n, seq_len), dtype=torch.bool)
    first = torch.zeros((n, seq_len), dtype=torch.bool)
    for i in range(n):
        length = rng.randint(*span)
        if dense and segments is not None:
            _dense_segments(rng, tokens[i], repeat[i], first[i], segments)
            continue
        if dense:
            s1 = rng.randint(0, seq_len - 2 * length)
            reps = -(-(seq_len - s1) // length)
            tokens[i, s1:] = tokens[i, s1 : s1 + length].repeat(reps)[: seq_len - s1]
            repeat[i, s1 + length + 1 :] = True
            first[i, s1 + 1 : s1 + length] = True
            continue
        s1 = rng.randint(0, seq_len - 2 * length)
        s2 = rng.randint(s1 + length, seq_len - length)
        tokens[i, s2 : s2 + length] = tokens[i, s1 : s1 + length]
        repeat[i, s2 + 1 : s2 + length] = True
        first[i, s1 + 1 : s1 + length] = True
    return InductionBatch(tokens, repeat, first)


def _dense_segments(rng, row: torch.Tensor, repeat: torch.Tensor, first: torch.Tensor, lengths) -> None:
    """Fill `row` with back-to-back dense segments (in place), marking their targets."""
    pos = 0
    while pos < len(row):
        end = min(len(row), pos + rng.randint(*lengths))
        seg = end - pos
        if seg >= 8:
            length = rng.randint(3, seg // 2 - 1)
            s1 = pos + rng.randint(0, seg - 2 * length)
            reps = -(-(end - s1) // length)
            row[s1:end] = row[s1 : s1 + length].repeat(reps)[: end - s1]
            repeat[s1 + length + 1 : end] = True
            first[s1 + 1 : s1 + length] = True
        pos = end


@torch.no_grad()
def evaluate_batch(model, batch: InductionBatch, batch_size: int = 32) -> dict[str, float]:
    """Induction metrics of `model` on `batch` (targets are read from the previous position's logits)."""
    device = next(model.parameters()).device
    correct = total = 0
    loss_first: list[torch.Tensor] = []
    loss_repeat: list[torch.Tensor] = []
    for start in range(0, batch.tokens.shape[0], batch_size):
        toks = batch.tokens[start : start + batch_size].to(device)
        logits = model(input_ids=toks).logits[:, :-1].float()
        targets = toks[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").cpu()
        rep = batch.repeat_mask[start : start + batch_size, 1:]
        fst = batch.first_mask[start : start + batch_size, 1:]
        correct += int((logits.argmax(-1).cpu() == targets.cpu())[rep].sum())
        total += int(rep.sum())
        loss_first.append(losses[fst])
        loss_repeat.append(losses[rep])
    first, repeat = torch.cat(loss_first).mean().item(), torch.cat(loss_repeat).mean().item()
    return {
        "induction_accuracy": correct / max(total, 1),
        "induction_loss_first": first,
        "induction_loss_repeat": repeat,
        "induction_icl_gain": first - repeat,
    }


def evaluate(model, tokenizer, seed: int = 0, n: int = 200, seq_len: int = 128) -> dict[str, float]:
    """Induction metrics on the ``eval`` split, with tokens drawn from the tokenizer's ordinary ids."""
    lo = len(tokenizer.all_special_ids)
    batch = sequences(seed, "eval", n, seq_len=seq_len, token_range=(lo, len(tokenizer)))
    return evaluate_batch(model, batch)
