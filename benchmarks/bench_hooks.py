"""Overhead of mechscope's hooks against a plain HF forward, measured in the same run.

GPT-2-small-sized random model (12 layers, d_model 768, 12 heads), batch 8 x 128 tokens, CPU, fp32,
no grad. Prints each configuration's median time as a ratio to the plain HF forward of an untouched
copy of the same weights, interleaving the configurations round by round so machine noise hits all.
``mechscope forward, no hooks`` is the wrapper's own cost; with ``--dtype float16`` it includes the float16
overflow guard (a finite-check flag per layer, read once per forward).

    python benchmarks/bench_hooks.py [--rounds 7] [--layers 12] [--dtype float16]

Caching every site keeps ~1 GB of activations per forward alive. With glibc's default settings freed
blocks go back to the kernel, and the next forward pays for fresh zero-filled pages; ``./run`` sets
``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` so memory is reused. The header line says which
allocator settings the run used, so both cases can be measured and compared.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mechscope.model.hooked import HookedModel
from mechscope.model.hooks import HookFn
from mechscope.sites import SiteLike

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_device_option, synchronize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pos", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_device_option(parser)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_embd=768, n_head=12)
    plain = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    plain = plain.eval().to(args.device, getattr(torch, args.dtype))
    hooked = HookedModel(copy.deepcopy(plain).eval())
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.pos)).to(args.device)
    resid = [s.name for s in hooked.sites("hook_resid_post")]
    noop: dict[SiteLike, HookFn] = {name: (lambda act, ctx: None) for name in hooked.site_names}

    def run_plain() -> None:
        plain(input_ids=tokens)

    def run_bare() -> None:
        hooked(tokens)

    def run_resid() -> None:
        hooked.run_with_cache(tokens, resid)

    def run_all() -> None:
        hooked.run_with_cache(tokens)

    def run_noop() -> None:
        with hooked.hooks(noop):
            hooked(tokens)

    configs = {
        "plain HF forward (baseline)": run_plain,
        "mechscope forward, no hooks": run_bare,
        "cache hook_resid_post, every layer": run_resid,
        "cache every site": run_all,
        "no-op hook on every site": run_noop,
    }
    times: dict[str, list[float]] = {k: [] for k in configs}
    with torch.no_grad():
        for fn in configs.values():  # warm-up
            fn()
        for _ in range(args.rounds):
            for name, fn in configs.items():
                synchronize(args.device)
                start = time.perf_counter()
                fn()
                synchronize(args.device)
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["plain HF forward (baseline)"])
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")} or "glibc defaults"
    print(
        f"GPT-2-small-sized random model, {args.layers} layers, batch {args.batch}x{args.pos}, "
        f"{args.dtype}, {torch.get_num_threads()} threads, {args.device}, {args.rounds} interleaved rounds (median); "
        f"allocator: {malloc}"
    )
    for name, values in times.items():
        med = statistics.median(values)
        spread = (max(values) - min(values)) / med
        print(f"  {name:40s} {med * 1000:8.1f} ms   {med / base:5.2f}x   (spread {spread:.0%})")


if __name__ == "__main__":
    main()
