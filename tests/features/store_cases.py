"""Shared settings of the store and training-resume tests (used in-process and by _kill_child.py)."""

from __future__ import annotations

from typing import Any

from mechscope.features import SAEConfig, SAETrainConfig
from mechscope.model.hooked import HookedModel
from tiny_models import tiny_model

SITES = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
TEXTS = [
    f"the {a} sat on the {b} and looked at the {c}, then {d}."
    for a in ("cat", "dog", "bird", "fox")
    for b in ("mat", "rug", "bed")
    for c in ("sun", "moon", "door")
    for d in ("slept", "ran")
]


def collect_args() -> tuple[HookedModel, list[str], dict[str, Any]]:
    model = HookedModel(*tiny_model("llama"))
    return model, TEXTS, {"sites": list(SITES), "seq_len": 16, "rows_per_shard": 4, "dtype": "fp32"}


def train_args() -> tuple[SAEConfig, SAETrainConfig]:
    config = SAEConfig(d_in=16, d_sae=48, activation="topk", k=2)
    return config, SAETrainConfig(steps=400, batch_size=128, lr=3e-3, checkpoint_every=10, dead_steps=50)
