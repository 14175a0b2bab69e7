"""Which logits a metric reads, and scoring many patched runs from those logits alone.

A sweep's metric usually reads one position per prompt (its last real token) and often a few
vocabulary columns (a logit difference reads two of 50,257). :func:`read_plan` finds where: from the
metric's declaration (:class:`mechscope.metrics.Reads`) or else from its gradient, and in both cases
checks it -- the metric must give the same value with every other logit set to NaN.

:class:`Scorer` then scores a chunk of patched variants from those logits only: the patched run stops
at the unembedding's input (the final-normed residual), keeps one row per prompt, and projects it onto
the columns read (HF's unembedding weights, and Gemma's final soft-capping), checked once against the
base run's logits. The metric itself -- any ``logits -> scalar | [batch]`` function -- is evaluated on
a logits tensor whose every position of a row shows that row's read logits (a zero-stride view; the
check above guarantees the metric looks nowhere else), for all variants of a chunk at once when the
metric is row-wise (checked on the first chunk), else one variant at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechscope.errors import ConfigError
from mechscope.metrics import Metric, MetricError, metric_reads, resolve_positions, score, score_rows, scoring

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel
    from mechscope.model.partial import BaseRun

#: A final partial run: given the absolute positions whose logits are wanted, run (and return its logits).
Forward = Callable[[list[int]], Any]


@dataclass(frozen=True)
class ReadPlan:
    """Where a metric reads logits ``[batch, pos, d_vocab]``.

    Attributes:
        rows: ``[batch]`` the one position each row reads, or None when some row reads several.
        positions: every position some row reads, sorted.
        columns: ``[k]`` the vocabulary ids read, or None for all of them.
    """

    rows: Int[Tensor, " batch"] | None
    positions: list[int]
    columns: Int[Tensor, " k"] | None


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(torch.isclose(a, b, rtol=0.0, atol=0.0, equal_nan=True).all())


def _reads_only(metric: Metric, logits: Tensor, mask: Tensor | None, plan: ReadPlan) -> bool:
    """True if `metric` gives the same value per row with every logit outside `plan` set to NaN."""
    batch = logits.shape[0]
    keep = torch.zeros(logits.shape[:2], dtype=torch.bool, device=logits.device)
    if plan.rows is not None:
        keep[torch.arange(batch, device=logits.device), plan.rows.to(logits.device)] = True
    else:
        keep[:, plan.positions] = True
    masked = torch.full_like(logits, float("nan"))
    if plan.columns is None:
        masked[keep] = logits[keep]
    else:
        cols = plan.columns.to(logits.device)
        masked[keep, cols[:, None]] = logits[keep][:, cols].T
    with torch.no_grad():
        try:
            return _same(score_rows(metric, masked, mask).float(), score_rows(metric, logits, mask).float())
        except Exception:  # a metric that fails on NaN-masked logits reads them
            return False


def _gradient(metric: Metric, logits: Tensor, mask: Tensor | None) -> Tensor | None:
    probe = logits.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            out = score(metric, probe, mask)
            if not out.requires_grad:
                return None
            out.float().sum().backward()
    except RuntimeError:
        return None
    return probe.grad


def read_plan(
    metric: Metric, logits: Float[Tensor, "batch pos d_vocab"], attention_mask: Tensor | None = None
) -> ReadPlan:
    """Where `metric` reads `logits`, from its declaration or its gradient, verified (see the module doc).

    A declaration that the NaN check refutes raises :class:`MetricError`; an undeclared metric whose
    gradient does not give a verified plan reads every logit."""
    batch, n_pos, vocab = logits.shape
    everything = ReadPlan(rows=None, positions=list(range(n_pos)), columns=None)
    declared = metric_reads(metric)
    if declared is not None:
        pos = resolve_positions(logits, declared.position, attention_mask)
        rows = torch.full((batch,), pos % n_pos) if isinstance(pos, int) else pos.long().cpu()
        columns = None
        if declared.tokens is not None:
            if max(declared.tokens) >= vocab:
                raise ConfigError(f"metric declares tokens {list(declared.tokens)}; the vocabulary has {vocab}")
            columns = torch.tensor(declared.tokens, dtype=torch.long)
        plan = ReadPlan(rows=rows, positions=sorted(set(rows.tolist())), columns=columns)
        if not _reads_only(metric, logits, attention_mask, plan):
            raise MetricError(
                f"the metric declares it reads {declared}, but its value changes when every other logit is "
                f"NaN: declare what it reads (mechscope.metrics.reads), or nothing"
            )
        return plan
    grad = _gradient(metric, logits, attention_mask)
    if grad is None:
        return everything
    used = grad != 0
    per_row = used.any(-1)  # [batch, pos]
    if not bool(per_row.any()):
        return everything
    positions = [int(p) for p in per_row.any(0).nonzero().flatten()]
    found: Tensor | None = per_row.float().argmax(-1).cpu() if bool((per_row.sum(-1) == 1).all()) else None
    column_used = used.any(0).any(0)
    cols: Tensor | None = None if bool(column_used.all()) else column_used.nonzero().flatten().cpu()
    for plan in (ReadPlan(found, positions, cols), ReadPlan(found, positions, None), ReadPlan(None, positions, None)):
        if _reads_only(metric, logits, attention_mask, plan):
            return plan
    return everything


@contextmanager
def unembedding_only(model: HookedModel, keep: Sequence[int]) -> Iterator[None]:
    """Within the block, the model's unembedding projects only positions `keep` of its input: a full
    forward (with gradients) returns logits ``[batch, len(keep), d_vocab]`` (see :func:`spread`)."""
    index = list(keep)

    def trim(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0][:, index], *args[1:])

    handle = model.module(model.adapter.unembed).register_forward_pre_hook(trim)
    try:
        yield
    finally:
        handle.remove()


def spread(
    kept: Float[Tensor, "batch k d_vocab"], keep: Sequence[int], n_pos: int
) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits at positions `keep` placed in a ``[batch, n_pos, d_vocab]`` tensor, NaN elsewhere (keeps
    gradients): what a metric that reads only `keep` needs."""
    if list(keep) == list(range(n_pos)):
        return kept
    full = kept.new_full((kept.shape[0], n_pos, kept.shape[-1]), float("nan"))
    full[:, list(keep)] = kept
    return full


