"""Resident memory across 1,000 repeated ``run_with_cache`` calls (should stay flat).

Prints RSS after a warm-up and after 1,000 calls on a 4-layer random GPT-2 (batch 4 x 64), caching
every site, and the growth as a ratio to the warm-up RSS.

    python benchmarks/bench_cache_memory.py [--calls 1000]
"""

from __future__ import annotations

import argparse
import gc
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mechscope.model.hooked import HookedModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = HookedModel(GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=8, vocab_size=1000)).eval())
    tokens = torch.randint(0, 1000, (4, 64))
    process = psutil.Process()
    for _ in range(50):
        model.run_with_cache(tokens)
    gc.collect()
    start = process.memory_info().rss
    for _ in range(args.calls):
        _, cache = model.run_with_cache(tokens)
        del cache
    gc.collect()
    end = process.memory_info().rss
    print(
        f"RSS after warm-up {start / 2**20:.1f} MiB, after {args.calls} run_with_cache calls "
        f"{end / 2**20:.1f} MiB: growth {(end - start) / 2**20:+.1f} MiB ({end / start:.3f}x)"
    )


if __name__ == "__main__":
    main()
