"""Activation-patching sweeps: the batched implementation against a loop of single patched forwards.

Default: a random GPT-2-small-sized model (12 layers, d_model 768, 12 heads, vocab 50257), CPU, fp32,
one thread, the head x position sweep (``heads``, ``per_position=True``: layer x head x position
cells) with a logit-difference metric at the last position. Clean and corrupt prompts differ at
``--diff-pos`` (default 1: nearly every cell is a real patch).

The loop (one full patched forward per cell, as TransformerLens's patching helpers do) is measured
on a reduced sweep (``--loop-heads`` heads x ``--loop-positions`` positions x every layer) in the
same run; its time per forward is extrapolated to the full sweep, and the reduced loop's results are
compared with the same cells of the batched sweep. Both wall-clock and CPU time (of this process) are
reported: on a shared machine the CPU time of the single-threaded work is the steadier of the two.

The metric is a plain function (``logit_diff(logits, 1, 2)``): the batched sweep finds from its
gradient that it reads the last position's columns 1 and 2 and projects only those.

    python benchmarks/bench_patching.py [--layers 12] [--d-model 768] [--pos 32] [--batch 1]
    python benchmarks/bench_patching.py --layers 4 --d-model 256 --heads 8 --batch 4   # issue 19's sweep
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from common import add_device_option, add_model_options, random_gpt2, synchronize
from mechscope.locate.metrics import logit_diff
from mechscope.locate.patching import PatchResult, activation_patch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_options(parser, batch=1)
    add_device_option(parser)
    parser.add_argument("--diff-pos", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--loop-heads", type=int, default=2)
    parser.add_argument("--loop-positions", type=int, default=2)
    args = parser.parse_args()
    model = random_gpt2(args, bos_token_id=0, eos_token_id=0)
    clean = torch.randint(0, args.vocab, (args.batch, args.pos))
    corrupt = clean.clone()
    corrupt[:, args.diff_pos] = torch.randint(0, args.vocab, (args.batch,))
    clean, corrupt = clean.to(args.device), corrupt.to(args.device)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logit_diff(logits, 1, 2)

    print(
        f"model: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, vocab {args.vocab}; "
        f"batch {args.batch} x {args.pos} tokens; prompts differ at position {args.diff_pos}; "
        f"{torch.get_num_threads()} thread(s), {args.device}"
    )
    model({"input_ids": clean})  # warm-up (first CUDA calls load kernels)
    synchronize(args.device)
    start = time.perf_counter()
    model({"input_ids": clean})
    synchronize(args.device)
    forward = time.perf_counter() - start
    heads = [int(h) for h in torch.linspace(0, args.heads - 1, args.loop_heads).round()]
    positions = [int(p) for p in torch.linspace(args.diff_pos + 1, args.pos - 1, args.loop_positions).round()]

    def timed(fn: Callable[[], PatchResult]) -> tuple[PatchResult, float, float]:
        synchronize(args.device)
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        synchronize(args.device)
        return result, time.perf_counter() - wall, time.process_time() - cpu

    def run_loop() -> PatchResult:
        return activation_patch(
            model, clean, corrupt, "heads", metric, per_position=True, units=heads, positions=positions, method="loop"
        )

    def run_batched() -> PatchResult:
        return activation_patch(model, clean, corrupt, "heads", metric, per_position=True, chunk_size=args.chunk)

    # The machine is shared: time the loop before and after the batched sweep and use the mean.
    loop, loop_before, cpu_before = timed(run_loop)
    batched, batched_time, batched_cpu = timed(run_batched)
    _, loop_after, cpu_after = timed(run_loop)
    loop_cells = loop["metric"].numel()
    cells = batched["metric"].numel()
    same = batched["metric"][:, heads][:, :, positions]
    diff = (same - loop["metric"]).abs().max().item()
    per_forward = (loop_before + loop_after) / 2 / loop_cells
    per_cpu = (cpu_before + cpu_after) / 2 / loop_cells
    print(f"one plain forward: {forward:.3f}s")
    print(
        f"loop: {loop_cells} patched forwards (heads {heads} x positions {positions} x {args.layers} layers), "
        f"timed before and after the batched sweep: {per_forward:.4f}s wall / {per_cpu:.4f}s CPU each "
        f"({per_forward / forward:.2f}x a plain forward); extrapolated to all {cells} cells: "
        f"{per_forward * cells:.1f}s wall / {per_cpu * cells:.1f}s CPU"
    )
    print(f"batched: all {cells} cells (layer x head x position) in {batched_time:.2f}s wall / {batched_cpu:.2f}s CPU")
    print(
        f"speed-up (extrapolated loop / batched): {per_forward * cells / batched_time:.1f}x wall, "
        f"{per_cpu * cells / batched_cpu:.1f}x CPU; max |diff| on shared cells {diff:.2e}"
    )


if __name__ == "__main__":
    main()
