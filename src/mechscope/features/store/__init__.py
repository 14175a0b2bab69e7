"""Activations of model sites over a corpus: in memory (:func:`collect_activations`, small runs) or in a
sharded, resumable store on disk (:func:`collect_store`, :class:`ActivationStore`) for training at scale."""

from mechscope.features.store.manifest import DTYPES, STORE_SCHEMA, StoreSettings
from mechscope.features.store.reader import ActivationStore, CorruptShardError
from mechscope.features.store.rows import collect_activations, per_token_site, row_activations, token_rows
from mechscope.features.store.writer import collect_store

__all__ = [
    "DTYPES",
    "STORE_SCHEMA",
    "ActivationStore",
    "CorruptShardError",
    "StoreSettings",
    "collect_activations",
    "collect_store",
    "per_token_site",
    "row_activations",
    "token_rows",
]
