"""Run records: provenance, metrics and content-addressed artifacts in one SQLite store.

    from mechscope import records

    with records.run("ioi patching", tags=["ioi"], model=model, seed=0) as run:
        result = activation_patch(model, clean, corrupt, sites, metric)   # recorded by itself
        run.log_metric("top_score", float(result["scores"].max()))

A store is a folder: ``runs.sqlite`` (schema-versioned, WAL) and ``artifacts/`` (files by SHA-256).
Nothing is recorded outside a ``run`` block. See docs/records.md.
"""

from __future__ import annotations

from mechscope.records.artifacts import PathRefused
from mechscope.records.compare import Comparison, compare
from mechscope.records.provenance import ModelInfo, weights_sha256
from mechscope.records.recorder import Run, current_run, run
from mechscope.records.schema import SCHEMA_VERSION, StoreError
from mechscope.records.store import (
    ArtifactRecord,
    GcReport,
    RunRecord,
    RunStore,
    default_store_dir,
    open_store,
)

__all__ = [
    "SCHEMA_VERSION",
    "ArtifactRecord",
    "Comparison",
    "GcReport",
    "ModelInfo",
    "PathRefused",
    "Run",
    "RunRecord",
    "RunStore",
    "StoreError",
    "compare",
    "current_run",
    "default_store_dir",
    "open_store",
    "run",
    "weights_sha256",
]
