"""Metrics as plain functions of logits, written once for every method: one value per batch row.

A *metric* maps logits ``[batch, pos, d_vocab]`` to a scalar or ``[batch]`` (:data:`Metric`). Every
metric here reads, by default, **each row's last real token**: in a batch of prompts of different
lengths the tokenizer pads the shorter ones (on the right for most models), and position ``-1`` of a
right-padded row is a pad token -- a plausible-looking, silently wrong number.

Where the last real token is comes from the attention mask. Pass it explicitly
(``logit_diff(logits, a, b, attention_mask=mask)``), or let a mechscope verb provide it: every verb
that takes a metric evaluates it inside :func:`scoring` with the attention mask of the rows being
scored, so ``lambda logits: logit_diff(logits, a, b)`` is right in a mixed-length batch. Outside such
a scope and without a mask every row is taken to be unpadded (the last position). ``position=`` names a
position instead: an int for every row (negative counts from the end of the padded sequence) or one
index per row. Custom metrics get the same behaviour from :func:`logits_at`.

:func:`kl_div` is the one KL divergence between two sets of logits (log-softmax in float32, pads
excluded) that every method uses.

A metric may *declare* which logits it reads (:class:`Reads`: a position per row, and the vocabulary
tokens, or all): the metric constructors here do, and :func:`reads` declares a custom one. Sweeps then
compute only those logits -- final norm and unembedding of one row per prompt, of the declared tokens'
columns only -- and check the declaration once (the value must not change when every other logit is NaN).
An undeclared metric is still a plain function; sweeps then find what it reads from its gradient.

A :class:`SiteMetric` reads one site's activation instead of the logits (a probe's score at a layer, the
norm of a residual direction): activation patching then stops every patched run at that site, so the
layers after it never run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.errors import ConfigError, MechscopeError, ShapeError

if TYPE_CHECKING:
    from mechscope.sites import SiteLike

#: A metric: logits ``[batch, pos, d_vocab]`` -> a scalar or one value per row ``[batch]``.
Metric = Callable[[Tensor], Tensor]
#: A position: None (each row's last real token), an int for every row, or one index per row.
Position = int | Int[Tensor, " batch"] | Sequence[int] | None
TokenIds = int | Sequence[int] | Int[Tensor, " batch"]

_MASK: ContextVar[Tensor | None] = ContextVar("mechscope_scoring_mask", default=None)


class MetricError(MechscopeError, ValueError):
    """A metric that does not return one value (or one per batch row) as a tensor."""


# Where a metric reads -------------------------------------------------------------------------------------
def last_positions(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
    """Index of each row's last real (mask == 1) token, for right or left padding."""
    if not isinstance(attention_mask, Tensor) or attention_mask.ndim != 2:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise ShapeError(f"attention_mask must be [batch, pos]; got {got}")
    idx = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = torch.where(attention_mask.bool(), idx, -1).amax(-1)
    if bool((last < 0).any()):
        empty = (last < 0).nonzero().flatten().tolist()
        raise ShapeError(f"attention_mask rows {empty} have no real token (all zeros)")
    return last


@contextmanager
def scoring(attention_mask: Tensor | None) -> Iterator[None]:
    """Within the block, metrics with the default position read each row's last real token of
    `attention_mask` ``[batch, pos]`` (None: every row unpadded). Verbs wrap their metric calls in it."""
    if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.ndim != 2):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise ShapeError(f"attention_mask must be [batch, pos]; got {got}")
    token = _MASK.set(attention_mask)
    try:
        yield
    finally:
        _MASK.reset(token)


def scoring_mask() -> Tensor | None:
    """The attention mask of the enclosing :func:`scoring` block (None outside one)."""
    return _MASK.get()


def _check_logits(logits: Tensor, what: str = "logits") -> None:
    if not isinstance(logits, Tensor) or logits.ndim != 3:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ShapeError(f"{what} must be [batch, pos, d_vocab]; got {got}")


