"""Shared machinery of ROME and MEMIT: context prompts, keys at the subject, and target-value optimisation.

Both methods (1) read the key ``k`` (input of an MLP output projection) at the subject's last token,
averaged over a few context prefixes so the edit does not depend on the exact preceding text, and
(2) find by gradient descent a vector ``delta`` that, added at the subject's last token of some site,
makes the model predict the target -- regularised by a KL term that keeps the subject's other
predictions and by a norm penalty.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.model.tokens import pad_rows, special_prefix
from mechscope.steer.editing.requests import EditError, EditRequest, subject_last_position, target_ids


def context_prefixes(model: Any, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """The empty prefix plus `n` prefixes of `length` tokens from the model's default text (the organisms'
    text on the organisms, English on any other model), each ending in EOS.

    Averaging keys over several contexts makes an edit hold whatever precedes the subject.
    """
    from mechscope.data.corpus import default_stream
    from mechscope.steer.editing.stats import default_stream_texts

    prefixes: list[list[int]] = [[]]
    eos = model.tokenizer.eos_token_id
    for text in default_stream_texts(model, default_stream(model), seed + 7919):
        if len(prefixes) > n:
            break
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"][:length]
        if len(ids) == length:
            prefixes.append([*ids, *([int(eos)] if eos is not None else [])])
    return prefixes


@dataclass
class Rows:
    """A right-padded batch of token rows with, per row, its request, subject position and target slots."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    request: Int[Tensor, " batch"]
    subject: Int[Tensor, " batch"]
    last: Int[Tensor, " batch"]  # position predicting the first target token (end of the prompt)
    targets: list[list[int]]  # target ids per row ([] for rows with no target loss)

    @property
    def inputs(self) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def build_rows(
    model: Any,
    requests: Sequence[EditRequest],
    prefixes: Sequence[Sequence[int]],
    *,
    with_target: bool,
    texts: Callable[[EditRequest], Sequence[str]] | None = None,
) -> Rows:
    """Rows ``start + prefix + text (+ target[:-1])`` for every request x text x prefix, where ``start`` is what
    the tokenizer puts before any text (its BOS for Gemma and Llama tokenizers, else nothing).

    `texts` gives the prompts of a request (default: its own prompt); the subject is located in each.
    """
    tk = model.tokenizer
    start = special_prefix(tk)  # the tokenizer's BOS where it adds one: each row is read as text is
    ids_rows: list[list[int]] = []
    req_idx: list[int] = []
    subj: list[int] = []
    last: list[int] = []
    tgts: list[list[int]] = []
    for r, req in enumerate(requests):
        tgt = target_ids(tk, req.target)
        for text in texts(req) if texts is not None else [req.text]:
            prompt = list(tk(text, add_special_tokens=False)["input_ids"])
            pos = subject_last_position(tk, text, req.subject, from_end=True)
            for prefix in prefixes:
                row = [*start, *prefix, *prompt, *(tgt[:-1] if with_target else [])]
                ids_rows.append(row)
                req_idx.append(r)
                subj.append(len(start) + len(prefix) + pos)
                last.append(len(start) + len(prefix) + len(prompt) - 1)
                tgts.append(tgt if with_target else [])
    pad = tk.pad_token_id if tk.pad_token_id is not None else (tk.eos_token_id or 0)
    batch = pad_rows(ids_rows, int(pad))
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    device = model.device
    return Rows(
        input_ids.to(device),
        mask.to(device),
        torch.tensor(req_idx, device=device),
        torch.tensor(subj, device=device),
        torch.tensor(last, device=device),
        tgts,
    )


def subject_keys(model: Any, layer: int, rows: Rows, n_requests: int) -> Float[Tensor, "n_requests d_mlp"]:
    """Mean MLP key (``blocks.{layer}.mlp.hook_post``) at the subject's last token, per request."""
    site = f"blocks.{layer}.mlp.hook_post"
    _, cache = model.run_with_cache(rows.inputs, [site], stop_at_layer=_stop(model, layer))
    acts = cache[site][torch.arange(len(rows.subject)), rows.subject].to(torch.float64)
    out = torch.zeros(n_requests, acts.shape[-1], dtype=torch.float64, device=acts.device)
    out.index_add_(0, rows.request, acts)
    counts = torch.bincount(rows.request, minlength=n_requests).clamp(min=1)
    return out / counts[:, None]


def resid_at_subject(model: Any, layer: int, rows: Rows, n_requests: int) -> Float[Tensor, "n_requests d_model"]:
    """Mean ``blocks.{layer}.hook_resid_post`` at the subject's last token, per request."""
    site = f"blocks.{layer}.hook_resid_post"
    _, cache = model.run_with_cache(rows.inputs, [site], stop_at_layer=_stop(model, layer))
    acts = cache[site][torch.arange(len(rows.subject)), rows.subject].to(torch.float64)
    out = torch.zeros(n_requests, acts.shape[-1], dtype=torch.float64, device=acts.device)
    out.index_add_(0, rows.request, acts)
    counts = torch.bincount(rows.request, minlength=n_requests).clamp(min=1)
    return out / counts[:, None]


