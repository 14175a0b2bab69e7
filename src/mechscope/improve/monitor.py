"""A runtime monitor: score every token a model reads while it generates, alert past a calibrated
threshold, and act -- log, stop, or turn on an intervention for the rest of the generation.

``with monitor(model, detector, policy="stop") as mon: out = model.generate(...)`` attaches a reader at
the detector's sites and a forward pre-hook that sees each forward's attention mask and KV-cache length,
so it works inside HF ``generate`` with batches, left padding and the KV cache (the prompt forward,
then one token per step). Each real token's score is the detector's per-token score of that token's
activations -- the same number :meth:`Detector.score_tokens` gives on the finished text -- and a running
pooled score (the detector's pooling over the tokens seen so far in the monitored *scope*) decides the
alert: the first token whose running score exceeds the threshold.

Policies, from the alert on:

- ``log``: record only; outputs are exactly those of plain generation.
- ``stop``: the alerted row's next token is forced to the stop token (the end-of-text token), so HF
  ends that row; the trace marks where and why.
- ``intervene``: `intervention` (any :class:`~mechscope.steer.Intervention`: directional ablation, a
  steering vector, an ablation...) acts on the alerted row for every activation computed after the
  alert: in the alert's own forward at the alerted token and later ones, at the detector's site (after
  it is read) and every site the forward reaches after it; in every later forward, everywhere. Rows
  without an alert are untouched (a "circuit breaker").

The final sampled token is never read by the model and so has no score. Generation must use the KV
cache (HF's default) and one sequence per row (no beam search).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from mechscope.errors import ConfigError, ShapeError
from mechscope.improve.detect.activations import detector_sites
from mechscope.improve.detect.detectors import Detector
from mechscope.model.hooks import HookContext, HookFn, sort_sites
from mechscope.model.kv_cache import cache_argument
from mechscope.model.tokens import special_ids
from mechscope.sites import Site
from mechscope.steer.intervention import Intervention, open_hooks, require_hooked

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

POLICIES = ("log", "stop", "intervene")
SCOPES = ("generated", "prompt", "all")


@dataclass
class RowTrace:
    """One sequence's monitored tokens: ids, per-token scores, running pooled scores, absolute columns
    (in the padded batch), whether each was generated, and the alert (index into these lists)."""

    token_ids: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    running: list[float] = field(default_factory=list)
    columns: list[int] = field(default_factory=list)
    generated: list[bool] = field(default_factory=list)
    alert: int | None = None

    @property
    def alert_score(self) -> float | None:
        return None if self.alert is None else self.running[self.alert]

    def to_dict(self) -> dict[str, Any]:
        return {
            "token_ids": self.token_ids,
            "scores": self.scores,
            "running": self.running,
            "columns": self.columns,
            "generated": self.generated,
            "alert": self.alert,
        }


@dataclass
class MonitorTrace:
    """What a monitor saw in one generation (or forward): one :class:`RowTrace` per batch row."""

    rows: list[RowTrace]
    threshold: float
    policy: str
    scope: str
    detector: str

    @property
    def alerted(self) -> list[bool]:
        return [r.alert is not None for r in self.rows]

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "policy": self.policy,
            "scope": self.scope,
            "detector": self.detector,
            "rows": [r.to_dict() for r in self.rows],
        }

    def render(self, model: HookedModel, row: int = 0, *, generated_only: bool = True) -> str:
        """One row as ``token[score]`` pieces, the alerted token marked with ``!!``."""
        r = self.rows[row]
        parts = []
        for i, (tid, s, gen) in enumerate(zip(r.token_ids, r.scores, r.generated, strict=True)):
            if generated_only and not gen:
                continue
            mark = "!!" if r.alert == i else ""
            parts.append(f"{model.to_string([tid])!r}[{s:.2f}]{mark}")
        return " ".join(parts)


class _Step:
    """What the pre-hook learnt about the forward now running."""

    def __init__(self) -> None:
        self.mask: Tensor | None = None  # [batch, n_new] real tokens of this forward
        self.ids: Tensor | None = None  # [batch, n_new]
        self.offset = 0  # columns already in the KV cache
        self.n_new = 0


class Monitor:
    """The context manager :func:`monitor` returns; ``.trace`` holds the latest generation's trace."""

    def __init__(
        self,
        model: HookedModel,
        detector: Detector,
        *,
        policy: str = "log",
        intervention: Intervention | None = None,
        threshold: float | None = None,
        scope: str = "generated",
        stop_token: int | None = None,
    ) -> None:
        self.model = require_hooked(model)
        if not isinstance(detector, Detector):
            raise ConfigError(f"expected a mechscope Detector; got {type(detector).__name__}")
        detector.check_model(self.model)
        if policy not in POLICIES:
            raise ConfigError(f"policy must be one of {POLICIES}; got {policy!r}")
        if scope not in SCOPES:
            raise ConfigError(f"scope must be one of {SCOPES}; got {scope!r}")
        chosen = threshold if threshold is not None else detector.threshold
        if chosen is None:
            raise ConfigError("the detector has no threshold: calibrate it (calibrate(...)) or pass threshold=")
        if policy == "intervene":
            if not isinstance(intervention, Intervention):
                raise ConfigError(
                    "policy 'intervene' needs intervention= a mechscope Intervention; "
                    f"got {type(intervention).__name__}"
                )
            if intervention.model is not self.model:
                raise ConfigError("the intervention is bound to another HookedModel; build it on the monitored model")
        elif intervention is not None:
            raise ConfigError(f"intervention= applies only to policy 'intervene'; policy is {policy!r}")
        self.stop_token = self._stop_token(stop_token) if policy == "stop" else None
        self.detector = detector
        self.policy = policy
        self.intervention = intervention
        self.threshold = float(chosen)
        self.scope = scope
        self.sites = sort_sites(detector_sites(self.model, detector.sites))
        self.special = torch.tensor(special_ids(self.model.tokenizer), dtype=torch.long)
        self.trace: MonitorTrace | None = None
        self._stack: ExitStack | None = None
        self._step = _Step()
        self._acts: dict[str, Tensor] = {}
        self._records: list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor, bool]] = []
        self._state: dict[str, Tensor] = {}

    def _stop_token(self, stop_token: int | None) -> int:
        if stop_token is not None:
            return int(stop_token)
        eos = getattr(self.model.hf_model.generation_config, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        if eos is None and self.model.tokenizer is not None:
            eos = self.model.tokenizer.eos_token_id
        if eos is None:
            raise ConfigError("policy 'stop' needs an end-of-text token: the model has none; pass stop_token=")
        return int(eos)

    # Hooks ------------------------------------------------------------------------------------------
    def _pre_hook(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, Tensor):
            raise ConfigError("the monitor reads token ids; this forward got inputs_embeds only")
        cache = cache_argument(kwargs)
        offset = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        mask = kwargs.get("attention_mask")
        n_new = ids.shape[1]
        if isinstance(mask, Tensor) and mask.ndim == 2:
            new_mask = mask[:, offset : offset + n_new].bool()
        else:
            new_mask = torch.ones_like(ids, dtype=torch.bool)
        step = self._step
        step.ids, step.mask, step.offset, step.n_new = ids, new_mask, offset, n_new
        if offset == 0:
            self._start_run(ids.shape[0], ids.device)

    def _start_run(self, batch: int, device: torch.device) -> None:
        self._records = []
        z = torch.zeros(batch, device=device)
        self._state = {
            "sum": z.clone(),
            "count": z.clone(),
            "max": torch.full((batch,), -torch.inf, device=device),
            "last": torch.full((batch,), torch.nan, device=device),
            "alert_col": torch.full((batch,), -1, dtype=torch.long, device=device),
            "finished": torch.zeros(batch, dtype=torch.bool, device=device),
        }

    def _reader(self, site: Site, last: bool) -> HookFn:
        def read(act: Tensor, _ctx: HookContext) -> None:
            self._acts[site.name] = act
            if last:
                self._score()

        return read

    def _score(self) -> None:
        step, st = self._step, self._state
        assert step.ids is not None and step.mask is not None
        acts = self._acts
        batch, n_new = step.ids.shape
        first = next(iter(acts.values()))
        if first.shape[:2] != (batch, n_new):
            raise ShapeError(
                f"the monitor expected activations [batch {batch}, pos {n_new}]; got {tuple(first.shape[:2])} "
                "(beam search and other reshaped batches are not supported)"
            )
        with torch.no_grad():
            scores = self.detector.token_scores_from({k: v.detach() for k, v in acts.items()}).float()
        self._acts = {}
        ids = step.ids
        generated = step.offset > 0
        real = step.mask.to(scores.device)
        if generated:  # a row that fed its end-of-text token is done; HF pads it from then on
            real = real & ~st["finished"][:, None]
            st["finished"] = st["finished"] | torch.isin(ids[:, -1], self._eos_ids(ids.device))
        eligible = real & ~torch.isin(ids, self.special.to(ids.device))
        if (self.scope == "generated" and not generated) or (self.scope == "prompt" and generated):
            eligible = torch.zeros_like(eligible)
        elif self.scope == "prompt" and self.detector.pooling == "last":  # the prompt's last scored token only
            index = torch.arange(n_new, device=eligible.device).expand_as(eligible)
            last = torch.where(eligible, index, torch.full_like(index, -1)).max(1, keepdim=True).values
            eligible = eligible & (index == last)
        e = eligible.float()
        cum_sum = st["sum"][:, None] + (scores * e).cumsum(1)
        cum_count = st["count"][:, None] + e.cumsum(1)
        masked = torch.where(eligible, scores, torch.full_like(scores, -torch.inf))
        cum_max = torch.maximum(st["max"][:, None], masked.cummax(1).values)
        if self.detector.pooling == "mean":
            running = cum_sum / cum_count.clamp_min(1)
        elif self.detector.pooling == "max":
            running = cum_max
        else:
            running = scores
        running = torch.where(eligible, running, torch.full_like(running, torch.nan))
        cols = step.offset + torch.arange(n_new, device=scores.device)
        over = eligible & (running > self.threshold)
        first_col = torch.where(over, cols[None, :], torch.full_like(over, 10**9, dtype=torch.long)).min(1).values
        new_alert = (st["alert_col"] < 0) & (first_col < 10**9)
        st["alert_col"] = torch.where(new_alert, first_col, st["alert_col"])
        st["sum"], st["count"], st["max"] = cum_sum[:, -1], cum_count[:, -1], cum_max[:, -1]
        self._records.append((ids.detach(), scores.detach(), running.detach(), real, cols, step.offset > 0))

    def _eos_ids(self, device: torch.device) -> Tensor:
        eos = getattr(self.model.hf_model.generation_config, "eos_token_id", None)
        if eos is None:
            return torch.zeros(0, dtype=torch.long, device=device)
        values = eos if isinstance(eos, (list, tuple)) else [eos]
        return torch.tensor([int(v) for v in values], dtype=torch.long, device=device)

    def _gate(self, shape_batch: int, n_pos: int, device: torch.device, *, trailing: bool = False) -> Tensor:
        """[batch, pos] True where the policy acts: alerted rows at columns >= their alert.

        `trailing`: the activation holds only the forward's last `n_pos` positions (generate computes
        logits at the last position only)."""
        st, step = self._state, self._step
        fits = step.n_new == n_pos or (trailing and n_pos < step.n_new)
        if not st or not fits or st["alert_col"].shape[0] != shape_batch:
            raise ShapeError(
                f"the monitor's policy expected activations [batch {st['alert_col'].shape[0] if st else '?'}, "
                f"pos {step.n_new}]; got [{shape_batch}, {n_pos}]"
            )
        cols = step.offset + step.n_new - n_pos + torch.arange(n_pos, device=device)
        alert = st["alert_col"].to(device)
        return (alert[:, None] >= 0) & (cols[None, :] >= alert[:, None])

    def _gated(self, fn: HookFn, site: Site) -> HookFn:
        def gated(act: Tensor, ctx: HookContext) -> Tensor:
            original = act
            new = fn(act.clone(), ctx)
            changed = original if new is None else new
            gate = self._gate(act.shape[0], act.shape[site.pos_axis], act.device)
            view = [1] * act.ndim
            view[0], view[site.pos_axis] = gate.shape[0], gate.shape[1]
            return torch.where(gate.reshape(view), changed, original)

        return gated

    def _stopper(self, logits: Tensor, _ctx: HookContext) -> Tensor:
        gate = self._gate(logits.shape[0], logits.shape[1], logits.device, trailing=True)
        forced = torch.full_like(logits, torch.finfo(logits.dtype).min)
        forced[..., self.stop_token] = 0
        return torch.where(gate[..., None], forced, logits)

    def _plan(self) -> dict[Site, list[HookFn]]:
        plan: dict[Site, list[HookFn]] = {}
        for i, site in enumerate(self.sites):
            plan.setdefault(site, []).append(self._reader(site, last=i == len(self.sites) - 1))
        if self.policy == "intervene":
            assert self.intervention is not None
            for site, fns in self.intervention.hook_plan().items():
                plan.setdefault(site, []).extend(self._gated(fn, site) for fn in fns)
        if self.policy == "stop":
            plan.setdefault(self.model.site("logits"), []).append(self._stopper)
        return plan

    # Context --------------------------------------------------------------------------------------
    def __enter__(self) -> Monitor:
        if self._stack is not None:
            raise ConfigError("this monitor is already active")
        pre_hooks = [self._pre_hook] + ([self.intervention._track_phase] if self.intervention is not None else [])
        self._stack = open_hooks(self.model, pre_hooks, self._plan())
        return self

    def __exit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()
        self.trace = self._build_trace() if self._records else None

    def finish(self) -> MonitorTrace:
        """The trace of the latest run so far (also set on leaving the ``with`` block)."""
        if not self._records:
            raise ConfigError("the monitor has seen no forward pass yet")
        self.trace = self._build_trace()
        return self.trace

    def _build_trace(self) -> MonitorTrace:
        batch = self._records[0][0].shape[0]
        rows = [RowTrace() for _ in range(batch)]
        alert_col = self._state["alert_col"].tolist()
        for ids, scores, running, real, cols, generated in self._records:
            ids_l, sc_l, run_l, real_l, cols_l = (
                ids.tolist(),
                scores.float().cpu().tolist(),
                running.float().cpu().tolist(),
                real.tolist(),
                cols.tolist(),
            )
            for r in range(batch):
                row = rows[r]
                for j, col in enumerate(cols_l):
                    if not real_l[r][j]:
                        continue
                    if col == alert_col[r]:
                        row.alert = len(row.token_ids)
                    row.token_ids.append(ids_l[r][j])
                    row.scores.append(sc_l[r][j])
                    row.running.append(run_l[r][j])
                    row.columns.append(col)
                    row.generated.append(bool(generated))
        return MonitorTrace(rows, self.threshold, self.policy, self.scope, self.detector.describe())


def monitor(
    model: HookedModel,
    detector: Detector,
    *,
    policy: Literal["log", "stop", "intervene"] = "log",
    intervention: Intervention | None = None,
    threshold: float | None = None,
    scope: Literal["generated", "prompt", "all"] = "generated",
    stop_token: int | None = None,
) -> Monitor:
    """``with monitor(model, detector, policy=...) as mon: model.generate(...)``; then ``mon.trace``.

    `threshold` defaults to the detector's calibrated one. `scope` says which tokens are pooled and may
    alert: ``"generated"`` (the reply), ``"prompt"`` (the request -- with ``last`` pooling its final token
    only: a screen for e.g. a backdoor trigger, applied before the first reply token is chosen) or ``"all"``.
    """
    return Monitor(
        model,
        detector,
        policy=policy,
        intervention=intervention,
        threshold=threshold,
        scope=scope,
        stop_token=stop_token,
    )


def scores_afterwards(
    model: HookedModel, detector: Detector, sequences: Tensor, attention_mask: Tensor
) -> list[list[float]]:
    """Per-token detector scores of finished (left-padded) `sequences`, one list per row over its real
    columns: what the monitor's trace must equal (the final token included)."""
    model = require_hooked(model)
    sites = detector_sites(model, detector.sites)
    with torch.no_grad():
        _, cache = model.run_with_cache({"input_ids": sequences, "attention_mask": attention_mask}, sites)
        scores = detector.token_scores_from({s.name: cache[s.name] for s in sites}).float().cpu()
    mask = attention_mask.bool().cpu()
    return [scores[r][mask[r]].tolist() for r in range(len(scores))]


def generated_mask(sequences: Tensor, prompt_mask: Tensor) -> Tensor:
    """The attention mask of `sequences` = prompt (left-padded, its mask) + generated tokens (all real)."""
    extra = sequences.shape[1] - prompt_mask.shape[1]
    if extra < 0:
        raise ShapeError(
            f"sequences ({sequences.shape[1]} columns) are shorter than the prompt ({prompt_mask.shape[1]} columns)"
        )
    ones = torch.ones(prompt_mask.shape[0], extra, dtype=prompt_mask.dtype, device=prompt_mask.device)
    return torch.cat([prompt_mask, ones], dim=1)


__all__ = [
    "POLICIES",
    "SCOPES",
    "Monitor",
    "MonitorTrace",
    "RowTrace",
    "generated_mask",
    "monitor",
    "scores_afterwards",
]
