"""Path patching to the logits: the batched implementation against one frozen forward per sender.

The loop is the definition run as it reads (Wang et al. 2022): for each sender head, one full forward
of the clean prompts with every other head's output (and every MLP's, with frozen MLPs) fixed at its
clean value and the sender's taken from the corrupted run. It is measured on a few senders spread over
the layers, its time per sender extrapolated to every head, and its results compared with the same
senders of the batched sweep. The batched sweep starts at the first position the metric reads (with
every head's output fixed no position reads another) and, with frozen MLPs, runs only the senders'
layers. Wall-clock and CPU time of this process are both reported (CPU time is the steadier one on a
shared machine).

    python benchmarks/bench_path_patching.py [--layers 12] [--d-model 768] [--pos 32] [--batch 4]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from common import add_device_option, add_model_options, random_gpt2, synchronize
from mechscope.locate.metrics import logit_diff
from mechscope.locate.path_patching import path_patch


def caches(model: Any, clean: torch.Tensor, corrupt: torch.Tensor) -> tuple[Any, Any]:
    """The clean run's head outputs and MLP outputs, and the corrupted run's head outputs (made once)."""
    layers = range(model.dims.n_layers)
    z = [f"blocks.{layer}.attn.hook_z" for layer in layers]
    _, base = model.run_with_cache(clean, sites=z + [f"blocks.{layer}.hook_mlp_out" for layer in layers])
    _, source = model.run_with_cache(corrupt, sites=z)
    return base, source


def frozen_forward(
    model: Any, clean: torch.Tensor, base: Any, source: Any, sender: tuple[int, int], freeze_mlps: bool
) -> torch.Tensor:
    """The metric of one sender's path to the logits, from one full forward with fixed components."""
    layers = range(model.dims.n_layers)
    z = [f"blocks.{layer}.attn.hook_z" for layer in layers]
    mlps = [f"blocks.{layer}.hook_mlp_out" for layer in layers]
    hooks: dict[str, Callable[..., torch.Tensor]] = {}
    for layer in layers:

        def fixed(_a: torch.Tensor, _ctx: Any, layer: int = layer) -> torch.Tensor:
            out = base[z[layer]].clone()
            if layer == sender[0]:
                out[:, :, sender[1]] = source[z[layer]][:, :, sender[1]]
            return out

        hooks[z[layer]] = fixed
        if freeze_mlps:
            hooks[mlps[layer]] = lambda _a, _ctx, name=mlps[layer]: base[name]
    with torch.no_grad(), model.hooks(hooks):
        return logit_diff(model(clean), 1, 2).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_options(parser, batch=4)
    add_device_option(parser)
    parser.add_argument("--loop-senders", type=int, default=4)
    args = parser.parse_args()
    model = random_gpt2(args, bos_token_id=0, eos_token_id=0)
    clean = torch.randint(0, args.vocab, (args.batch, args.pos))
    corrupt = clean.clone()
    corrupt[:, 1] = torch.randint(0, args.vocab, (args.batch,))
    clean, corrupt = clean.to(args.device), corrupt.to(args.device)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logit_diff(logits, 1, 2)

    n_layers, n_heads = model.dims.n_layers, model.dims.n_heads
    layers = [int(x) for x in torch.linspace(0, n_layers - 1, args.loop_senders).round()]
    senders = [(layer, (3 * i) % n_heads) for i, layer in enumerate(layers)]
    print(
        f"model: {n_layers} layers, d_model {args.d_model}, {n_heads} heads, vocab {args.vocab}; "
        f"batch {args.batch} x {args.pos} tokens; {torch.get_num_threads()} thread(s), {args.device}; "
        f"{n_layers * n_heads} senders, receivers: logits"
    )
    for freeze_mlps in (True, False):
        base, source = caches(model, clean, corrupt)  # once, outside the timing: the loop's best case
        synchronize(args.device)
        wall, cpu = time.perf_counter(), time.process_time()
        looped = [float(frozen_forward(model, clean, base, source, s, freeze_mlps)) for s in senders]
        loop_wall, loop_cpu = time.perf_counter() - wall, time.process_time() - cpu
        synchronize(args.device)
        wall, cpu = time.perf_counter(), time.process_time()
        result = path_patch(model, clean, corrupt, metric, freeze_mlps=freeze_mlps)
        synchronize(args.device)
        batch_wall, batch_cpu = time.perf_counter() - wall, time.process_time() - cpu
        scale = n_layers * n_heads / len(senders)
        diff = max(abs(float(result["metric"][layer, head]) - float(v)) for (layer, head), v in zip(senders, looped))
        print(
            f"freeze_mlps={freeze_mlps}: loop {loop_wall / len(senders):.4f}s wall / {loop_cpu / len(senders):.4f}s "
            f"CPU per sender, extrapolated to all: {loop_wall * scale:.2f}s wall; batched: {batch_wall:.2f}s wall / "
            f"{batch_cpu:.2f}s CPU; speed-up {loop_wall * scale / batch_wall:.1f}x wall, "
            f"{loop_cpu * scale / batch_cpu:.1f}x CPU; max |diff| on shared senders {diff:.2e}"
        )


if __name__ == "__main__":
    main()
