"""Run by the real sae-lens package's Python (from bench_sae.py): time SAELens's own training step
(training_forward_pass, backward, Adam) on the activations in a safetensors file; prints the best
seconds of `repeats` timed runs."""

from __future__ import annotations

import sys
import time

import torch
from safetensors.torch import load_file


def main() -> None:
    path, arch, d_sae, k, steps, batch, threads, sparse = sys.argv[1:9]
    repeats = int(sys.argv[9]) if len(sys.argv) > 9 else 1
    torch.set_num_threads(int(threads))
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    x = load_file(path)["x"]
    d_in = x.shape[1]
    if arch == "topk":
        sae = TopKTrainingSAE(
            TopKTrainingSAEConfig(d_in=d_in, d_sae=int(d_sae), k=int(k), use_sparse_activations=sparse == "1")
        )
        coefficients: dict[str, float] = {}
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=int(d_sae)))
        coefficients = {"l1": 5.0}
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    dead = torch.zeros(int(d_sae), dtype=torch.bool)

    def run(n: int) -> float:
        start = time.perf_counter()
        for step in range(n):
            rows = torch.randint(0, x.shape[0], (int(batch),), generator=gen)
            out = sae.training_forward_pass(TrainStepInput(x[rows], coefficients, dead, step, False))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
        return time.perf_counter() - start

    run(2)
    print(min(run(int(steps)) for _ in range(repeats)))  # best of: the least disturbed by other load


if __name__ == "__main__":
    main()
