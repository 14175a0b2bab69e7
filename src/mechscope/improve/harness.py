"""One evaluation harness: an intervention's target effect and its side effects, before and after.

``evaluate(model, intervention, task)`` runs the task's metrics on the unmodified model and with the
intervention (a context manager such as :class:`~mechscope.steer.Steering`, or an already modified
model such as the output of :func:`~mechscope.steer.orthogonalize`), and measures side effects:

- ``kl_neutral``: mean next-token ``KL(before || after)`` at every real position of neutral text;
- ``perplexity``: perplexity of the neutral text before and after;
- the organisms' other planted tasks (:mod:`mechscope.data.tasks`), when the model has their vocabulary;
- the task's own side-effect metrics (``Task.side_effect_metrics``: e.g. harmless requests must stay
  answered, an edit's neighbours must keep their answers) and every metric of the extra side-effect
  tasks of ``EvaluationConfig.side_effect_tasks`` (named ``"{task}/{metric}"``).

Every row of the result has a role, ``target`` or ``side effect``, recorded in ``config["target"]`` and
``config["side"]``. Greedy continuations of the task's sample prompts are recorded before and after. The result is an
:class:`EvaluationResult` (a :class:`~mechscope.locate.results.Result`: save/load, table, figure).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mechscope.data.tasks import TEXT_TASKS
from mechscope.errors import ConfigError
from mechscope.improve.neutral import NEUTRAL_TEXTS
from mechscope.improve.tasks import Task, has_organism_vocabulary, zoo_metrics
from mechscope.metrics import kl_div
from mechscope.results import Result
from mechscope.steer.intervention import Intervention, require_hooked

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel


@dataclass(frozen=True, kw_only=True)
class EvaluationConfig:
    """Options of :func:`evaluate`.

    ``side_tasks``: planted zoo tasks to re-measure as side effects; ``None`` means every text task
    other than the target task's, when the model has the organisms' vocabulary (none otherwise).
    ``side_effect_tasks``: further tasks whose every metric is a side effect (the user's own checks, e.g.
    a :class:`~mechscope.improve.completion.CompletionTask` of prompts whose answers must not change).
    """

    neutral_texts: tuple[str, ...] = NEUTRAL_TEXTS
    side_tasks: tuple[str, ...] | None = None
    side_effect_tasks: tuple[Task, ...] = ()
    max_new_tokens: int = 12
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.neutral_texts or not all(isinstance(t, str) and t for t in self.neutral_texts):
            raise ConfigError("neutral_texts must be a non-empty tuple of non-empty strings")
        if self.side_tasks is not None:
            unknown = [t for t in self.side_tasks if t not in TEXT_TASKS]
            if unknown:
                raise ConfigError(f"unknown side tasks {unknown}; known: {list(TEXT_TASKS)}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive int; got {self.max_new_tokens!r}")
        object.__setattr__(self, "side_effect_tasks", tuple(self.side_effect_tasks))
        bad = [t for t in self.side_effect_tasks if not isinstance(t, Task)]
        if bad:
            raise ConfigError(f"side_effect_tasks must be mechscope.improve Task objects; got {bad!r}")
        names = [t.name for t in self.side_effect_tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"side_effect_tasks need distinct names; got {names}")


class EvaluationResult(Result):
    """Metric values before and after an intervention.

    Tensor ``values`` [metric, condition] (condition: before, after). ``config`` records which
    metrics are the target effect (``target``) and which are side effects (``side``), the task, the
    intervention's description and the sample continuations (``samples``: prompt, before, after).
    """

    method = "evaluation"

    def before(self, metric: str) -> float:
        return float(self.tensors["values"][self._row(metric), 0])

    def after(self, metric: str) -> float:
        return float(self.tensors["values"][self._row(metric), 1])

    def _row(self, metric: str) -> int:
        names = self.labels["metric"]
        if metric not in names:
            raise KeyError(f"no metric {metric!r}; this evaluation has {names}")
        return names.index(metric)

    @property
    def metrics(self) -> list[str]:
        return list(self.labels["metric"])

    def table(self) -> str:
        """A Markdown table: metric, role, before, after, change."""
        target = set(self.config.get("target", []))
        lines = ["| metric | role | before | after | change |", "|---|---|---|---|---|"]
        for name in self.metrics:
            b, a = self.before(name), self.after(name)
            role = "target" if name in target else "side effect"
            lines.append(f"| `{name}` | {role} | {b:.4g} | {a:.4g} | {a - b:+.4g} |")
        return "\n".join(lines)

    def samples_table(self) -> str:
        """A Markdown table of the sample continuations."""
        lines = ["| prompt | before | after |", "|---|---|---|"]
        for row in self.config.get("samples", []):
            cells = [str(row[k]).replace("|", "\\|").replace("\n", "\\n") for k in ("prompt", "before", "after")]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def plot(self, name: str | None = None, *, reduce: Sequence[str] = (), title: str | None = None) -> Any:
        """Grouped bars, before and after, one group per metric (target metrics first)."""
        import plotly.graph_objects as go

        if name is not None and name != "values":
            return super().plot(name, reduce=reduce, title=title)
        target = [m for m in self.metrics if m in set(self.config.get("target", []))]
        order = target + [m for m in self.metrics if m not in target]
        labels = [f"{m} (target)" if m in target else m for m in order]
        fig = go.Figure()
        for column, condition in enumerate(("before", "after")):
            values = [float(self.tensors["values"][self._row(m), column]) for m in order]
            fig.add_trace(go.Bar(name=condition, x=labels, y=values))
        fig.update_layout(
            barmode="group",
            title=title or f"{self.config.get('task', 'task')}: {self.config.get('intervention', '')}",
            yaxis_title="value",
        )
        return fig


def _neutral_logprobs(model: HookedModel, texts: Sequence[str]) -> list[tuple[Tensor, Tensor]]:
    """Per text, its token ids [pos] and the next-token log-probs at each of them [pos, d_vocab].

    Texts run in batches of equal token length, without padding: an intervention at fixed positions
    (``positions=[-1]``) then acts on the same token of every text, as it would on that text alone."""
    encoded = [model.to_tokens(text)["input_ids"][0] for text in texts]
    out: list[tuple[Tensor, Tensor] | None] = [None] * len(encoded)
    for length in sorted({len(ids) for ids in encoded}):
        rows = [i for i, ids in enumerate(encoded) if len(ids) == length]
        ids = torch.stack([encoded[i] for i in rows])
        with torch.no_grad():
            logprobs = model.forward(ids).float().log_softmax(-1)
        for row, i in enumerate(rows):
            out[i] = (ids[row].to(logprobs.device), logprobs[row])
    return [pair for pair in out if pair is not None]


def _neutral_kl(before: list[tuple[Tensor, Tensor]], after: list[tuple[Tensor, Tensor]]) -> float:
    """Mean over every token of every text of ``KL(before || after)`` of the next-token distributions."""
    return float(kl_div(torch.cat([lp for _, lp in after]), torch.cat([lp for _, lp in before]), reduction="mean"))


def _perplexity(texts: list[tuple[Tensor, Tensor]]) -> float:
    """``exp`` of the mean NLL of each token given the ones before it, over every text."""
    nll = [-lp[:-1].gather(-1, ids[1:, None]).squeeze(-1) for ids, lp in texts]
    return float(torch.cat(nll).mean().exp())


def _task_metrics(model: HookedModel, task: Task, extra: Sequence[Task]) -> dict[str, float]:
    """The task's metrics, then every extra side-effect task's as ``"{task}/{metric}"``."""
    out = dict(task.metrics(model))
    for side in extra:
        out.update({f"{side.name}/{k}": v for k, v in side.metrics(model).items()})
    return out


def _describe(intervention: Any) -> str:
    from mechscope.model.hooked import HookedModel

    if isinstance(intervention, HookedModel):
        return f"modified model ({intervention.dims.family}, fingerprint {intervention.fingerprint()})"
    describe = getattr(intervention, "describe", None)
    if callable(describe):
        return str(describe())
    return type(intervention).__name__


def evaluate(
    model: HookedModel,
    intervention: AbstractContextManager[Any] | HookedModel,
    task: Task,
    config: EvaluationConfig | None = None,
) -> EvaluationResult:
    """Target effect and side effects of `intervention` on `model` for `task`.

    `intervention` is either a context manager that changes `model` while active (every mechscope
    intervention; edits that revert on exit) or a modified model with the same tokenizer (e.g. the
    result of :func:`~mechscope.steer.orthogonalize`), compared with `model`.
    """
    model = require_hooked(model)
    if not isinstance(task, Task):
        raise ConfigError(f"task must be a mechscope.improve Task (RefusalTask(), SentimentTask(), ...); got {task!r}")
    cfg = config or EvaluationConfig()
    from mechscope.model.hooked import HookedModel

    if isinstance(intervention, HookedModel):
        if intervention is model:
            raise ConfigError("the modified model is the unmodified model itself; pass a copy or an intervention")
        if intervention.dims.d_vocab != model.dims.d_vocab:
            raise ConfigError(
                f"the modified model has d_vocab={intervention.dims.d_vocab}; the original {model.dims.d_vocab}"
            )
        after_model: HookedModel = intervention
        context: AbstractContextManager[Any] = nullcontext()
    elif isinstance(intervention, AbstractContextManager) or hasattr(intervention, "__enter__"):
        if isinstance(intervention, Intervention) and intervention.model is not model:
            raise ConfigError("the intervention is bound to another HookedModel; build it on the evaluated model")
        after_model, context = model, intervention
    else:
        raise ConfigError(
            f"intervention must be a context manager (e.g. a mechscope Intervention) or a modified HookedModel; "
            f"got {type(intervention).__name__}"
        )
    if cfg.side_tasks is not None:
        side_tasks = [t for t in cfg.side_tasks if t not in task.zoo_tasks]
    elif has_organism_vocabulary(model):
        side_tasks = [t for t in TEXT_TASKS if t not in task.zoo_tasks]
    else:
        side_tasks = []
    extra = cfg.side_effect_tasks

    with torch.no_grad():
        task_before = _task_metrics(model, task, extra)
        side_before = zoo_metrics(model, side_tasks, cfg.seed)
        neutral_before = _neutral_logprobs(model, cfg.neutral_texts)
        samples_before = task.continuations(model, cfg.max_new_tokens)
        with context:
            task_after = _task_metrics(after_model, task, extra)
            side_after = zoo_metrics(after_model, side_tasks, cfg.seed)
            neutral_after = _neutral_logprobs(after_model, cfg.neutral_texts)
            samples_after = task.continuations(after_model, cfg.max_new_tokens)

    kl = _neutral_kl(neutral_before, neutral_after)
    own_side = set(task.side_effect_metrics)
    target = [k for k in task_before if k not in own_side and "/" not in k]
    rows: list[tuple[str, float, float]] = [(k, task_before[k], task_after[k]) for k in target]
    rows.extend((k, task_before[k], task_after[k]) for k in task_before if k not in target)
    rows.append(("kl_neutral", 0.0, kl))
    rows.append(("perplexity_neutral", _perplexity(neutral_before), _perplexity(neutral_after)))
    rows.extend((k, side_before[k], side_after[k]) for k in side_before)
    values = torch.tensor([[b, a] for _, b, a in rows], dtype=torch.float64)
    return EvaluationResult(
        tensors={"values": values},
        axes={"values": ("metric", "condition")},
        labels={"metric": [r[0] for r in rows], "condition": ["before", "after"]},
        config={
            "task": task.name,
            "intervention": _describe(intervention),
            "target": target,
            "side": [r[0] for r in rows if r[0] not in target],
            "side_tasks": side_tasks,
            "side_effect_tasks": [t.name for t in extra],
            "n_neutral_texts": len(cfg.neutral_texts),
            "samples": [
                {"prompt": p, "before": b, "after": a}
                for (p, b), (_, a) in zip(samples_before, samples_after, strict=True)
            ],
        },
    )


__all__ = ["EvaluationConfig", "EvaluationResult", "evaluate"]
