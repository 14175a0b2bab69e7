"""Pieces shared by the benchmarks (run as scripts from this folder or the repository root): timing, and
the random GPT-2-sized model most of them measure."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest of `repeats` wall-clock timings of `fn()` in seconds (the least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def synchronize(device: Any) -> None:
    """Wait for queued GPU work (timings of CUDA calls end when the work does, not when it is queued)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda, cuda:1, ...")


def add_model_options(parser: argparse.ArgumentParser, *, batch: int) -> None:
    """Size of the random GPT-2 (GPT-2-small by default), of the token batch, and CPU threads."""
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--pos", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)


def random_gpt2(args: argparse.Namespace, **config: Any) -> Any:
    """Set the threads and seed 0, then build a HookedModel over a random GPT-2 of `args`' size (on
    ``args.device`` when the script has that option)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from mechscope.model.hooked import HookedModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gpt2 = GPT2Config(
        n_layer=args.layers,
        n_embd=args.d_model,
        n_head=args.heads,
        n_positions=max(64, args.pos),
        vocab_size=args.vocab,
        **config,
    )
    return HookedModel(GPT2LMHeadModel(gpt2).eval().to(getattr(args, "device", "cpu")))
