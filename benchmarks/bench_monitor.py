"""Overhead of the runtime monitor: monitored vs plain ``generate``, measured in the same run.

Random GPT-2-small-sized model (12 layers, d_model 768) by default, greedy generation of 32 new tokens
for a batch of 4 prompts of 32 tokens (left-padded rows included), KV cache on, CPU fp32. The monitor
runs a linear probe on one site (the goal: <= 1.05x) and, for comparison, a Mahalanobis detector on one
site and a probe on every layer. Configurations are interleaved round by round so machine noise hits all;
the median of each is printed as a ratio to plain generation.

    python benchmarks/bench_monitor.py [--rounds 7] [--new-tokens 32] [--layers 12]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from common import add_model_options, random_gpt2
from mechscope.improve.detect import MahalanobisDetector, ProbeDetector
from mechscope.improve.monitor import monitor
from mechscope.results import Artifact


def _probe(hm, sites: list[str]) -> ProbeDetector:
    d = hm.dims.d_model * len(sites)
    g = torch.Generator().manual_seed(0)
    return ProbeDetector(
        mean=torch.zeros(d),
        std=torch.ones(d),
        weight=torch.randn(d, generator=g) / d**0.5,
        bias=torch.zeros(1),
        sites=sites,
        pooling="mean",
        **Artifact.model_info(hm),
    )


def _mahalanobis(hm, site: str) -> MahalanobisDetector:
    d = hm.dims.d_model
    return MahalanobisDetector(
        means=torch.zeros(1, d),
        covariances=torch.eye(d)[None],
        shrinkages=torch.zeros(1),
        norms=torch.tensor([[0.0, 1.0]]),
        sites=[site],
        pooling="max",
        **Artifact.model_info(hm),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_options(parser, batch=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    hm = random_gpt2(args)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(100, args.vocab, (args.batch, args.pos), generator=g)
    mask = torch.ones_like(ids)
    mask[1:, : args.pos // 4] = 0  # left padding in all rows but the first
    ids[mask == 0] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    mid = f"blocks.{args.layers // 2}.hook_resid_post"
    configs = {
        "plain generate": None,
        "probe, 1 site (log)": _probe(hm, [mid]),
        "mahalanobis, 1 site (log)": _mahalanobis(hm, mid),
        f"probe, {args.layers} sites (log)": _probe(hm, [f"blocks.{i}.hook_resid_post" for i in range(args.layers)]),
    }

    def run(detector) -> torch.Tensor:
        kwargs = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}
        with torch.no_grad():
            if detector is None:
                return hm.generate(batch, pad_token_id=0, **kwargs)
            with monitor(hm, detector, threshold=1e30):
                return hm.generate(batch, pad_token_id=0, **kwargs)

    reference = run(None)
    for det in configs.values():  # warm-up, and the log policy must not change a token
        assert torch.equal(run(det), reference)
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, det in configs.items():
            start = time.perf_counter()
            run(det)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["plain generate"])
    print(
        f"random GPT-2 {args.layers} layers d_model {args.d_model}, batch {args.batch} x {args.pos} prompt tokens, "
        f"{args.new_tokens} new tokens, {args.threads} thread(s), {args.rounds} rounds (medians)"
    )
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:32s} {med:8.3f} s   {med / base:6.3f}x")


if __name__ == "__main__":
    main()
