"""Model dimensions read from an HF config, in mechscope's dimension vocabulary."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mechscope.errors import AdapterError
from mechscope.model.adapters import Adapter


@dataclass(frozen=True)
class ModelDims:
    """Sizes of a model: ``n_layers d_model n_heads n_kv_heads d_head d_mlp d_vocab n_ctx``."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    parallel: bool
    gated: bool
    family: str
    model_type: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _first(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def dims_from_config(config: Any, adapter: Adapter) -> ModelDims:
    """Read the sizes of `config` (an HF ``PretrainedConfig``) the way its family names them."""
    d_model = _first(config, "hidden_size", "n_embd")
    n_heads = _first(config, "num_attention_heads", "n_head")
    n_layers = _first(config, "num_hidden_layers", "n_layer")
    if d_model is None or n_heads is None or n_layers is None:
        raise AdapterError(
            f"config of model_type {config.model_type!r} lacks hidden size / heads / layers; "
            "expected hidden_size (or n_embd), num_attention_heads (or n_head), num_hidden_layers (or n_layer)"
        )
    d_head = _first(config, "head_dim", default=d_model // n_heads)
    d_mlp = _first(config, "intermediate_size", "n_inner", default=4 * d_model)
    return ModelDims(
        n_layers=int(n_layers),
        d_model=int(d_model),
        n_heads=int(n_heads),
        n_kv_heads=int(_first(config, "num_key_value_heads", default=n_heads)),
        d_head=int(d_head),
        d_mlp=int(d_mlp),
        d_vocab=int(config.vocab_size),
        n_ctx=int(_first(config, "max_position_embeddings", "n_positions", default=0)),
        parallel=adapter.is_parallel(config),
        gated=adapter.gated,
        family=adapter.family,
        model_type=str(config.model_type),
    )