def resolve_positions(
    logits: Float[Tensor, "batch pos d_vocab"], position: Position = None, attention_mask: Tensor | None = None
) -> int | Int[Tensor, " batch"]:
    """The position each row is scored at: `position` when given, else each row's last real token of
    `attention_mask` (or of the enclosing :func:`scoring` block), else the last position."""
    batch, n_pos = logits.shape[:2]
    if position is not None:
        if isinstance(position, int):
            if not -n_pos <= position < n_pos:
                raise ShapeError(f"position {position} is out of range for {n_pos} positions")
            return position
        pos = torch.as_tensor(position, dtype=torch.long)
        if pos.shape != (batch,):
            raise ShapeError(f"per-row positions must be [batch]=({batch},); got {tuple(pos.shape)}")
        if bool(((pos < -n_pos) | (pos >= n_pos)).any()):
            raise ShapeError(f"positions {pos.tolist()} are out of range for {n_pos} positions")
        return pos % n_pos
    mask = attention_mask if attention_mask is not None else _MASK.get()
    if mask is None:
        return -1
    if tuple(mask.shape) != (batch, n_pos):
        source = "attention_mask" if attention_mask is not None else "the attention mask of the enclosing scoring()"
        raise ShapeError(
            f"{source} is {tuple(mask.shape)} but the logits are [batch, pos]=({batch}, {n_pos}); a metric "
            f"scores the rows it is given: pass position= or the matching attention_mask"
        )
    return last_positions(mask)


def logits_at(
    logits: Float[Tensor, "batch pos d_vocab"], position: Position = None, *, attention_mask: Tensor | None = None
) -> Float[Tensor, "batch d_vocab"]:
    """The logits each row is scored at (see :func:`resolve_positions`)."""
    _check_logits(logits)
    pos = resolve_positions(logits, position, attention_mask)
    if isinstance(pos, int):
        return logits[:, pos]
    if pos.numel() and bool((pos == pos[0]).all()):
        return logits[:, int(pos[0])]  # every row at one position: a view, not a copy of every row's vocabulary
    return logits[torch.arange(logits.shape[0], device=logits.device), pos.to(logits.device)]


def _token_ids(tokens: TokenIds, batch: int, device: torch.device, what: str) -> Tensor:
    ids = torch.as_tensor(tokens, dtype=torch.long, device=device)
    if ids.ndim == 0:
        return ids.expand(batch)
    if ids.shape != (batch,):
        raise ShapeError(f"{what} token ids must be an int or [batch]=({batch},); got shape {tuple(ids.shape)}")
    return ids


# What a metric reads -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reads:
    """The logits a metric reads: per row the position `position` (a :data:`Position`: None is each
    row's last real token) and the vocabulary columns `tokens` (None: every token, e.g. a softmax)."""

    position: Position = None
    tokens: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.tokens is not None and (
            not isinstance(self.tokens, tuple)
            or not self.tokens
            or any(not isinstance(t, int) or t < 0 for t in self.tokens)
        ):
            raise ConfigError(f"Reads.tokens must be None or a non-empty tuple of token ids >= 0; got {self.tokens!r}")


class DeclaredMetric:
    """A metric (``logits -> scalar | [batch]``) carrying the :class:`Reads` it declares; calls `fn`."""

    def __init__(self, fn: Metric, reads: Reads) -> None:
        if not callable(fn):
            raise ConfigError(f"a metric must be callable; got {type(fn).__name__}")
        if not isinstance(reads, Reads):
            raise ConfigError(f"reads must be a mechscope.metrics.Reads; got {type(reads).__name__}")
        self.fn = fn
        self.reads = reads

    def __call__(self, logits: Tensor) -> Tensor:
        return self.fn(logits)

    def __repr__(self) -> str:
        return f"DeclaredMetric({getattr(self.fn, '__name__', self.fn)!r}, {self.reads})"


def _token_tuple(*ids: TokenIds | None) -> tuple[int, ...] | None:
    out: set[int] = set()
    for t in ids:
        if t is None:
            continue
        flat = torch.as_tensor(t).flatten().tolist()
        if any(not isinstance(v, int) for v in flat):
            return None  # not token ids: declare nothing about the columns
        out.update(int(v) for v in flat)
    return tuple(sorted(out)) or None


def reads(*, position: Position = None, tokens: TokenIds | None = None) -> Callable[[Metric], DeclaredMetric]:
    """Declare what a custom metric reads: ``@reads(tokens=[a, b])`` on ``def m(logits): ...``.

    `position` as for the metrics here (None: each row's last real token); `tokens`: the vocabulary
    ids it reads (None: all). Sweeps then compute only those logits and verify the declaration once."""
    declared = Reads(position=position, tokens=None if tokens is None else _token_tuple(tokens))

    def wrap(fn: Metric) -> DeclaredMetric:
        return DeclaredMetric(fn, declared)

    return wrap


