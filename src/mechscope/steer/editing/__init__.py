"""Knowledge editing: ROME and MEMIT with cached key statistics, exact revert and edit metrics.

``record = rome(model, EditRequest(prompt="{} lives in", subject="Ada", target=" Paris"))`` edits in
place and returns an :class:`EditRecord`; ``record.revert(model)`` restores every weight bit for bit.
"""

from __future__ import annotations

from mechscope.steer.editing.memit import MEMITConfig, memit
from mechscope.steer.editing.metrics import METRICS, EditMetrics, edit_metrics
from mechscope.steer.editing.records import EditRecord, equal_to_snapshot, mlp_out_weight, snapshot
from mechscope.steer.editing.requests import EditError, EditRequest, world_requests
from mechscope.steer.editing.rome import ROMEConfig, rome
from mechscope.steer.editing.stats import StatsConfig, second_moments, zoo_texts

__all__ = [
    "METRICS",
    "EditError",
    "EditMetrics",
    "EditRecord",
    "EditRequest",
    "MEMITConfig",
    "ROMEConfig",
    "StatsConfig",
    "edit_metrics",
    "equal_to_snapshot",
    "memit",
    "mlp_out_weight",
    "rome",
    "second_moments",
    "snapshot",
    "world_requests",
    "zoo_texts",
]