def _stop(model: Any, layer: int) -> int | None:
    return layer + 1 if layer + 1 < model.dims.n_layers else None


def add_at_subject(act: Tensor, rows: Rows, delta: Tensor) -> Tensor:
    """`act` [batch, pos, d] with ``delta[request]`` added at each row's subject position."""
    add = torch.zeros_like(act)
    add = add.index_put(
        (torch.arange(act.shape[0], device=act.device), rows.subject), delta[rows.request].to(act.dtype)
    )
    return act + add


@dataclass(frozen=True)
class OptimiseOptions:
    steps: int
    lr: float
    kl_factor: float
    weight_decay: float
    clamp_norm_factor: float
    stop_prob: float


def optimise_delta(
    model: Any,
    n_requests: int,
    d: int,
    rows: Rows,
    kl_rows: Rows | None,
    install: Callable[[Callable[[Tensor, Rows], Tensor]], AbstractContextManager[Any]],
    base_norm: Float[Tensor, " n_requests"],
    opts: OptimiseOptions,
) -> tuple[Float[Tensor, "n_requests d"], list[float]]:
    """Find per-request vectors that, added at the subject by `install`, make the targets likely.

    ``install(fn)`` must return a context manager under which the site's activation ``a`` of a batch
    with rows ``r`` is replaced by ``fn(a, r)``. The loss is the mean target NLL over rows, plus
    ``kl_factor`` x KL(original || edited) of the next-token distribution after the KL prompts, plus
    ``weight_decay`` x ||delta||^2 / ||base||^2; each delta's norm is clamped to
    ``clamp_norm_factor`` x its base activation's norm.
    """
    device = model.device
    delta = torch.zeros(n_requests, d, device=device, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=opts.lr)
    tgt_pos, tgt_ids, tgt_row = [], [], []
    for i, tgt in enumerate(rows.targets):
        for j, t in enumerate(tgt):
            tgt_row.append(i)
            tgt_pos.append(int(rows.last[i]) + j)
            tgt_ids.append(t)
    row_t = torch.tensor(tgt_row, device=device)
    pos_t = torch.tensor(tgt_pos, device=device)
    ids_t = torch.tensor(tgt_ids, device=device)
    ref_logp: Tensor | None = None
    if kl_rows is not None and opts.kl_factor > 0:
        with torch.no_grad():
            logits = model.forward(kl_rows.inputs)
            ref_logp = torch.log_softmax(logits[torch.arange(len(kl_rows.last)), kl_rows.last].float(), -1)
    losses: list[float] = []
    max_norm = (opts.clamp_norm_factor * base_norm).to(device).float()
    current: dict[str, Rows] = {}

    def fn(act: Tensor, _r: Rows) -> Tensor:
        return add_at_subject(act, current["rows"], delta)

    for _ in range(opts.steps):
        with torch.enable_grad():
            current["rows"] = rows
            with install(fn):
                logits = model.forward(rows.inputs)
            logp = torch.log_softmax(logits[row_t, pos_t].float(), -1)
            token_logp = logp[torch.arange(len(ids_t), device=device), ids_t]
            nll = -token_logp.mean()
            loss = nll
            if ref_logp is not None and kl_rows is not None:
                current["rows"] = kl_rows
                with install(fn):
                    kl_logits = model.forward(kl_rows.inputs)
                new_logp = torch.log_softmax(kl_logits[torch.arange(len(kl_rows.last)), kl_rows.last].float(), -1)
                kl = torch.nn.functional.kl_div(new_logp, ref_logp, log_target=True, reduction="batchmean")
                loss = loss + opts.kl_factor * kl
            decay = (delta.norm(dim=-1) ** 2 / base_norm.to(device).float().clamp(min=1e-8) ** 2).mean()
            loss = loss + opts.weight_decay * decay
            if not math.isfinite(float(loss.detach())):
                raise EditError("the edit's optimisation diverged (loss is NaN/inf); lower the learning rate")
            (grad,) = torch.autograd.grad(loss, [delta])
        losses.append(float(nll.detach()))
        # Stop once every target token is likely enough (ROME's early stop), before stepping.
        if float(token_logp.detach().exp().min()) >= opts.stop_prob:
            break
        optimiser.zero_grad()
        delta.grad = grad
        optimiser.step()
        with torch.no_grad():
            norms = delta.norm(dim=-1)
            scale = torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-12), torch.ones_like(norms))
            delta.mul_(scale[:, None])
    return delta.detach(), losses


@torch.no_grad()
def targets_on_top(model: Any, rows: Rows) -> bool:
    """Whether every row's first target token is the model's top prediction at the end of its prompt."""
    logits = model.forward(rows.inputs)
    top = logits[torch.arange(len(rows.last)), rows.last].argmax(-1).tolist()
    return all(t == tgt[0] for t, tgt in zip(top, rows.targets, strict=True))
