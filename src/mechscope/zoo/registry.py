"""Re-export of :mod:`mechscope.model.sources.names` (model-name resolution lives in the model layer)."""

from mechscope.model.sources.names import (
    DEFAULT_MODEL,
    MODELS_DIR,
    ModelEntry,
    ZooEntry,
    list_models,
    real_entries,
    resolve,
)

__all__ = ["DEFAULT_MODEL", "MODELS_DIR", "ModelEntry", "ZooEntry", "list_models", "real_entries", "resolve"]