def metric_reads(metric: Any) -> Reads | None:
    """The :class:`Reads` `metric` declares (None: undeclared, a plain function)."""
    declared = getattr(metric, "reads", None)
    return declared if isinstance(declared, Reads) else None


# Metrics ------------------------------------------------------------------------------------------------------
def logit_diff(
    logits: Float[Tensor, "batch pos d_vocab"],
    correct: TokenIds,
    incorrect: TokenIds,
    *,
    position: Position = None,
    attention_mask: Tensor | None = None,
) -> Float[Tensor, " batch"]:
    """``logit[correct] - logit[incorrect]`` at each row's scored position (default: last real token)."""
    at = logits_at(logits, position, attention_mask=attention_mask)
    rows = torch.arange(at.shape[0], device=at.device)
    good = _token_ids(correct, at.shape[0], at.device, "correct")
    bad = _token_ids(incorrect, at.shape[0], at.device, "incorrect")
    return at[rows, good] - at[rows, bad]


def token_logit(
    logits: Float[Tensor, "batch pos d_vocab"],
    token: TokenIds,
    *,
    position: Position = None,
    attention_mask: Tensor | None = None,
) -> Float[Tensor, " batch"]:
    """The logit of `token` at each row's scored position (default: last real token)."""
    at = logits_at(logits, position, attention_mask=attention_mask)
    ids = _token_ids(token, at.shape[0], at.device, "target")
    return at[torch.arange(at.shape[0], device=at.device), ids]


def token_prob(
    logits: Float[Tensor, "batch pos d_vocab"],
    token: TokenIds,
    *,
    position: Position = None,
    attention_mask: Tensor | None = None,
) -> Float[Tensor, " batch"]:
    """Probability of `token` at each row's scored position (default: last real token)."""
    probs = logits_at(logits, position, attention_mask=attention_mask).float().softmax(-1)
    ids = _token_ids(token, probs.shape[0], probs.device, "target")
    return probs[torch.arange(probs.shape[0], device=probs.device), ids]


def kl_div(
    logits: Float[Tensor, "*rows d_vocab"],
    reference: Float[Tensor, "*rows d_vocab"],
    *,
    attention_mask: Tensor | None = None,
    reduction: Literal["none", "row", "mean"] = "none",
) -> Tensor:
    """``KL(reference || logits)`` of the next-token distributions, token by token.

    Both are logits of the same shape ``[..., d_vocab]`` (e.g. ``[batch, pos, d_vocab]``, or
    ``[batch, d_vocab]`` at one position); the log-softmax is taken in float32 whatever the model's
    dtype. With `attention_mask` (``[batch, pos]``, matching the trailing token axes) pad tokens count 0
    and are left out of the means. `reduction`: ``none`` (one value per token), ``row`` (mean over the
    last token axis's real tokens, e.g. per prompt ``[batch]``) or ``mean`` (mean over every real token).
    """
    for name, t in (("logits", logits), ("reference", reference)):
        if not isinstance(t, Tensor) or t.ndim < 2:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ShapeError(f"{name} must be [..., d_vocab] with at least one token axis; got {got}")
    if reference.shape != logits.shape:
        raise ShapeError(f"reference logits must match logits {tuple(logits.shape)}; got {tuple(reference.shape)}")
    if reduction not in ("none", "row", "mean"):
        raise ConfigError(f"reduction must be 'none', 'row' or 'mean'; got {reduction!r}")
    ref = reference.float().log_softmax(-1)
    new = logits.float().log_softmax(-1).to(ref.device)
    kl = (ref.exp() * (ref - new)).sum(-1).clamp_min(0.0)
    if attention_mask is None:
        weight = torch.ones_like(kl)
    else:
        n = attention_mask.ndim
        if n == 0 or n > kl.ndim or tuple(attention_mask.shape) != tuple(kl.shape[kl.ndim - n :]):
            got = tuple(attention_mask.shape)
            raise ShapeError(f"attention_mask must match the token axes {tuple(kl.shape)} at the end; got {got}")
        weight = attention_mask.to(kl.device, torch.float32).expand_as(kl)
    kl = kl * weight
    if reduction == "none":
        return kl
    if reduction == "row":
        return kl.sum(-1) / weight.sum(-1).clamp_min(1.0)
    return kl.sum() / weight.sum().clamp_min(1.0)


