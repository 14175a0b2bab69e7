"""Architecture adapters: one data-only table per model family.

An adapter says where each canonical site lives in a Hugging Face model (module paths, relative to
the model or to one decoder layer), how fused projections are laid out, and which norms the family
uses. Nothing here runs a forward pass: mechscope hooks HF's own modules, so numerics are HF's.
See ``docs/adapters.md`` for how to add a family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mechscope.errors import AdapterError
from mechscope.model.layouts import (
    MLPLayout,
    Orientation,
    QKVLayout,
    mlp_layout,
    mlp_layout_names,
    qkv_layout,
    qkv_layout_names,
)

#: Layouts of the query/key/value projection(s); each names a :class:`~mechscope.model.layouts.QKVLayout`.
QKV_LAYOUTS = qkv_layout_names()
#: Layouts of the MLP input projection(s); each names a :class:`~mechscope.model.layouts.MLPLayout`.
MLP_LAYOUTS = mlp_layout_names()


@dataclass(frozen=True)
class NormSpec:
    """How a family's norms compute, so decompositions can freeze their scale and stay linear."""

    kind: str  # "layernorm" or "rmsnorm"
    weight_offset: float = 0.0  # Gemma multiplies by (1 + weight)


@dataclass(frozen=True)
class Adapter:
    """Where the canonical sites of one architecture family live. Paths are dotted module names."""

    family: str
    model_types: tuple[str, ...]
    # Model-level modules.
    embed: str
    layers: str
    final_norm: str
    unembed: str
    pos_embed: str | None = None
    # Layer-level modules (relative to one decoder layer).
    attn: str = "self_attn"
    q_proj: str = "self_attn.q_proj"  # or the fused qkv module, per qkv_layout
    k_proj: str | None = "self_attn.k_proj"
    v_proj: str | None = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    qkv_layout: str = "separate"
    ln1: str | None = "input_layernorm"
    ln2: str | None = "post_attention_layernorm"
    post_attn_norm: str | None = None  # a norm applied to the attention output before the residual add
    # q and k norms over every head's projection at once, before heads are split (OLMo 2; Qwen 3's are per
    # head and need nothing): circuit graphs rebuild one head's query/key through them on its own input
    qk_norms: tuple[str, str] | None = None
    post_mlp_norm: str | None = None
    mlp: str = "mlp"
    mlp_in: str = "mlp.gate_proj"  # whose output is mlp.hook_pre (the gate for gated MLPs)
    mlp_up: str | None = "mlp.up_proj"  # whose output is mlp.hook_pre_linear (gated MLPs)
    mlp_down: str = "mlp.down_proj"  # whose input is mlp.hook_post
    mlp_layout: str = "gated"
    norm: NormSpec = field(default_factory=lambda: NormSpec("rmsnorm"))
    conv1d: bool = False  # GPT-2 stores linear weights as [in, out] (transformers' Conv1D)
    parallel_attr: str | None = None  # config attribute that switches attention and MLP to parallel

    def __post_init__(self) -> None:
        qkv_layout(self.qkv_layout)  # raise early, naming the valid layouts
        mlp_layout(self.mlp_layout)

    # Layout objects (behaviour; the fields above stay plain data) ------------------------------------
    @property
    def qkv(self) -> QKVLayout:
        return qkv_layout(self.qkv_layout)

    @property
    def mlp_kind(self) -> MLPLayout:
        return mlp_layout(self.mlp_layout)

    @property
    def orientation(self) -> Orientation:
        return Orientation(self.conv1d)

    # Derived facts --------------------------------------------------------------------------------
    @property
    def attn_out_module(self) -> str:
        """The layer-relative module whose output is what attention adds to the residual stream."""
        return self.post_attn_norm or self.attn

    @property
    def mlp_out_module(self) -> str:
        return self.post_mlp_norm or self.mlp

    @property
    def gated(self) -> bool:
        return self.mlp_kind.gated

    def is_parallel(self, config: Any) -> bool:
        """Whether attention and MLP both read the block input (no resid_mid)."""
        return bool(self.parallel_attr and getattr(config, self.parallel_attr, False))


_LLAMA_LIKE: dict[str, Any] = dict(
    embed="model.embed_tokens", layers="model.layers", final_norm="model.norm", unembed="lm_head"
)