class _Captured(Exception):
    """Ends a partial run at the unembedding's input."""


class Scorer:
    """The metric of chunks of patched variants of `base`, each from the logits the metric reads.

    :meth:`chunk` takes a callable running the chunk's final partial run for the logits at the given
    positions and returns the metric per variant and row ``[n, batch]`` (float32)."""

    def __init__(self, model: HookedModel, metric: Metric, base: BaseRun) -> None:
        self.model, self.metric, self.base = model, metric, base
        self.mask = base.attention_mask
        self.plan = read_plan(metric, base.logits, self.mask)
        self.compact = self.plan.rows is not None
        self.vectorised: bool | None = None  # decided on the first chunk of several variants
        self._buffer: Tensor | None = None
        if not self.compact:
            return
        batch, device = base.batch, base.logits.device
        rows = self.plan.rows
        assert rows is not None
        self.rows = rows.to(device)
        self.base_vals = self._columns(base.logits[torch.arange(batch, device=device), self.rows])
        self.unembed: nn.Module = model.module(model.adapter.unembed)
        self._weight = self._restricted_weight()
        if self._weight is not None and not self._check_unembedding():
            self._weight = None
        if self._weight is None and not self._check_unembedding():
            self.compact = False  # an unembedding we cannot reproduce: full logits at the positions read

    # The unembedding of the columns read ----------------------------------------------------------------
    def _columns(self, logits: Tensor) -> Tensor:
        cols = self.plan.columns
        return logits if cols is None else logits[..., cols.to(logits.device)]

    def _restricted_weight(self) -> tuple[Tensor, Tensor | None] | None:
        """The unembedding's weight (and bias) rows of the columns read, when it is a plain linear layer
        with its weights in memory (not offloaded); else None (the module itself is called)."""
        cols, head = self.plan.columns, self.unembed
        if cols is None or type(head) is not nn.Linear or hasattr(head, "_hf_hook"):
            return None
        if head.weight.device.type == "meta":
            return None
        idx = cols.to(head.weight.device)
        bias = None if head.bias is None else head.bias.detach()[idx]
        return head.weight.detach()[idx], bias

    def _project(self, hidden: Float[Tensor, "rows d_model"]) -> Tensor:
        """Logits of the columns read (every column without a restriction) of final-normed `hidden`."""
        if self._weight is None:
            with torch.no_grad():
                logits = self._columns(self.unembed(hidden[:, None])[:, 0])
        else:
            weight, bias = self._weight
            logits = nn.functional.linear(hidden.to(weight.device), weight, bias)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _check_unembedding(self) -> bool:
        """Whether the projection gives the base run's logits at the entries read."""
        from mechscope.model.partial import run_from

        base, last = self.base, self.model.dims.n_layers - 1
        start = min(self.plan.positions)
        resid = base.resid_pre[last][:, start:]
        hidden, is_hidden = self._capture(
            lambda keep: run_from(self.model, base, resid, layer=last, start_pos=start, logit_positions=keep),
            self.plan.positions,
        )
        ok = is_hidden
        if is_hidden:
            slot = torch.tensor([self.plan.positions.index(int(p)) for p in self.rows.tolist()], device=hidden.device)
            got = self._project(hidden[torch.arange(base.batch, device=hidden.device), slot]).float()
            want = self.base_vals.float().to(got.device)
            eps = torch.finfo(base.logits.dtype).eps
            tol = max(1e-5, 4 * eps) * max(1.0, float(want.abs().max()))
            ok = float((got - want).abs().max()) <= tol
        return ok

    def _capture(self, forward: Forward, keep: list[int]) -> tuple[Tensor, bool]:
        """Run `forward` until the unembedding's input ``[rows, len(keep), d_model]`` (True), or its
        logits when it returns without unembedding (False)."""
        captured: list[Tensor] = []

        def grab(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured.append(args[0] if args else kwargs["input"])
            raise _Captured

        handle = self.unembed.register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
        try:
            out = forward(keep)
        except _Captured:
            return captured[0].detach(), True
        finally:
            handle.remove()
        return out, False

    # Scoring -----------------------------------------------------------------------------------------------
    def chunk(self, forward: Forward, n: int, start: int = 0) -> Float[Tensor, "n batch"]:
        """The metric of `n` variants (rows variant-major) whose patches start at position `start`."""
        if not self.compact:
            return self._chunk_full(forward, n, start)
        batch = self.base.batch
        vals = self.base_vals.repeat(n, 1)
        keep = [p for p in self.plan.positions if p >= start]
        if keep:
            out, is_hidden = self._capture(forward, keep)
            live = (self.rows >= start).nonzero().flatten()
            slot = torch.tensor([keep.index(int(p)) for p in self.rows[live].tolist()], device=out.device)
            which = (live[None, :] + batch * torch.arange(n, device=live.device)[:, None]).flatten()
            picked = out[which.to(out.device), slot.repeat(n)]
            vals[which] = (self._project(picked) if is_hidden else self._columns(picked)).to(vals.device, vals.dtype)
        return self._evaluate(vals, n)

    def _logits_view(self, vals: Tensor) -> Tensor:
        """``[rows, pos, d_vocab]``: each row's read logits at every position (zero stride), NaN elsewhere."""
        n_pos = self.base.n_pos
        if self.plan.columns is None:
            full = vals
        else:
            rows, vocab = vals.shape[0], self.base.logits.shape[-1]
            if self._buffer is None or self._buffer.shape[0] != rows:
                self._buffer = torch.full((rows, vocab), float("nan"), dtype=vals.dtype, device=vals.device)
            full = self._buffer
            full[:, self.plan.columns.to(vals.device)] = vals
        return full[:, None, :].expand(full.shape[0], n_pos, full.shape[-1])

    def _evaluate(self, vals: Tensor, n: int) -> Tensor:
        logits = self._logits_view(vals)
        if self.vectorised is not False and n > 1:
            together = self._together(logits, n)
            if self.vectorised and together is not None:
                return together
            one_by_one = self._one_by_one(logits, n)
            self.vectorised = together is not None and _same(together, one_by_one)
            return one_by_one
        return self._one_by_one(logits, n)

    def _one_by_one(self, logits: Tensor, n: int) -> Tensor:
        batch = self.base.batch
        return torch.stack(
            [score_rows(self.metric, logits[j * batch : (j + 1) * batch], self.mask).float() for j in range(n)]
        )

    def _together(self, logits: Tensor, n: int) -> Tensor | None:
        """All variants in one metric call (None when the metric is not one value per row)."""
        try:
            with scoring(self.mask.repeat(n, 1)):
                out = self.metric(logits)
        except Exception:  # any failure on n * batch rows: score one variant at a time
            self.vectorised = False
            return None
        if not isinstance(out, Tensor) or out.shape != (logits.shape[0],):
            self.vectorised = False
            return None
        return out.detach().float().reshape(n, self.base.batch)

    def _chunk_full(self, forward: Forward, n: int, start: int) -> Tensor:
        """Rows reading several positions: the full logits at the positions read, one variant at a time."""
        batch, base = self.base.batch, self.base
        keep = [p for p in self.plan.positions if p >= start]
        early = [p for p in self.plan.positions if p < start]
        buffer = torch.full_like(base.logits, float("nan"))
        if early:
            buffer[:, early] = base.logits[:, early]
        if not keep:
            return score_rows(self.metric, buffer, self.mask).float().expand(n, batch).clone()
        logits = forward(keep)
        out = []
        for j in range(n):
            buffer[:, keep] = logits[j * batch : (j + 1) * batch]
            out.append(score_rows(self.metric, buffer, self.mask).detach().float())
        return torch.stack(out)


__all__ = ["Forward", "ReadPlan", "Scorer", "read_plan", "spread", "unembedding_only"]
