"""Checks that two models can be diffed, and the texts they are compared on.

Diffing compares two models of one architecture position by position on one tokenisation, so it needs
the same family, sizes and parameter shapes, and the same vocabulary. Every check names what differs.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.steer.intervention import require_hooked

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

#: Sizes that must agree between the two models of a pair.
_DIMS = ("model_type", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_head", "d_mlp", "d_vocab", "parallel")


class ModelPairError(ConfigError):
    """Two models that cannot be compared component by component (architecture or vocabulary differ)."""


def check_pair(base: Any, tuned: Any) -> tuple[HookedModel, HookedModel]:
    """Both as :class:`HookedModel`, after checking architecture, parameter shapes and vocabulary."""
    base, tuned = require_hooked(base), require_hooked(tuned)
    a, b = base.dims, tuned.dims
    differ = [f"{k}: {getattr(a, k)!r} vs {getattr(b, k)!r}" for k in _DIMS if getattr(a, k) != getattr(b, k)]
    if differ:
        raise ModelPairError(
            "model diffing needs two models of the same architecture; base vs tuned differ in " + "; ".join(differ)
        )
    pa = {n: tuple(p.shape) for n, p in base.hf_model.named_parameters()}
    pb = {n: tuple(p.shape) for n, p in tuned.hf_model.named_parameters()}
    if pa != pb:
        only_a, only_b = sorted(set(pa) - set(pb)), sorted(set(pb) - set(pa))
        shapes = [f"{n}: {pa[n]} vs {pb[n]}" for n in sorted(set(pa) & set(pb)) if pa[n] != pb[n]]
        raise ModelPairError(
            "model diffing needs the same parameters in both models; "
            f"only in base: {only_a[:5]}, only in tuned: {only_b[:5]}, shapes differ: {shapes[:5]}"
        )
    check_vocabulary(base, tuned)
    return base, tuned


def check_vocabulary(base: HookedModel, tuned: HookedModel) -> None:
    """:class:`ModelPairError` unless both tokenizers map the same strings to the same ids."""
    if base.tokenizer is None or tuned.tokenizer is None:
        missing = [name for name, m in (("base", base), ("tuned", tuned)) if m.tokenizer is None]
        raise ModelPairError(f"model diffing reads texts and needs both tokenizers; {missing} has none")
    va, vb = base.tokenizer.get_vocab(), tuned.tokenizer.get_vocab()
    if va != vb:
        only_a = sorted(set(va) - set(vb))[:5]
        only_b = sorted(set(vb) - set(va))[:5]
        moved = sorted(t for t in set(va) & set(vb) if va[t] != vb[t])[:5]
        raise ModelPairError(
            f"the two models' vocabularies differ ({len(va)} vs {len(vb)} tokens; only in base: {only_a}, "
            f"only in tuned: {only_b}, different ids: {moved}); diffing needs one tokenisation"
        )


def check_texts(model: HookedModel, texts: Sequence[str], what: str = "texts") -> dict[str, Tensor]:
    """Right-padded tokens of `texts`, after checking each is a string of at least 2 tokens (its own)."""
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
        raise ConfigError(f"{what} must be a non-empty list of strings; got {texts!r}")
    bad = [t for t in texts if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ConfigError(f"{what} must be non-empty strings; got {bad[:3]!r}")
    own = [len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    short = [t for t, n in zip(texts, own, strict=True) if n < 2]
    if short:
        raise ConfigError(
            f"{what} are too short: each needs at least 2 tokens of its own (special tokens not counted) to "
            f"compare next-token predictions; got {short[:3]!r}"
        )
    batch = model.to_tokens(list(texts), padding_side="right")
    return {k: v.to(model.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def apply_edit(base: HookedModel, record: Any) -> HookedModel:
    """A copy of `base` with an :class:`~mechscope.steer.editing.EditRecord` applied (`base` untouched)."""
    from mechscope.model.hooked import HookedModel
    from mechscope.steer.editing.records import EditRecord

    if not isinstance(record, EditRecord):
        raise ConfigError(f"expected an EditRecord (mechscope.steer.editing); got {type(record).__name__}")
    hf = copy.deepcopy(base.hf_model)
    tuned = HookedModel(hf, base.tokenizer, attention_sites=base.attention_base is not None)
    with torch.no_grad():
        record.apply(tuned)
    return tuned


__all__ = ["ModelPairError", "apply_edit", "check_pair", "check_texts", "check_vocabulary"]
