"""Training the top-k family without dense gradients.

A top-k SAE passes gradient to ``k`` of ``d_sae`` pre-activations per token. Plain autograd still forms
the dense ``[tokens, d_sae]`` gradient of the pre-activations (top-k's backward scatters into zeros) and
then two dense products with it: ``dW_enc = xc^T dpre`` and the input gradient ``dpre W_enc^T`` (needed
only for ``b_dec``, an SAE's input being centred by it) -- each as costly as the encoder's forward.

Here :func:`select` reads the chosen pre-activations and hands back their gradient as a sparse
``[tokens, d_sae]`` tensor (only the selected entries), and :class:`Encode` -- the encoder's affine map --
takes it: ``dW_enc^T = dpre^T xc`` as a sparse-dense product over the selected (token, feature) pairs,
``db_enc`` as an index-add, ``db_dec = -W_enc db_enc`` (the sum over tokens of the input gradient), and
the ``[tokens, d_in]`` input gradient only when the input itself needs one. A dense gradient (ReLU,
JumpReLU, anything that reads ``pre`` as a whole) takes the dense products, as autograd would. Equal to
plain autograd up to floating-point reassociation (``tests/features/test_fast_path.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor


class Encode(torch.autograd.Function):
    """``pre = (x - b_dec) @ W_enc + b_enc`` (``b_dec`` None: no centring) with a backward that takes a
    sparse gradient from :func:`select` (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None) -> Tensor:
        xc = x - b_dec if b_dec is not None else x
        ctx.save_for_backward(xc, w_enc)
        return torch.addmm(b_enc, xc, w_enc)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        xc, w_enc = ctx.saved_tensors
        need_x, need_w, need_b_enc, need_b_dec = ctx.needs_input_grad
        grad_x = grad_w = None
        if grad.is_sparse:
            grad = grad.coalesce()
            rows, cols = grad.indices()
            values = grad.values()
            grad_b_enc = values.new_zeros(w_enc.shape[1]).index_add_(0, cols, values)
            if need_w:
                grad_w = _sparse_t_mm(rows, cols, values, xc, w_enc.shape[1]).t()
            if need_x:
                grad_x = torch.sparse.mm(grad, w_enc.t())
        else:
            grad_b_enc = grad.sum(0)
            grad_w = xc.t() @ grad if need_w else None
            grad_x = grad @ w_enc.t() if need_x else None
        grad_b_dec = None
        if need_b_dec:
            grad_b_dec = -(grad_x.sum(0) if grad_x is not None else w_enc @ grad_b_enc)
        return grad_x, grad_w, grad_b_enc if need_b_enc else None, grad_b_dec


def _sparse_t_mm(rows: Tensor, cols: Tensor, values: Tensor, xc: Tensor, d_sae: int) -> Tensor:
    """``G^T @ xc`` ``[d_sae, d_in]`` for the sparse ``G [tokens, d_sae]`` given as (rows, cols, values):
    ``G^T`` in compressed sparse rows (entries sorted by feature), multiplied by the dense ``xc``."""
    order = torch.argsort(cols, stable=True)
    crow = torch.zeros(d_sae + 1, dtype=torch.int64, device=cols.device)
    crow[1:] = torch.bincount(cols, minlength=d_sae).cumsum(0)
    with _quiet_sparse_construction():
        g_t = torch.sparse_csr_tensor(crow, rows[order], values[order], (d_sae, xc.shape[0]), check_invariants=False)
        return torch.mm(g_t, xc)


@contextmanager
def _quiet_sparse_construction() -> Iterator[None]:
    """Silence torch's notices on building the sparse gradients here, whose invariants hold by construction:
    "Sparse CSR tensor support is in beta state", and (torch 2.11) "Sparse invariant checks are implicitly
    disabled", raised even when ``check_invariants=False`` opts out explicitly. Checking would validate
    every index (a device sync on CUDA) on every backward."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support", category=UserWarning)
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly", category=UserWarning)
        yield


class _Select(torch.autograd.Function):
    """``pre[rows, cols]`` whose gradient goes back as a sparse ``[tokens, d_sae]`` tensor."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        ctx.save_for_backward(rows, cols)
        ctx.shape = pre.shape
        return pre[rows, cols]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        rows, cols = ctx.saved_tensors
        with _quiet_sparse_construction():
            coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), grad, ctx.shape, check_invariants=False)
        return coo, None, None


def select(pre: Float[Tensor, "tokens d_sae"], rows: Tensor, cols: Tensor) -> Float[Tensor, " n"]:
    """``pre[rows, cols]``; when `pre` comes from :class:`Encode`, its gradient flows back sparse."""
    if isinstance(pre.grad_fn, Encode._backward_cls):  # type: ignore[attr-defined]
        return _Select.apply(pre, rows, cols)  # type: ignore[no-any-return]
    return pre[rows, cols]


def select_rows(pre: Float[Tensor, "... d_sae"], indices: Tensor) -> Float[Tensor, "... k"]:
    """``pre.gather(-1, indices)``; through :func:`select` (sparse gradient) when `pre` is a
    ``[tokens, d_sae]`` output of :class:`Encode`."""
    if pre.ndim != 2 or not isinstance(pre.grad_fn, Encode._backward_cls):  # type: ignore[attr-defined]
        return pre.gather(-1, indices)
    tokens, k = indices.shape
    rows = torch.arange(tokens, device=indices.device).repeat_interleave(k)
    return select(pre, rows, indices.reshape(-1)).view(tokens, k)


__all__ = ["Encode", "select", "select_rows"]
