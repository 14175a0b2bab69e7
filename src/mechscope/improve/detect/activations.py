"""The activations a detector reads: one vector per scored token of each example, at one or more sites.

An example is a text (every token is scored) or a ``(prompt, response)`` pair (only the response's
tokens are scored, as a monitor scores what the model writes, not what it was asked). Special tokens
(BOS, end-of-text) are never scored: their activations say nothing about the text and are often far
out of distribution (attention sinks). Rows are right-padded and positions come from the attention
mask, so every token's activation equals that of running its example alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.features.store import per_token_site
from mechscope.model.tokens import encode as encode_text
from mechscope.model.tokens import pad_rows, special_ids
from mechscope.sites import Site

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

Example = str | tuple[str, str]


def check_examples(examples: Any, what: str) -> list[Example]:
    """`examples` as a list of texts or (prompt, response) pairs; a clear error for anything else."""
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence):
        raise ConfigError(f"{what} must be a list of texts or (prompt, response) pairs; got {type(examples).__name__}")
    out: list[Example] = []
    for i, ex in enumerate(examples):
        if isinstance(ex, str):
            if not ex:
                raise ConfigError(f"{what}[{i}] is an empty text")
            out.append(ex)
        elif isinstance(ex, (tuple, list)) and len(ex) == 2 and all(isinstance(p, str) for p in ex):
            if not ex[1]:
                raise ConfigError(f"{what}[{i}] has an empty response; a pair's response holds the scored tokens")
            out.append((ex[0], ex[1]))
        else:
            raise ConfigError(
                f"{what}[{i}] must be a text or a (prompt, response) pair of strings; "
                f"got {type(ex).__name__} {ex!r:.80}"
            )
    if not out:
        raise ConfigError(f"{what} is empty; expected at least one text or (prompt, response) pair")
    return out


def encode(model: HookedModel, example: Example) -> tuple[list[int], int]:
    """(token ids, index of the first scored token) of one example."""
    tokenizer = model._tokenizer()
    if isinstance(example, str):
        return encode_text(tokenizer, example), 0
    prompt, response = example
    prompt_ids = encode_text(tokenizer, prompt) if prompt else []  # as to_tokens writes them (one BOS)
    ids = encode_text(tokenizer, prompt + response)
    start = 0
    while start < min(len(prompt_ids), len(ids)) and prompt_ids[start] == ids[start]:
        start += 1  # a merge across the boundary moves the start to the first differing token
    return ids, min(start, len(ids) - 1)


def scored_positions(ids: Sequence[int], start: int, special: set[int]) -> list[int]:
    """Positions of `ids` from `start` on that are not special tokens (the last token if all are)."""
    keep = [p for p in range(start, len(ids)) if ids[p] not in special]
    return keep or [len(ids) - 1]


def detector_sites(model: HookedModel, sites: Sequence[str]) -> list[Site]:
    """The detector's sites on `model`, each checked to hold one vector per token."""
    return [per_token_site(model, s) for s in sites]


@dataclass
class TokenActivations:
    """Activations of every scored token: ``acts[site]`` [n_tokens, d]; ``example`` [n_tokens] (owner)."""

    acts: dict[str, Float[Tensor, "n_tokens d"]]
    example: Int[Tensor, " n_tokens"]
    n_examples: int

    def last(self) -> TokenActivations:
        """Only each example's last scored token."""
        idx = torch.tensor([int((self.example == i).nonzero().max()) for i in range(self.n_examples)], dtype=torch.long)
        return TokenActivations(
            {k: v[idx] for k, v in self.acts.items()}, torch.arange(self.n_examples), self.n_examples
        )


def token_activations(
    model: HookedModel,
    examples: Sequence[Example],
    sites: Sequence[str],
    *,
    batch_size: int = 16,
) -> TokenActivations:
    """Activations of `sites` at every scored token of `examples` (see the module docstring)."""
    chosen = detector_sites(model, sites)
    special = set(special_ids(model.tokenizer))
    encoded = [encode(model, ex) for ex in examples]
    pad = model.tokenizer.pad_token_id if model.tokenizer is not None else None
    pad = 0 if pad is None else int(pad)
    acts: dict[str, list[Tensor]] = {s.name: [] for s in chosen}
    owner: list[Tensor] = []
    for b in range(0, len(encoded), batch_size):
        chunk = encoded[b : b + batch_size]
        _, cache = model.run_with_cache(pad_rows([ids for ids, _ in chunk], pad), chosen)
        rows, cols = [], []
        for r, (ids, start) in enumerate(chunk):
            pos = scored_positions(ids, start, special)
            rows += [r] * len(pos)
            cols += pos
            owner.append(torch.full((len(pos),), b + r, dtype=torch.long))
        ri, ci = torch.tensor(rows), torch.tensor(cols)
        for s in chosen:
            acts[s.name].append(cache[s.name][ri.to(cache[s.name].device), ci.to(cache[s.name].device)].float().cpu())
    return TokenActivations({k: torch.cat(v) for k, v in acts.items()}, torch.cat(owner), len(encoded))


__all__ = [
    "Example",
    "TokenActivations",
    "check_examples",
    "detector_sites",
    "encode",
    "scored_positions",
    "token_activations",
]
