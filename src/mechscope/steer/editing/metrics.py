"""Edit metrics: did the edit take (efficacy), does it generalise (paraphrases), what else moved (neighbours).

All metrics are greedy next-token checks on the first token of the answer, the organisms' scoring rule:
- ``efficacy``: the request's prompt is followed by the new target (top-1);
- ``target_prob``: the probability of the target's first token after the prompt;
- ``paraphrase``: the fraction of the request's paraphrases followed by the target;
- ``neighbourhood``: the fraction of neighbour prompts (other subjects) answered with their true answer;
- ``neighbourhood_unchanged``: the fraction of neighbour prompts whose top prediction did not move;
- ``neighbourhood_to_target``: the fraction of neighbour prompts now answered with the edit's target
  (the collateral damage of an edit that rewrote the relation for every subject);
- ``neighbourhood_kl``: mean next-token ``KL(first state || this state)`` at the neighbour prompts.
With an :class:`EditRecord`, each is measured before (edit reverted) and after (edit re-applied).
Requests without neighbours get them built on the model (:mod:`.neighbourhood`) by the CLI and
:func:`edit_metrics` with ``neighbourhood=``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from mechscope.metrics import kl_div
from mechscope.results import Result
from mechscope.steer.editing.neighbourhood import NeighbourhoodConfig, with_neighbourhood
from mechscope.steer.editing.records import EditRecord
from mechscope.steer.editing.requests import EditError, EditRequest, check_requests, target_ids

METRICS = (
    "efficacy",
    "target_prob",
    "paraphrase",
    "neighbourhood",
    "neighbourhood_unchanged",
    "neighbourhood_to_target",
    "neighbourhood_kl",
)


class EditMetrics(Result):
    """Per-request edit metrics: tensors ``[request, state]`` (state ``before``/``after``) per metric."""

    method: ClassVar[str] = "edit_metrics"

    def summary(self) -> dict[str, dict[str, float]]:
        """Mean of each metric over requests, per state (NaN-skipping: requests without paraphrases)."""
        states = self.labels["state"]
        out: dict[str, dict[str, float]] = {}
        for name in METRICS:
            values = self.tensors[name]
            out[name] = {s: float(values[:, i][~values[:, i].isnan()].mean()) for i, s in enumerate(states)}
        return out

    def default_tensor(self) -> str:
        return "efficacy"

    def plot(self, name: str | None = None, *, reduce: Sequence[str] = ("request",), title: str | None = None) -> Any:
        """Bars of each metric's mean before and after (or one metric per request with `name`)."""
        if name is not None:
            return super().plot(name, reduce=(), title=title)
        import plotly.graph_objects as go

        summary = self.summary()
        fig = go.Figure(
            [go.Bar(name=s, x=list(METRICS), y=[summary[m][s] for m in METRICS]) for s in self.labels["state"]]
        )
        fig.update_layout(title=title or f"edit metrics ({len(self.labels['request'])} requests)", barmode="group")
        return fig


@torch.no_grad()
def _next_token(model: Any, prompts: Sequence[str], batch_size: int = 64) -> tuple[list[int], Tensor]:
    """Greedy next-token id and the full next-token probabilities after each prompt."""
    tops: list[int] = []
    probs: list[Tensor] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        batch = model.to_tokens(chunk, padding_side="right")  # as text: BOS where the tokenizer adds one
        logits = model.forward(batch)
        last = batch["attention_mask"].sum(-1) - 1
        p = logits[torch.arange(len(chunk)), last.to(logits.device)].float().softmax(-1)
        tops += p.argmax(-1).tolist()
        probs.append(p.cpu())
    return tops, torch.cat(probs) if probs else torch.zeros(0)


Measured = tuple[dict[str, list[float]], list[list[int]], list[Tensor]]


