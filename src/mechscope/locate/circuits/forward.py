"""Ablation-aware forward: run the model with any subset of graph edges kept.

Every receiver reads its own reconstruction of the residual stream::

    input_r = resid - sum_u (1 - mask[u, r]) * delta_u,     delta_u = out_u - ablated_u

where ``resid`` is the residual stream HF computes at that point (so biases and other constants stay
exactly where the model puts them) and ``out_u`` the current output of upstream node u. With every mask
entry 1 this is the model itself; with an entry 0 the receiver sees u's ablated value instead.

Each query/key/value head needs its own input, so the attention projections are recomputed per head from
the head's reconstructed residual (through the layer's own pre-norm module, where the family has one) and
written back into the projection's output in the family's layout; rotary, attention and everything after
are HF's own code. Where q/k norms span every head (OLMo 2), one head's query is its slice of the whole
normalised projection of *its own* input, so each head still depends on its input alone. MLPs read their
reconstruction through their pre-norm (or directly), the unembedding through the final norm.

Two modes: *exact* (deltas computed from the current run, for ablation) and *fixed* (a given
``[batch, pos, n_upstream, d_model]`` delta, for gradient attribution: with mask = 1 the forward is
unchanged and ``d metric / d mask[u, r] = delta_u . grad input_r``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechscope.errors import ShapeError
from mechscope.locate.circuits.graph import Graph, ReceiverGroup
from mechscope.model.decompose import head_terms

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel


@dataclass
class _State:
    mask: Tensor  # [n_up, n_recv]
    ablated: Tensor | None  # [batch or 1, pos, n_up, d_model] (exact mode)
    fixed: Tensor | None  # [batch, pos, n_up, d_model] (fixed mode)
    input_override: Tensor | None
    capture: bool
    deltas: list[Tensor] = field(default_factory=list)  # exact mode: [batch, pos, k, d_model] chunks
    outputs: list[Tensor] = field(default_factory=list)  # capture: current node outputs
    resid_pre: dict[int, Tensor] = field(default_factory=dict)
    kv: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    normed_qk: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # head-spanning q/k norms' outputs


def _needs(state: _State, group: ReceiverGroup) -> bool:
    block = state.mask[: group.n_upstream, group.receivers]
    return bool(block.requires_grad) or bool((block != 1).any())


def _reconstruct(state: _State, resid: Tensor, group: ReceiverGroup) -> Float[Tensor, "batch pos n_recv d_model"]:
    n = group.n_upstream
    removed = (1 - state.mask[:n, group.receivers]).to(resid.dtype)
    delta = state.fixed[:, :, :n] if state.fixed is not None else torch.cat(state.deltas, dim=2)[:, :, :n]
    return resid.unsqueeze(2) - torch.einsum("bpud,ur->bprd", delta, removed)


def _add_output(state: _State, index: int, out: Tensor) -> None:
    """Record upstream node outputs `out` [batch, pos, k, d_model] starting at upstream `index`."""
    if state.capture:
        state.outputs.append(out.detach())
    if state.fixed is None and state.ablated is not None:
        ablated = state.ablated[:, :, index : index + out.shape[2]].to(out.dtype)
        state.deltas.append(out - ablated)


class _Weights:
    """Per-layer q/k/v weights (detached views) in mechscope's per-head convention."""

    def __init__(self, model: HookedModel, layer: int) -> None:
        self.W_Q, self.W_K, self.W_V, self.b_Q, self.b_K, self.b_V = model.weights.qkv(layer)