def kl_to_reference(
    logits: Float[Tensor, "batch pos d_vocab"],
    reference: Float[Tensor, "batch pos d_vocab"],
    *,
    position: Position = None,
    attention_mask: Tensor | None = None,
) -> Float[Tensor, " batch"]:
    """``KL(reference || logits)`` of the next-token distributions at each row's scored position."""
    _check_logits(logits)
    _check_logits(reference, "reference logits")
    if reference.shape != logits.shape:
        raise ShapeError(f"reference logits must match logits {tuple(logits.shape)}; got {tuple(reference.shape)}")
    pos = resolve_positions(logits, position, attention_mask)
    return kl_div(logits_at(logits, pos), logits_at(reference, pos))


def next_token_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    input_ids: Int[Tensor, "batch pos"],
    *,
    attention_mask: Tensor | None = None,
    reduction: Literal["none", "row", "mean"] = "mean",
) -> Tensor:
    """Cross-entropy of each next token (float32): position t's logits predict token t + 1.

    Targets that are pads (attention mask 0) -- and predictions made from a pad -- are left out.
    `reduction`: ``none`` (``[batch, pos - 1]``, 0 where left out), ``row`` (mean per prompt) or ``mean``
    (mean over every scored token)."""
    _check_logits(logits)
    if tuple(input_ids.shape) != tuple(logits.shape[:2]):
        raise ShapeError(f"input_ids must be [batch, pos]={tuple(logits.shape[:2])}; got {tuple(input_ids.shape)}")
    if reduction not in ("none", "row", "mean"):
        raise ConfigError(f"reduction must be 'none', 'row' or 'mean'; got {reduction!r}")
    logp = logits[:, :-1].float().log_softmax(-1)
    targets = input_ids[:, 1:].to(logp.device)
    loss = -logp.gather(-1, targets[..., None]).squeeze(-1)
    if attention_mask is None:
        weight = torch.ones_like(loss)
    else:
        mask = attention_mask.to(loss.device).bool()
        weight = (mask[:, 1:] & mask[:, :-1]).float()
    loss = loss * weight
    if reduction == "none":
        return loss
    if reduction == "row":
        return loss.sum(-1) / weight.sum(-1).clamp_min(1.0)
    return loss.sum() / weight.sum().clamp_min(1.0)


