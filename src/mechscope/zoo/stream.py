"""Training batches of an organism: natural text windows, induction sequences and packed planted text.

Batch ``k`` is a pure function of (seed, k), so a resumed run sees exactly the batches an uninterrupted
run would have seen, without saving any sampler state.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from mechscope.errors import ConfigError
from mechscope.zoo.corpus import read_jsonl_texts
from mechscope.zoo.organisms import Recipe
from mechscope.zoo.tasks import induction


class BatchStream:
    """Tokenised corpus plus the recipe's mixture; ``batch(step)`` gives ``[batch, seq_len]`` ids."""

    def __init__(self, recipe: Recipe, tokenizer, corpus: Path) -> None:
        self.recipe = recipe
        self.eos = int(tokenizer.eos_token_id)
        self.token_range = (len(tokenizer.all_special_ids), len(tokenizer))
        natural = read_jsonl_texts(Path(corpus) / "natural/train.jsonl")
        ids = tokenizer(natural, add_special_tokens=False)["input_ids"]
        self.natural = torch.tensor([t for doc in ids for t in (*doc, self.eos)], dtype=torch.long)
        self.planted: dict[str, list[list[int]]] = {}
        for task, weight in recipe.task_weights.items():
            if weight > 0 and recipe.mixture.get("planted", 0) > 0:
                texts = read_jsonl_texts(Path(corpus) / f"planted/{task}.jsonl")
                self.planted[task] = tokenizer(texts, add_special_tokens=False)["input_ids"]
        if len(self.natural) <= recipe.seq_len:
            raise ConfigError(f"expected more than {recipe.seq_len} natural tokens, got {len(self.natural)}")

    def _planted_row(self, rng: random.Random, seq_len: int) -> list[int]:
        tasks = list(self.planted)
        weights = [self.recipe.task_weights[t] for t in tasks]
        row: list[int] = []
        while len(row) < seq_len:
            pool = self.planted[rng.choices(tasks, weights)[0]]
            row += [*pool[rng.randrange(len(pool))], self.eos]
        return row[:seq_len]

    def _induction(self, step: int, n: int, seq_len: int) -> induction.InductionBatch:
        r = self.recipe
        span = (5, min(40, (seq_len - 1) // 2))  # (5, 40) at the recipes' seq_len of 128
        seg = r.induction_segments
        return induction.sequences(
            r.seed,
            f"train-{step}",
            n,
            seq_len,
            self.token_range,
            span,
            dense=r.dense_induction,
            segments=seg if seg is not None and seq_len > seg[1] else None,
        )

    def batch(self, step: int) -> torch.Tensor:
        """The training batch of `step`: ``[batch_size, recipe.seq_len_at(step)]`` token ids."""
        r = self.recipe
        seq_len = r.seq_len_at(step)
        rng = random.Random(f"stream:{r.seed}:{step}")
        kinds = rng.choices(list(r.mixture), list(r.mixture.values()), k=r.batch_size)
        n_ind = kinds.count("induction")
        ind = self._induction(step, n_ind, seq_len) if n_ind else None
        rows: list[torch.Tensor] = []
        used = 0
        for kind in kinds:
            if kind == "natural":
                start = rng.randrange(len(self.natural) - seq_len)
                rows.append(self.natural[start : start + seq_len])
            elif kind == "induction":
                assert ind is not None
                rows.append(ind.tokens[used])
                used += 1
            else:
                rows.append(torch.tensor(self._planted_row(rng, seq_len), dtype=torch.long))
        return torch.stack(rows)