def _qkv(normed: Tensor, w: _Weights, n_heads: int, n_kv: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each receiving head's q, k or v from its own (pre-normed) input ``[batch, pos, n_recv, d_model]``."""
    dt = normed.dtype
    q = torch.einsum("bphd,hde->bphe", normed[:, :, :n_heads], w.W_Q.to(dt)) + w.b_Q.to(dt)
    k = torch.einsum("bphd,hde->bphe", normed[:, :, n_heads : n_heads + n_kv], w.W_K.to(dt)) + w.b_K.to(dt)
    v = torch.einsum("bphd,hde->bphe", normed[:, :, n_heads + n_kv :], w.W_V.to(dt)) + w.b_V.to(dt)
    return q, k, v


def _own_normed(
    norm: nn.Module, x: Float[Tensor, "batch pos n d_model"], weight: Tensor, bias: Tensor
) -> Float[Tensor, "batch pos n d_head"]:
    """Head i's slice of ``norm`` applied to the projection of every head from head i's own input ``x[:, :, i]``
    (a q/k norm spanning all heads, as OLMo 2's): [batch, pos, n, d_head]."""
    full = torch.einsum("bpid,hde->bpihe", x, weight.to(x.dtype)) + bias.to(x.dtype)  # [b, p, n, n, d_head]
    normed = norm(full.flatten(-2)).view_as(full)
    own = torch.arange(x.shape[2], device=x.device)
    return normed[:, :, own, own]


@contextmanager
def _installed(model: HookedModel, graph: Graph, state: _State) -> Iterator[None]:
    a, d = model.adapter, model.dims
    handles: list[Any] = []
    weights = {layer: _Weights(model, layer) for layer in range(d.n_layers)}
    flat = lambda t: t.reshape(*t.shape[:2], -1)  # noqa: E731

    def layer_pre(layer: int) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            x = args[0] if args else kwargs["hidden_states"]
            if layer == 0:
                if state.input_override is not None:
                    x = state.input_override.to(x.dtype)
                    args, kwargs = ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
                _add_output(state, 0, x.unsqueeze(2))
            state.resid_pre[layer] = x
            return (args, kwargs) if layer == 0 and state.input_override is not None else None

        return hook

    def qkv_hook(layer: int, part: str) -> Any:
        group = graph.attn_group(layer)
        norm = model.layer_module(layer, a.ln1) if a.ln1 is not None else nn.Identity()

        def hook(_m: nn.Module, _args: Any, output: Tensor) -> Any:
            if part in ("k", "v"):
                if layer not in state.kv:
                    return None
                k, v = state.kv[layer]
                return flat(k if part == "k" else v)
            if not _needs(state, group):
                return None
            normed = norm(_reconstruct(state, state.resid_pre[layer], group))
            w = weights[layer]
            q, k, v = _qkv(normed, w, d.n_heads, d.n_kv_heads)
            if a.qk_norms is not None:  # each head through the q/k norm of its own input's projection
                q_norm, k_norm = (model.layer_module(layer, path) for path in a.qk_norms)
                state.normed_qk[layer] = (
                    _own_normed(q_norm, normed[:, :, : d.n_heads], w.W_Q, w.b_Q),
                    _own_normed(k_norm, normed[:, :, d.n_heads : d.n_heads + d.n_kv_heads], w.W_K, w.b_K),
                )
            if not a.qkv.fused:  # k and v come out of their own projections' hooks
                state.kv[layer] = (k, v)
            return a.qkv.fuse(q, k, v)

        return hook

    def qk_norm_hook(layer: int, index: int) -> Any:
        def hook(_m: nn.Module, _args: Any, output: Tensor) -> Any:
            return flat(state.normed_qk[layer][index]) if layer in state.normed_qk else None

        return hook

    def heads_hook(layer: int) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            z = args[0]  # [batch, pos, n_heads * d_head]; split here (n_heads * d_head may equal d_head)
            z = z.reshape(*z.shape[:-1], d.n_heads, d.d_head)
            _add_output(state, graph.head_slice(layer).start, head_terms(model, layer, z)[0])

        return hook

    def mlp_in_hook(layer: int) -> Any:
        group = graph.mlp_group(layer)

        def hook(_m: nn.Module, args: tuple[Any, ...]) -> Any:
            if not _needs(state, group):
                return None
            return (_reconstruct(state, args[0], group)[:, :, 0], *args[1:])

        return hook

    def mlp_out_hook(layer: int) -> Any:
        def hook(_m: nn.Module, _args: Any, output: Any) -> None:
            out = output if isinstance(output, Tensor) else output[0]
            _add_output(state, graph.mlp_index(layer), out.unsqueeze(2))

        return hook

    def final_hook(_m: nn.Module, args: tuple[Any, ...]) -> Any:
        group = graph.logits_group()
        if not _needs(state, group):
            return None
        return (_reconstruct(state, args[0], group)[:, :, 0], *args[1:])

    track = state.capture or state.fixed is None
    try:
        for layer in range(d.n_layers):
            handles.append(model.layer(layer).register_forward_pre_hook(layer_pre(layer), with_kwargs=True))
            parts = [("q", a.q_proj)] + ([] if a.qkv.fused else [("k", a.k_proj), ("v", a.v_proj)])
            for part, path in parts:
                assert path is not None
                handles.append(model.layer_module(layer, path).register_forward_hook(qkv_hook(layer, part)))
            if track:
                handles.append(model.layer_module(layer, a.o_proj).register_forward_pre_hook(heads_hook(layer)))
                handles.append(model.layer_module(layer, a.mlp_out_module).register_forward_hook(mlp_out_hook(layer)))
            if a.qk_norms is not None:
                for index, path in enumerate(a.qk_norms):
                    handles.append(model.layer_module(layer, path).register_forward_hook(qk_norm_hook(layer, index)))
            mlp_reads = a.ln2 if a.ln2 is not None else a.mlp  # its pre-norm, or the MLP itself
            handles.append(model.layer_module(layer, mlp_reads).register_forward_pre_hook(mlp_in_hook(layer)))
        handles.append(model.module(a.final_norm).register_forward_pre_hook(final_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_mask(graph: Graph, mask: Tensor) -> Tensor:
    if mask.shape == (graph.n_edges,):
        return graph.dense(mask.float() if mask.dtype == torch.bool else mask)
    if mask.shape == graph.valid.shape:
        return mask.float() if mask.dtype == torch.bool else mask
    raise ShapeError(
        f"edge mask must be [n_edges]=({graph.n_edges},) or [n_upstream, n_receivers]={tuple(graph.valid.shape)}; "
        f"got {tuple(mask.shape)}"
    )


def graph_forward(
    model: HookedModel,
    graph: Graph,
    tokens: dict[str, Tensor],
    mask: Tensor,
    *,
    ablated: Tensor | None = None,
    fixed_delta: Tensor | None = None,
    input_override: Tensor | None = None,
) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits of `model` on `tokens` with the edges where `mask` is 0 (or fractional) ablated.

    Args:
        mask: ``[n_edges]`` or ``[n_upstream, n_receivers]``, 1 keeps an edge (bool or float; may
            require grad).
        ablated: ``[batch or 1, pos, n_upstream, d_model]`` value each upstream node takes on a removed
            edge (exact mode; zeros when neither this nor `fixed_delta` is given).
        fixed_delta: ``[batch, pos, n_upstream, d_model]``: a constant delta instead (attribution mode).
        input_override: replaces the input of layer 0 (the ``input`` node's output).
    """
    graph.check_model(model)
    dense = _check_mask(graph, mask).to(model.device)
    batch, n_pos = tokens["input_ids"].shape
    expect = (len(graph.upstream), model.dims.d_model)
    for what, value in (("ablated", ablated), ("fixed_delta", fixed_delta)):
        if value is not None and (value.ndim != 4 or tuple(value.shape[1:]) != (n_pos, *expect)):
            raise ShapeError(
                f"{what} values must be [batch, pos, n_upstream, d_model]=({batch}, {n_pos}, {expect[0]}, "
                f"{expect[1]}); got {tuple(value.shape)}"
            )
    if ablated is None and fixed_delta is None:
        ablated = torch.zeros(1, n_pos, *expect, dtype=model.dtype, device=model.device)
    state = _State(dense, ablated, fixed_delta, input_override, capture=False)
    with _installed(model, graph, state):
        logits: Tensor = model.forward(tokens)
    return logits


def node_outputs(
    model: HookedModel, graph: Graph, tokens: dict[str, Tensor]
) -> tuple[Float[Tensor, "batch pos d_vocab"], Float[Tensor, "batch pos n_upstream d_model"]]:
    """The plain forward's logits and every upstream node's output (detached)."""
    graph.check_model(model)
    state = _State(torch.ones(graph.valid.shape), None, None, None, capture=True)
    with torch.no_grad(), _installed(model, graph, state):
        logits: Tensor = model.forward(tokens)
    return logits, torch.cat(state.outputs, dim=2)


__all__ = ["graph_forward", "node_outputs"]
