"""Training batches of an organism: natural text windows, induction sequences and planted text.

Planted examples come in two row kinds. ``planted`` rows pack examples of several tasks back to back,
separated by ``<|endoftext|>``. ``single`` rows hold one example of a task in ``recipe.single_tasks``
each, padded to ``recipe.single_len``: tasks solved by copying from the context (IOI names, a claim's
stated value) do not form their circuits when earlier examples in the row offer wrong candidates to
copy (measured: held-out IOI accuracy stayed at 0.02-0.09 through the 750 packed steps of v1 and v2;
continuing with single rows it reached 0.37-0.57 after 500 steps and 0.99 after 1100, docs/zoo.md).
Tokens inside an example's ``unscored`` span, and padding, get no loss (label -100).

Batch ``k`` is a pure function of (seed, k), so a resumed run sees exactly the batches an uninterrupted
run would have seen, without saving any sampler state.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mechscope.data.tasks import induction
from mechscope.errors import ConfigError
from mechscope.zoo.corpus import read_jsonl_records, read_jsonl_texts
from mechscope.zoo.organisms import Recipe

IGNORE = -100


@dataclass(frozen=True)
class Batch:
    """One step's rows, grouped by row length: ``(input_ids, labels)`` pairs, each ``[rows, len]``."""

    parts: tuple[tuple[Tensor, Tensor], ...]

    @property
    def tokens(self) -> int:
        """Token positions in the batch (padding included)."""
        return sum(ids.numel() for ids, _ in self.parts)

    @property
    def scored(self) -> int:
        """Next-token predictions that carry a loss."""
        return sum(int((labels[:, 1:] != IGNORE).sum()) for _, labels in self.parts)


def _tokenise(tokenizer, records: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per record; labels are the ids with the record's unscored span set to IGNORE."""
    encoded = tokenizer([r["text"] for r in records], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for record, ids, offsets in zip(records, encoded["input_ids"], encoded["offset_mapping"], strict=True):
        labels = list(ids)
        if "unscored" in record:
            lo, hi = record["unscored"]
            labels = [IGNORE if s < hi and e > lo else t for t, (s, e) in zip(ids, offsets, strict=True)]
        out.append((list(ids), labels))
    return out


class BatchStream:
    """Tokenised corpus plus the recipe's mixture; ``batch(step)`` gives the step's :class:`Batch`."""

    def __init__(self, recipe: Recipe, tokenizer, corpus: Path) -> None:
        self.recipe = recipe
        self.eos = int(tokenizer.eos_token_id)
        self.token_range = (len(tokenizer.all_special_ids), len(tokenizer))
        natural = read_jsonl_texts(Path(corpus) / "natural/train.jsonl")
        ids = tokenizer(natural, add_special_tokens=False)["input_ids"]
        self.natural = torch.tensor([t for doc in ids for t in (*doc, self.eos)], dtype=torch.long)
        self.planted: dict[str, list[tuple[list[int], list[int]]]] = {}
        wanted = {k for k in ("planted", "single") if recipe.mixture.get(k, 0) > 0}
        for task, weight in recipe.task_weights.items():
            kind = "single" if task in recipe.single_tasks else "planted"
            if weight > 0 and kind in wanted:
                self.planted[task] = _tokenise(tokenizer, read_jsonl_records(Path(corpus) / f"planted/{task}.jsonl"))
        if len(self.natural) <= recipe.seq_len:
            raise ConfigError(f"expected more than {recipe.seq_len} natural tokens, got {len(self.natural)}")
        for task in recipe.single_tasks:
            longest = max((len(ids) for ids, _ in self.planted.get(task, [])), default=0)
            if longest + 1 > recipe.single_len:
                raise ConfigError(
                    f"recipe {recipe.name!r}: expected single_len >= {longest + 1} (longest {task} example "
                    f"plus end-of-text), got {recipe.single_len}"
                )

    def _tasks(self, single: bool) -> tuple[list[str], list[float]]:
        tasks = [t for t in self.planted if (t in self.recipe.single_tasks) == single]
        if not tasks:
            kind = "single" if single else "planted"
            raise ConfigError(f"recipe {self.recipe.name!r} mixes {kind!r} rows but has no {kind} task with weight > 0")
        return tasks, [self.recipe.task_weights[t] for t in tasks]

    def _planted_row(self, rng: random.Random, seq_len: int) -> tuple[list[int], list[int]]:
        tasks, weights = self._tasks(single=False)
        row: list[int] = []
        labels: list[int] = []
        while len(row) < seq_len:
            pool = self.planted[rng.choices(tasks, weights)[0]]
            ids, lab = pool[rng.randrange(len(pool))]
            row += [*ids, self.eos]
            labels += [*lab, self.eos]
        return row[:seq_len], labels[:seq_len]

    def _single_row(self, rng: random.Random) -> tuple[list[int], list[int]]:
        tasks, weights = self._tasks(single=True)
        pool = self.planted[rng.choices(tasks, weights)[0]]
        ids, lab = pool[rng.randrange(len(pool))]
        pad = self.recipe.single_len - len(ids) - 1
        return [*ids, self.eos] + [self.eos] * pad, [*lab, self.eos] + [IGNORE] * pad

    def _induction(self, step: int, n: int, seq_len: int) -> induction.InductionBatch:
        r = self.recipe
        span = r.induction_span(seq_len)
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

    def batch(self, step: int) -> Batch:
        """The training batch of `step`: rows of ``recipe.seq_len_at(step)`` tokens, then single rows."""
        r = self.recipe
        seq_len = r.seq_len_at(step)
        rng = random.Random(f"stream:{r.seed}:{step}")
        kinds = rng.choices(list(r.mixture), list(r.mixture.values()), k=r.batch_size)
        n_ind = kinds.count("induction")
        ind = self._induction(step, n_ind, seq_len) if n_ind else None
        rows: list[Tensor] = []
        labels: list[Tensor] = []
        singles: list[tuple[list[int], list[int]]] = []
        used = 0
        for kind in kinds:
            if kind == "natural":
                start = rng.randrange(len(self.natural) - seq_len)
                rows.append(self.natural[start : start + seq_len])
                labels.append(rows[-1])
            elif kind == "induction":
                assert ind is not None
                rows.append(ind.tokens[used])
                labels.append(rows[-1])
                used += 1
            elif kind == "single":
                singles.append(self._single_row(rng))
            else:
                ids, lab = self._planted_row(rng, seq_len)
                rows.append(torch.tensor(ids, dtype=torch.long))
                labels.append(torch.tensor(lab, dtype=torch.long))
        parts = []
        if rows:
            parts.append((torch.stack(rows), torch.stack(labels)))
        if singles:
            parts.append((torch.tensor([s[0] for s in singles]), torch.tensor([s[1] for s in singles])))
        return Batch(tuple(parts))