def measure_requests(model: Any, requests: Sequence[EditRequest]) -> Measured:
    """Per-request metrics (all but the ones relative to the first state), the neighbours' top predictions
    and their next-token probabilities."""
    tk = model.tokenizer
    firsts = [target_ids(tk, r.target)[0] for r in requests]
    top, probs = _next_token(model, [r.text for r in requests])
    para_prompts = [p for r in requests for p in r.paraphrases]
    neigh_prompts = [p for r in requests for p, _ in r.neighbours]
    para_top = _next_token(model, para_prompts)[0] if para_prompts else []
    neigh_top, neigh_probs = _next_token(model, neigh_prompts) if neigh_prompts else ([], torch.zeros(0))
    out: dict[str, list[float]] = {m: [] for m in METRICS}
    neighbour_tops: list[list[int]] = []
    neighbour_probs: list[Tensor] = []
    i_para = i_neigh = 0
    for k, req in enumerate(requests):
        out["efficacy"].append(float(top[k] == firsts[k]))
        out["target_prob"].append(float(probs[k, firsts[k]]))
        n_p = len(req.paraphrases)
        hits = [t == firsts[k] for t in para_top[i_para : i_para + n_p]]
        out["paraphrase"].append(sum(hits) / n_p if n_p else float("nan"))
        i_para += n_p
        n_n = len(req.neighbours)
        answers = [target_ids(tk, a)[0] for _, a in req.neighbours]
        tops = neigh_top[i_neigh : i_neigh + n_n]
        out["neighbourhood"].append(
            sum(t == a for t, a in zip(tops, answers, strict=True)) / n_n if n_n else float("nan")
        )
        out["neighbourhood_to_target"].append(sum(t == firsts[k] for t in tops) / n_n if n_n else float("nan"))
        neighbour_tops.append(tops)
        neighbour_probs.append(neigh_probs[i_neigh : i_neigh + n_n])
        i_neigh += n_n
    return out, neighbour_tops, neighbour_probs


def mean_kl(reference: Tensor, probs: Tensor) -> float:
    """Mean ``KL(reference || probs)`` over rows of next-token distributions (NaN for no rows)."""
    if reference.numel() == 0:
        return float("nan")
    # Log-probabilities are logits whose log-softmax is themselves: the shared KL applies unchanged.
    return float(kl_div(probs.clamp_min(1e-30).log(), reference.clamp_min(1e-30).log(), reduction="mean"))


def edit_metrics(
    model: Any,
    requests: Sequence[EditRequest] | None = None,
    record: EditRecord | None = None,
    *,
    neighbourhood: NeighbourhoodConfig | bool = False,
) -> EditMetrics:
    """Efficacy, paraphrase generalisation and neighbourhood specificity of an edit (see module doc).

    With `record` (the edit currently applied to `model`), metrics are measured with the edit reverted
    (``before``) and re-applied (``after``); the model ends exactly as it started. Without it, only the
    model's current state is measured (state ``current``). `requests` defaults to the record's.
    With `neighbourhood` (True or a :class:`NeighbourhoodConfig`), requests without neighbours get
    neighbour prompts about other subjects, answered by the model before the edit (:func:`with_neighbourhood`).
    """
    if requests is None:
        if record is None:
            raise EditError("edit_metrics needs requests or an EditRecord holding them")
        requests = record.requests
    requests = list(requests)
    check_requests(model.tokenizer, requests)
    config = neighbourhood if isinstance(neighbourhood, NeighbourhoodConfig) else None
    states: list[tuple[str, Measured]] = []
    if record is not None:
        record.revert(model)
        try:
            if neighbourhood:
                requests = [with_neighbourhood(model, r, config) for r in requests]
            states.append(("before", measure_requests(model, requests)))
        finally:
            record.apply(model)
        states.append(("after", measure_requests(model, requests)))
    else:
        if neighbourhood:
            requests = [with_neighbourhood(model, r, config) for r in requests]
        states.append(("current", measure_requests(model, requests)))
    ref_tops, ref_probs = states[0][1][1], states[0][1][2]
    for _, (m, tops, probs) in states:
        m["neighbourhood_unchanged"] = [
            (sum(a == b for a, b in zip(t, r0, strict=True)) / len(t)) if t else float("nan")
            for t, r0 in zip(tops, ref_tops, strict=True)
        ]
        m["neighbourhood_kl"] = [mean_kl(r0, p) for p, r0 in zip(probs, ref_probs, strict=True)]
    tensors = {
        name: torch.tensor([m[name] for _, (m, _t, _p) in states], dtype=torch.float32).T.contiguous()
        for name in METRICS
    }
    return EditMetrics(
        tensors=tensors,
        axes={name: ("request", "state") for name in METRICS},
        labels={"request": [f"{r.subject}:{r.target.strip()}" for r in requests], "state": [s for s, _ in states]},
        config={"requests": [r.to_dict() for r in requests], "method": record.method if record else None},
    )


__all__ = ["METRICS", "EditMetrics", "edit_metrics", "mean_kl", "measure_requests"]
