"""Repeated caching must not leak: resident memory stays flat over 1,000 run_with_cache calls."""

from __future__ import annotations

import gc

import psutil
import torch

from mechscope.model.hooked import HookedModel
from tiny_models import tiny_model


def test_rss_flat_over_1000_run_with_cache_calls():
    hf, _ = tiny_model("llama", with_tokenizer=False)
    model = HookedModel(hf)
    tokens = torch.randint(4, 100, (4, 32), generator=torch.Generator().manual_seed(0))
    process = psutil.Process()
    for _ in range(100):
        model.run_with_cache(tokens)
    gc.collect()
    start = process.memory_info().rss
    for _ in range(1000):
        _, cache = model.run_with_cache(tokens)
        del cache
    gc.collect()
    growth = process.memory_info().rss - start
    # One full cache of this model is ~0.3 MiB; a leak of one cache per call would add ~300 MiB.
    assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 1,000 calls"
    assert not model._sessions
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.hf_model.modules())
