"""Targeted fine-tuning: train only chosen components (heads, MLPs, layers); everything else stays bit-exact.

A baseline to compare steering and editing against: the same located components, changed by gradient
descent on a task instead of by a closed-form edit. Components are named on the canonical grid:

- ``blocks.{L}``: every parameter of decoder layer L;
- ``blocks.{L}.mlp`` / ``blocks.{L}.attn``: that layer's MLP or attention module;
- ``blocks.{L}.attn.head.{h}``: head h's query rows and output columns (and its key/value rows when the
  model has one key/value head per query head; shared grouped-query key/value heads stay frozen).

Frozen entries of partially trained tensors are copied back after every step, so they are exactly
unchanged; the returned :class:`~mechscope.steer.editing.records.EditRecord` reverts the whole change.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.model.tokens import encode
from mechscope.steer.editing.records import EditRecord, equal_to_snapshot, snapshot

_COMPONENT = re.compile(r"^blocks\.(\d+)(?:\.(mlp|attn)(?:\.head\.(\d+))?)?$")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Options of :func:`finetune`: which components, and the AdamW schedule on (prompt, completion) pairs."""

    components: tuple[str, ...]
    steps: int = 50
    lr: float = 1e-3
    batch_size: int = 16
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "components", tuple(self.components))
        if not self.components:
            raise ConfigError("FinetuneConfig.components must name at least one component, e.g. 'blocks.1.mlp'")
        for c in self.components:
            if not _COMPONENT.match(c):
                raise ConfigError(
                    f"unknown component {c!r}; expected 'blocks.L', 'blocks.L.mlp', 'blocks.L.attn' or "
                    "'blocks.L.attn.head.H'"
                )
        for name in ("steps", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"FinetuneConfig.{name} must be a positive integer; got {getattr(self, name)!r}")
        if not 0 < self.lr < float("inf") or not 0 <= self.weight_decay < float("inf"):
            raise ConfigError(
                f"FinetuneConfig needs a finite lr > 0 and weight_decay >= 0; got {self.lr}, {self.weight_decay}"
            )


def _head_slices(model: Any, layer: int, head: int) -> dict[str, tuple[str, list[range]]]:
    """Parameter name -> (axis in the [in, out] view, index ranges) that belong to one head."""
    a, d = model.adapter, model.dims
    if not 0 <= head < d.n_heads:
        raise ConfigError(f"head {head} does not exist; layer {layer} has heads 0..{d.n_heads - 1}")
    dh, nq, nkv = d.d_head, d.n_heads, d.n_kv_heads
    prefix = f"{a.layers}.{layer}."
    own_kv = nkv == nq
    out: dict[str, tuple[str, list[range]]] = {}
    q = range(head * dh, (head + 1) * dh)
    layout = a.qkv
    # the query projection (the fused one when fused) and, without GQA sharing, the head's own key and value
    out[prefix + a.q_proj] = ("out", layout.head_outputs(head, model.layout.heads, with_kv=own_kv))
    if not layout.fused and own_kv:
        assert a.k_proj is not None and a.v_proj is not None
        out[prefix + a.k_proj] = ("out", [q])
        out[prefix + a.v_proj] = ("out", [q])
    out[prefix + a.o_proj] = ("in", [q])
    return out


def trainable_masks(model: Any, components: Sequence[str]) -> dict[str, Tensor]:
    """Parameter name -> boolean mask of its trainable entries (only parameters with at least one)."""
    params = dict(model.hf_model.named_parameters())
    a = model.adapter
    masks: dict[str, Tensor] = {}

    def whole(prefix: str) -> None:
        hits = [n for n in params if n.startswith(prefix)]
        if not hits:
            raise ConfigError(f"no parameters under {prefix!r}")
        for n in hits:
            masks[n] = torch.ones_like(params[n], dtype=torch.bool)

    for comp in components:
        m = _COMPONENT.match(comp)
        if m is None:
            raise ConfigError(f"unknown component {comp!r}")
        layer = int(m.group(1))
        if not 0 <= layer < model.dims.n_layers:
            raise ConfigError(f"{comp!r}: layer {layer} does not exist; layers are 0..{model.dims.n_layers - 1}")
        prefix = f"{a.layers}.{layer}."
        if m.group(2) is None:
            whole(prefix)
        elif m.group(3) is None:
            whole(prefix + (a.mlp if m.group(2) == "mlp" else a.attn) + ".")
        else:
            for module, (axis, ranges) in _head_slices(model, layer, int(m.group(3))).items():
                for kind in ("weight", "bias"):
                    name = f"{module}.{kind}"
                    if name not in params:
                        continue
                    p = params[name]
                    mask = masks.get(name, torch.zeros_like(p, dtype=torch.bool))
                    idx = torch.tensor([i for r in ranges for i in r], device=p.device)
                    if kind == "bias":
                        if axis == "out":
                            mask[idx] = True
                    else:
                        mask.index_fill_(a.orientation.axis(axis), idx, True)
                    if bool(mask.any()):
                        masks[name] = mask
    return masks


