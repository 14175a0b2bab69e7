"""EAP over every edge of a GPT-2-small-sized random model, against one forward+backward.

A 12-layer, d_model=768, 12-head random GPT-2 (vocab 50,257) at batch 2 x 32 tokens (resample
ablation): EAP = two caching forwards (clean, corrupted) + one edge-masked forward + one backward.
The baseline, measured in the same run, is one plain forward plus backward of the same metric (to the
parameters). Prints seconds, the number of edges scored, and the ratio.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_eap.py [--layers 12] [--batch 2] [--pos 32]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from common import best_of
from mechscope.locate.circuits import Graph, eap
from mechscope.locate.metrics import logit_diff
from mechscope.model.hooked import HookedModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--pos", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    model = HookedModel(GPT2LMHeadModel(config).eval())
    graph = Graph.from_model(model)
    clean = torch.randint(0, 50257, (args.batch, args.pos))
    corrupt = clean.clone()
    corrupt[:, args.pos // 2] = torch.randint(0, 50257, (args.batch,))

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logit_diff(logits, 11, 12)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        metric(model.forward(clean)).mean().backward()

    def run_eap() -> None:
        eap(model, clean, corrupt, metric, graph=graph)

    forward_backward()  # warm-up
    run_eap()
    base = best_of(forward_backward, args.repeats)
    took = best_of(run_eap, args.repeats)
    model.zero_grad(set_to_none=True)
    print(
        f"GPT-2 {args.layers} layers d_model 768, batch {args.batch} x {args.pos}, {graph.n_edges:,} edges "
        f"({args.threads} thread(s), best of {args.repeats}):"
    )
    print(f"  one forward+backward {base:.3f} s")
    print(f"  EAP over all edges   {took:.3f} s  = {took / base:.2f}x forward+backward")


if __name__ == "__main__":
    main()
