"""A task from the user's own prompts with expected completions, for any model.

Each :class:`~mechscope.data.files.Completion` says "after `prompt` the model should say `answer`"
(optionally "rather than `wrong`"), with a role: ``target`` prompts are what the intervention should
change, ``side`` prompts are what it must leave alone. Answers are scored as whole token sequences
(teacher-forced log-probability), so an answer of any length and any tokenisation counts, and greedy
accuracy compares the model's next token with the answer's first token *as tokenised after the prompt*.

Metrics (``side_`` prefixed for side prompts): ``accuracy``, ``answer_logprob`` (mean), and with
``wrong`` answers ``answer_minus_wrong`` (mean ``log p(answer) - log p(wrong)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.data.files import Completion, read_completions
from mechscope.errors import ConfigError
from mechscope.improve.tasks import Task

if TYPE_CHECKING:
    from pathlib import Path

    from mechscope.model.hooked import HookedModel


def _tokenizer(model: HookedModel) -> Any:
    """The model's tokenizer, or a clear error for a model loaded without one."""
    if model.tokenizer is None:
        raise ConfigError("this task needs the model's tokenizer; load the model with one")
    return model.tokenizer


def _prompt(model: HookedModel, prompt: str, *, chat: bool) -> tuple[str, list[int]]:
    """The prompt's text as the model sees it (chat template applied when asked) and its token ids."""
    if chat:
        from mechscope.model.chat import format_chat

        text = format_chat(model, prompt)
        return text, [int(i) for i in _tokenizer(model)(text, add_special_tokens=False)["input_ids"]]
    return prompt, [int(i) for i in model.to_tokens(prompt)["input_ids"][0]]


def continuation_ids(model: HookedModel, prompt_text: str, answer: str) -> list[int]:
    """Token ids of `answer` as the tokenizer writes it after the prompt (merges at the boundary included);
    the answer tokenised alone when the joint tokenisation changes the prompt's own tokens."""
    tok = _tokenizer(model)
    alone = [int(i) for i in tok(answer, add_special_tokens=False)["input_ids"]]
    if not alone:
        raise ConfigError(f"the answer {answer!r} tokenises to nothing")
    joint = [int(i) for i in tok(prompt_text + answer, add_special_tokens=False)["input_ids"]]
    own = [int(i) for i in tok(prompt_text, add_special_tokens=False)["input_ids"]]
    if joint[: len(own)] == own and len(joint) > len(own):
        return joint[len(own) :]
    return alone


@torch.no_grad()
def sequence_logprobs(
    model: HookedModel, prompts: Sequence[list[int]], answers: Sequence[list[int]], *, batch_size: int = 16
) -> Float[Tensor, " n"]:
    """``log p(answer | prompt)`` (sum over the answer's tokens, teacher-forced) for each pair of id lists."""
    if len(prompts) != len(answers):
        raise ConfigError(f"got {len(prompts)} prompts and {len(answers)} answers")
    pad = _tokenizer(model).pad_token_id or 0
    out = torch.empty(len(prompts))
    for start in range(0, len(prompts), batch_size):
        rows = [p + a for p, a in zip(prompts[start : start + batch_size], answers[start : start + batch_size])]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        logp = model.forward({"input_ids": ids, "attention_mask": mask}).float().log_softmax(-1).cpu()
        for i, (p, a) in enumerate(zip(prompts[start : start + batch_size], answers[start : start + batch_size])):
            steps = torch.arange(len(p) - 1, len(p) - 1 + len(a))
            out[start + i] = logp[i, steps, torch.tensor(a)].sum()
    return out


@dataclass(frozen=True, kw_only=True)
class CompletionTask(Task):
    """Prompts with expected completions (see the module docstring); ``chat`` renders each prompt as a
    user turn in the model's chat template first."""

    completions: tuple[Completion, ...]
    name: str = "completions"
    chat: bool = False
    n_samples: int = 4

    def __post_init__(self) -> None:
        items = tuple(self.completions)
        if not items or not all(isinstance(c, Completion) for c in items):
            raise ConfigError("CompletionTask needs a non-empty tuple of Completion objects")
        object.__setattr__(self, "completions", items)
        if not any(c.role == "target" for c in items):
            raise ConfigError("CompletionTask needs at least one completion with role 'target'")
        if not isinstance(self.n_samples, int) or self.n_samples < 0:
            raise ConfigError(f"n_samples must be a non-negative int; got {self.n_samples!r}")

    @classmethod
    def from_file(cls, path: str | Path, *, chat: bool = False) -> CompletionTask:
        """A task from a ``.jsonl``/``.tsv`` completion file (:func:`~mechscope.data.files.read_completions`)."""
        from pathlib import Path

        return cls(completions=tuple(read_completions(path)), name=Path(path).stem, chat=chat)

    @property
    def side_effect_metrics(self) -> tuple[str, ...]:  # type: ignore[override]
        names = ["side_accuracy", "side_answer_logprob"]
        if any(c.wrong is not None for c in self.completions if c.role == "side"):
            names.append("side_answer_minus_wrong")
        return tuple(names)

    def _scores(self, model: HookedModel, items: list[Completion]) -> dict[str, float]:
        texts, prompt_ids = zip(*(_prompt(model, c.prompt, chat=self.chat) for c in items), strict=True)
        answers = [continuation_ids(model, t, c.answer) for t, c in zip(texts, items, strict=True)]
        answer_lp = sequence_logprobs(model, prompt_ids, answers)
        top = _greedy_next(model, prompt_ids)
        out = {
            "accuracy": sum(t == a[0] for t, a in zip(top, answers, strict=True)) / len(items),
            "answer_logprob": float(answer_lp.mean()),
        }
        with_wrong = [i for i, c in enumerate(items) if c.wrong is not None]
        if with_wrong:
            wrong = [continuation_ids(model, texts[i], str(items[i].wrong)) for i in with_wrong]
            wrong_lp = sequence_logprobs(model, [prompt_ids[i] for i in with_wrong], wrong)
            out["answer_minus_wrong"] = float((answer_lp[with_wrong] - wrong_lp).mean())
        return out

    def metrics(self, model: HookedModel) -> dict[str, float]:
        out: dict[str, float] = {}
        for role, prefix in (("target", ""), ("side", "side_")):
            items = [c for c in self.completions if c.role == role]
            if items:
                out.update({prefix + k: v for k, v in self._scores(model, items).items()})
        return out

    def sample_prompts(self) -> list[str]:
        return [c.prompt for c in self.completions if c.role == "target"][: self.n_samples]

    def continuations(self, model: HookedModel, max_new_tokens: int) -> list[tuple[str, str]]:
        if not self.chat:
            return super().continuations(model, max_new_tokens)
        from mechscope.model.chat import generate_replies

        prompts = self.sample_prompts()
        return list(zip(prompts, generate_replies(model, prompts, max_new_tokens=max_new_tokens), strict=True))


@torch.no_grad()
def _greedy_next(model: HookedModel, prompts: Sequence[list[int]], batch_size: int = 32) -> list[int]:
    """Greedy next-token id after each prompt (id lists, right-padded, read at each prompt's last token)."""
    pad = _tokenizer(model).pad_token_id or 0
    out: list[int] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, : len(p)], mask[i, : len(p)] = torch.tensor(p), 1
        logits = model.forward({"input_ids": ids, "attention_mask": mask})
        last = (mask.sum(-1) - 1).to(logits.device)
        out += logits[torch.arange(len(chunk), device=logits.device), last].argmax(-1).tolist()
    return out


__all__ = ["CompletionTask", "continuation_ids", "sequence_logprobs"]