def _batches(model: Any, examples: Sequence[tuple[str, str]], batch_size: int, seed: int) -> list[dict[str, Tensor]]:
    tk = model.tokenizer
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=gen).tolist()
    out = []
    pad = tk.pad_token_id if tk.pad_token_id is not None else (tk.eos_token_id or 0)
    for start in range(0, len(order), batch_size):
        rows, labels = [], []
        for i in order[start : start + batch_size]:
            prompt, completion = examples[i]
            p = encode(tk, prompt)  # as text: BOS first where the tokenizer adds one (and not twice)
            c = list(tk(completion, add_special_tokens=False)["input_ids"])
            if not c:
                raise ConfigError(f"completion {completion!r} of prompt {prompt!r} tokenises to nothing")
            rows.append(p + c)
            labels.append([-100] * len(p) + c)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
        lab = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, (r, lb) in enumerate(zip(rows, labels, strict=True)):
            ids[j, : len(r)] = torch.tensor(r)
            lab[j, : len(lb)] = torch.tensor(lb)
            mask[j, : len(r)] = 1
        out.append(
            {"input_ids": ids.to(model.device), "attention_mask": mask.to(model.device), "labels": lab.to(model.device)}
        )
    return out


def finetune(model: Any, examples: Sequence[tuple[str, str]], config: FinetuneConfig) -> EditRecord:
    """Train only ``config.components`` on ``(prompt, completion)`` pairs (loss on completion tokens).

    Returns an :class:`EditRecord` of the trained parameters (``info["losses"]`` per step). After
    training, every other parameter and every frozen entry is checked to be bit-for-bit unchanged.
    """
    if not examples:
        raise ConfigError("finetune needs at least one (prompt, completion) example")
    if model.tokenizer is None:
        raise ConfigError("finetune needs the model's tokenizer")
    masks = trainable_masks(model, config.components)
    params = dict(model.hf_model.named_parameters())
    before_all = snapshot(model)
    record = EditRecord.capture(model, sorted(masks), "finetune", fingerprint=model.fingerprint())
    batches = _batches(model, examples, config.batch_size, config.seed)
    trained = [params[n] for n in sorted(masks)]
    saved_flags = {n: p.requires_grad for n, p in params.items()}
    optimiser = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
    losses: list[float] = []
    was_training = model.hf_model.training
    try:
        for p in params.values():
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
        model.hf_model.train()
        for step in range(config.steps):
            batch = batches[step % len(batches)]
            with torch.enable_grad():
                logits = model.forward({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
                shift = logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(
                    shift.reshape(-1, shift.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
                )
                optimiser.zero_grad()
                loss.backward()
            optimiser.step()
            with torch.no_grad():
                for n, mask in masks.items():
                    if not bool(mask.all()):
                        params[n].copy_(torch.where(mask, params[n], before_all[n]))
            losses.append(float(loss.detach()))
    except BaseException:
        record.revert(model, check=False)
        raise
    finally:
        for n, p in params.items():
            p.requires_grad_(saved_flags[n])
            p.grad = None
        model.hf_model.train(was_training)
    record.finish(model)
    moved = [n for n in equal_to_snapshot(model, before_all) if n not in masks]
    frozen_moved = [n for n, mask in masks.items() if not torch.equal(params[n].detach()[~mask], before_all[n][~mask])]
    if moved or frozen_moved:
        record.revert(model, check=False)
        raise ConfigError(f"frozen parameters changed during fine-tuning: {moved + frozen_moved}")
    record.info = {
        "config": asdict(config),
        "losses": losses,
        "trainable_entries": int(sum(int(m.sum()) for m in masks.values())),
    }
    return record


__all__ = ["FinetuneConfig", "finetune", "trainable_masks"]