ADAPTERS: tuple[Adapter, ...] = (
    Adapter(
        family="gpt2",
        model_types=("gpt2",),
        embed="transformer.wte",
        pos_embed="transformer.wpe",
        layers="transformer.h",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        attn="attn",
        q_proj="attn.c_attn",
        k_proj=None,
        v_proj=None,
        o_proj="attn.c_proj",
        qkv_layout="gpt2_fused",
        ln1="ln_1",
        ln2="ln_2",
        mlp_in="mlp.c_fc",
        mlp_up=None,
        mlp_down="mlp.c_proj",
        mlp_layout="plain",
        norm=NormSpec("layernorm"),
        conv1d=True,
    ),
    Adapter(
        family="gpt_neox",
        model_types=("gpt_neox",),
        embed="gpt_neox.embed_in",
        layers="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
        attn="attention",
        q_proj="attention.query_key_value",
        k_proj=None,
        v_proj=None,
        o_proj="attention.dense",
        qkv_layout="neox_interleaved",
        mlp_in="mlp.dense_h_to_4h",
        mlp_up=None,
        mlp_down="mlp.dense_4h_to_h",
        mlp_layout="plain",
        norm=NormSpec("layernorm"),
        parallel_attr="use_parallel_residual",
    ),
    Adapter(family="llama", model_types=("llama",), **_LLAMA_LIKE),
    Adapter(family="mistral", model_types=("mistral",), **_LLAMA_LIKE),
    Adapter(family="qwen2", model_types=("qwen2",), **_LLAMA_LIKE),
    Adapter(family="qwen3", model_types=("qwen3",), **_LLAMA_LIKE),
    Adapter(
        family="gemma2",
        model_types=("gemma2", "gemma3_text"),
        ln2="pre_feedforward_layernorm",
        post_attn_norm="post_attention_layernorm",
        post_mlp_norm="post_feedforward_layernorm",
        norm=NormSpec("rmsnorm", weight_offset=1.0),
        **_LLAMA_LIKE,
    ),
    Adapter(
        family="phi3",
        model_types=("phi3",),
        q_proj="self_attn.qkv_proj",
        k_proj=None,
        v_proj=None,
        qkv_layout="concat_fused",
        mlp_in="mlp.gate_up_proj",
        mlp_up="mlp.gate_up_proj",
        mlp_layout="gated_fused",
        **_LLAMA_LIKE,
    ),
    Adapter(
        family="olmo2",
        model_types=("olmo2",),
        ln1=None,
        ln2=None,
        qk_norms=("self_attn.q_norm", "self_attn.k_norm"),
        post_attn_norm="post_attention_layernorm",
        post_mlp_norm="post_feedforward_layernorm",
        **_LLAMA_LIKE,
    ),
)

#: Adapters added at run time by :func:`register_adapter` (families outside the package).
_REGISTERED: list[Adapter] = []


def all_adapters() -> tuple[Adapter, ...]:
    """The built-in adapters, then those registered at run time."""
    return (*ADAPTERS, *_REGISTERED)


def supported_model_types() -> tuple[str, ...]:
    return tuple(t for a in all_adapters() for t in a.model_types)


def register_adapter(adapter: Adapter) -> Adapter:
    """Teach mechscope a family outside the package: ``register_adapter(Adapter(family=..., model_types=...))``.

    Refused when the family name or any of its model types is already taken (a second adapter for a
    model type would silently change which modules existing code hooks). The conformance suite
    (tests/test_conformance.py) is how to prove a new adapter right: see docs/adapters.md.
    """
    if not isinstance(adapter, Adapter):
        raise AdapterError(f"register_adapter takes an Adapter; got {type(adapter).__name__}")
    for existing in all_adapters():
        taken = set(existing.model_types) & set(adapter.model_types)
        if existing.family == adapter.family or taken:
            what = f"model types {sorted(taken)}" if taken else f"family {adapter.family!r}"
            raise AdapterError(f"{what} already have an adapter ({existing.family}); choose other names")
    _REGISTERED.append(adapter)
    return adapter


def unregister_adapter(family: str) -> None:
    """Remove a run-time adapter (built-in ones cannot be removed)."""
    if any(a.family == family for a in ADAPTERS):
        raise AdapterError(f"{family!r} is a built-in adapter and cannot be removed")
    _REGISTERED[:] = [a for a in _REGISTERED if a.family != family]


SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in ADAPTERS for t in a.model_types)


def adapter_for(config: Any) -> Adapter:
    """The adapter for an HF config; :class:`AdapterError` listing supported types otherwise."""
    model_type = getattr(config, "model_type", None)
    for adapter in all_adapters():
        if model_type in adapter.model_types:
            return adapter
    raise AdapterError(
        f"mechscope has no adapter for model_type {model_type!r} "
        f"(architectures: {getattr(config, 'architectures', None)}). Supported model types: "
        f"{', '.join(supported_model_types())}. Adding one is a data-only table: see docs/adapters.md."
    )