def perplexity(
    logits: Float[Tensor, "batch pos d_vocab"],
    input_ids: Int[Tensor, "batch pos"],
    *,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """``exp`` of the mean next-token loss over every real token (0-d, float32)."""
    return next_token_loss(logits, input_ids, attention_mask=attention_mask).exp()


def normalised(value: Tensor | float, clean: Tensor | float, corrupt: Tensor | float) -> Tensor:
    """Map `value` linearly so that `corrupt` -> 0 and `clean` -> 1."""
    value_t, clean_t, corrupt_t = (torch.as_tensor(x, dtype=torch.float32) for x in (value, clean, corrupt))
    gap = clean_t - corrupt_t
    if bool((gap == 0).any()):
        raise ConfigError(f"cannot normalise: clean and corrupt metric values are equal ({clean_t.tolist()})")
    return (value_t - corrupt_t) / gap


# Metric constructors -------------------------------------------------------------------------------------
def logit_diff_metric(correct: TokenIds, incorrect: TokenIds, *, position: Position = None) -> Metric:
    """The metric ``logits -> logit[correct] - logit[incorrect]`` per row (default: last real token);
    it declares what it reads (:class:`Reads`: that position, those two tokens' columns)."""

    def logit_diff_of(logits: Tensor) -> Tensor:
        return logit_diff(logits, correct, incorrect, position=position)

    return DeclaredMetric(logit_diff_of, Reads(position=position, tokens=_token_tuple(correct, incorrect)))


def logit_metric(target: TokenIds, baseline: TokenIds | None = None, *, position: Position = None) -> Metric:
    """The metric ``logits -> logit[target]`` (minus ``logit[baseline]``) per row (default: last real
    token); it declares what it reads."""
    if baseline is not None:
        return logit_diff_metric(target, baseline, position=position)

    def logit_of(logits: Tensor) -> Tensor:
        return token_logit(logits, target, position=position)

    return DeclaredMetric(logit_of, Reads(position=position, tokens=_token_tuple(target)))


def token_prob_metric(token: TokenIds, *, position: Position = None) -> Metric:
    """The metric ``logits -> p(token)`` per row (default: last real token); it declares that position
    (every column: the softmax reads them all)."""

    def prob_of(logits: Tensor) -> Tensor:
        return token_prob(logits, token, position=position)

    return DeclaredMetric(prob_of, Reads(position=position))


# Evaluating a metric -----------------------------------------------------------------------------------
class SiteMetric:
    """A metric of one site's activation rather than the logits: ``fn(activation) -> scalar | [batch]``,
    where `activation` is the site's tensor (``[batch, pos, ...]``, as ``run_with_cache`` gives it).

    :func:`~mechscope.locate.patching.activation_patch` takes it and runs no layer after `site`. Verbs
    that score logits refuse it (calling it on logits raises :class:`MetricError`)."""

    def __init__(self, site: SiteLike, fn: Callable[[Tensor], Tensor]) -> None:
        from mechscope.sites import Site

        parsed = Site.parse(site)
        if parsed.layer is None:
            raise ConfigError(f"a site metric reads a site inside the blocks ('blocks.<layer>.<kind>'); got {site!r}")
        if not callable(fn):
            raise ConfigError(f"a site metric's fn must be callable; got {type(fn).__name__}")
        self.site = parsed
        self.fn = fn

    def __call__(self, logits: Tensor) -> Tensor:
        raise MetricError(
            f"{self!r} reads the activation of {self.site.name}, not logits: this verb takes metrics of the "
            "logits (activation_patch takes site metrics too)"
        )

    def rows(self, activation: Tensor) -> Float[Tensor, " batch"]:
        """`fn` of `activation` as one float32 value per row (a scalar is broadcast), checked."""
        batch = activation.shape[0]
        out = self.fn(activation)
        if not isinstance(out, Tensor):
            got = type(out).__name__
            raise MetricError(f"{self!r} must return a tensor (a scalar or [batch]=({batch},)); got {got}")
        if out.ndim == 0:
            out = out.expand(batch)
        if out.shape != (batch,):
            raise MetricError(f"{self!r} must return a scalar or [batch]=({batch},); got shape {tuple(out.shape)}")
        return out.detach().float()

    def __repr__(self) -> str:
        return f"SiteMetric({self.site.name!r}, {getattr(self.fn, '__name__', self.fn)!r})"


def score_rows(metric: Metric, logits: Tensor, attention_mask: Tensor | None = None) -> Float[Tensor, " batch"]:
    """`metric(logits)` as one value per row (a scalar is broadcast), scored inside :func:`scoring`
    with `attention_mask` (None: the enclosing block's), with a clear error for a malformed metric."""
    batch = logits.shape[0]
    if attention_mask is None:
        out = metric(logits)
    else:
        with scoring(attention_mask):
            out = metric(logits)
    if not isinstance(out, Tensor):
        raise MetricError(f"metric must return a tensor (a scalar or [batch]=({batch},)); got {type(out).__name__}")
    if out.ndim == 0:
        return out.expand(batch)
    if out.shape != (batch,):
        raise MetricError(f"metric must return a scalar or [batch]=({batch},); got shape {tuple(out.shape)}")
    return out


def score(metric: Metric, logits: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """The metric's mean over the batch (0-d, float32; keeps gradients), see :func:`score_rows`."""
    return score_rows(metric, logits, attention_mask).float().mean()


__all__ = [
    "DeclaredMetric",
    "Metric",
    "MetricError",
    "Position",
    "Reads",
    "SiteMetric",
    "kl_div",
    "kl_to_reference",
    "last_positions",
    "logit_diff",
    "logit_diff_metric",
    "logit_metric",
    "logits_at",
    "metric_reads",
    "next_token_loss",
    "normalised",
    "perplexity",
    "reads",
    "resolve_positions",
    "score",
    "score_rows",
    "scoring",
    "scoring_mask",
    "token_logit",
    "token_prob",
    "token_prob_metric",
]
