"""Attribution patching cost: AtP over every head, neuron and residual position against one plain
forward + backward of the same batch, measured in the same run (goal: <= 5x).

Default: a random GPT-2-small-sized model (12 layers, d_model 768, 12 heads, MLP 3072, vocab 50257),
batch 4 x 32 tokens, CPU, fp32, one thread. Also times AtP* (QK fix; GradDrop adds one
forward + backward per layer and is reported separately).

The metric is ``logit_diff_metric(1, 2)``, which declares what it reads (each prompt's last real token,
two vocabulary columns), so AtP's forward + backward unembeds only that position; ``--metric plain``
uses the undeclared ``lambda logits: logit_diff(logits, 1, 2)`` (every position unembedded). The
baseline is always a plain forward + backward with every position's logits.

    python benchmarks/bench_atp.py [--layers 12] [--d-model 768] [--batch 4] [--pos 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from common import add_model_options, best_of, random_gpt2
from mechscope.locate.attribution_patching import AtPConfig, attribution_patch
from mechscope.locate.metrics import logit_diff
from mechscope.metrics import logit_diff_metric


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_options(parser, batch=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--graddrop", action="store_true", help="also time GradDrop")
    parser.add_argument("--metric", choices=("declared", "plain"), default="declared")
    args = parser.parse_args()
    model = random_gpt2(args)
    clean = torch.randint(0, args.vocab, (args.batch, args.pos))
    corrupt = clean.clone()
    corrupt[:, 1] = torch.randint(0, args.vocab, (args.batch,))

    def plain(logits: torch.Tensor) -> torch.Tensor:
        return logit_diff(logits, 1, 2)

    metric = logit_diff_metric(1, 2) if args.metric == "declared" else plain

    def forward_backward() -> None:
        model.run_with_grads(clean, lambda logits: metric(logits).mean(), ["blocks.0.hook_resid_pre"])

    def atp() -> None:
        attribution_patch(model, clean, corrupt, metric, AtPConfig(nodes=("heads", "neurons", "resid")))

    def atp_star() -> None:
        attribution_patch(model, clean, corrupt, metric, AtPConfig(nodes=("heads", "neurons"), qk_fix=True))

    def graddrop() -> None:
        attribution_patch(model, clean, corrupt, metric, AtPConfig(nodes=("heads", "neurons"), grad_drop=True))

    forward_backward()  # warm-up
    n_nodes = args.layers * (args.heads + 4 * args.d_model + args.pos)
    print(
        f"model: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, vocab {args.vocab}; "
        f"batch {args.batch} x {args.pos}; {torch.get_num_threads()} thread(s); {args.repeats} rounds; "
        f"{args.metric} metric"
    )
    # The machine is shared: every round times the baseline right before each method, and the
    # reported ratio is the median over rounds of (method / baseline of the same round).
    methods = {
        f"AtP, all {n_nodes} heads + neurons + residual positions": atp,
        "AtP* QK fix (heads, q/k/v, neurons)": atp_star,
    }
    if args.graddrop:
        methods[f"AtP + GradDrop ({args.layers} extra backward passes)"] = graddrop
    ratios: dict[str, list[float]] = {name: [] for name in methods}
    times: dict[str, list[float]] = {name: [] for name in methods}
    base_times: list[float] = []
    for _ in range(args.repeats):
        for name, fn in methods.items():
            base = best_of(forward_backward, 1)
            took = best_of(fn, 1)
            base_times.append(base)
            times[name].append(took)
            ratios[name].append(took / base)
    print(f"one forward + backward: median {statistics.median(base_times):.3f}s")
    for name in methods:
        print(
            f"{name}: median {statistics.median(times[name]):.3f}s, median ratio {statistics.median(ratios[name]):.2f}x"
        )


if __name__ == "__main__":
    main()
