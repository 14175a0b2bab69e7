"""Activation-patching sweeps: the batched implementation against a loop of single patched forwards.

Random GPT-2-style model (default 4 layers, d_model 256, 8 heads), batch 4 x 32 tokens, CPU, fp32.
For each sweep (residual layer x position, heads layer x head) prints both times, their ratio and the
largest difference between the two results (they must agree to fp32 tolerance).

    python benchmarks/bench_patching.py [--layers 4] [--d-model 256] [--chunk 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mechscope.locate.metrics import logit_diff
from mechscope.locate.patching import activation_patch
from mechscope.model.hooked import HookedModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--pos", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=args.layers,
        n_embd=args.d_model,
        n_head=args.heads,
        n_positions=max(64, args.pos),
        vocab_size=5000,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = HookedModel(GPT2LMHeadModel(config).eval())
    clean = torch.randint(0, config.vocab_size, (args.batch, args.pos))
    corrupt = clean.clone()
    corrupt[:, args.pos // 2] = torch.randint(0, config.vocab_size, (args.batch,))

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logit_diff(logits, 1, 2)

    for kind in ("resid_pre", "heads"):
        times, results = {}, {}
        for method in ("loop", "batched"):
            start = time.perf_counter()
            results[method] = activation_patch(
                model, clean, corrupt, kind, metric, method=method, chunk_size=args.chunk
            )
            times[method] = time.perf_counter() - start
        diff = (results["loop"]["metric"] - results["batched"]["metric"]).abs().max().item()
        cells = results["loop"]["metric"].numel()
        print(
            f"{kind:10s} {cells:5d} cells  loop {times['loop']:7.2f}s  batched {times['batched']:7.2f}s  "
            f"speed-up {times['loop'] / times['batched']:5.2f}x  max |diff| {diff:.2e}"
        )


if __name__ == "__main__":
    main()
