"""A data-parallel job in one process vs split across ranks by torchrun (gloo on CPU, nccl with GPUs), with
the ratio to the one-process baseline measured in the same run and the largest difference between the
ranks' result and the one-process result. Jobs (--job):

- ``patch``: a head-patching sweep over many prompts (``dist.map_prompts``), gathered;
- ``sae``: SAE training (TopK) on a tensor of random activations, DistributedDataParallel inside
  ``train_sae``; the difference is over the trained weights;
- ``collect``: activation collection into one store (``collect_store_distributed``) vs ``collect_store``;
  the difference is over the stored activations.

    python benchmarks/bench_distributed.py --ranks 2 --prompts 32
    python benchmarks/bench_distributed.py --job sae --ranks 2 --steps 200 --batch 4096
    python benchmarks/bench_distributed.py --job collect --ranks 2 --rows 256

Two times are printed for the ranks: the job alone (slowest rank, from its own clock, gather included) and
the whole torchrun launch (process start-up, imports and model loading included), so the fixed cost of going
multi-process is visible next to the gain. On a CPU the ranks share its cores: each rank runs --threads
threads, the one-process baseline runs ranks x threads (or --baseline-threads; on a CPU shared with other
jobs, threads that wait on each other can make the multi-threaded baseline unfairly slow).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

WORKER = "worker"


def _model_folder(args: argparse.Namespace, folder: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=args.layers,
        n_embd=args.d_model,
        n_head=args.heads,
        n_positions=max(64, args.pos),
        vocab_size=args.vocab,
        bos_token_id=0,
        eos_token_id=0,
    )
    GPT2LMHeadModel(config).eval().save_pretrained(folder)


def _inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(0, args.vocab, (args.prompts, args.pos), generator=gen)
    corrupt = clean.clone()
    corrupt[:, args.pos // 2] = torch.randint(0, args.vocab, (args.prompts,), generator=gen)
    answers = torch.randint(0, args.vocab, (args.prompts, 2), generator=gen)
    return clean, corrupt, answers


def _sweep(model: Any, clean: torch.Tensor, corrupt: torch.Tensor, answers: torch.Tensor, chunk: int) -> Any:
    from mechscope.locate import activation_patch
    from mechscope.locate.metrics import logit_diff

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logit_diff(logits, answers[:, 0], answers[:, 1])

    return activation_patch(model, clean, corrupt, "heads", metric, chunk_size=chunk)  # type: ignore[arg-type]


def _sae_data(args: argparse.Namespace) -> torch.Tensor:
    return torch.randn(args.tokens, args.d_model, generator=torch.Generator().manual_seed(2))


def _sae_train(data: torch.Tensor, args: argparse.Namespace, steps: int) -> torch.nn.Module:
    from mechscope.features.sae import SAEConfig
    from mechscope.features.train import SAETrainConfig, train_sae

    config = SAEConfig(d_in=args.d_model, d_sae=8 * args.d_model, activation="topk", k=32)
    sae, _ = train_sae(data, config, SAETrainConfig(steps=steps, batch_size=args.batch, warmup=10))
    return sae


def _collect(model: object, args: argparse.Namespace, folder: Path, ranks: bool) -> object:
    from mechscope.features.store import collect_store
    from mechscope.features.store.distributed import collect_store_distributed

    rows = torch.randint(0, args.vocab, (args.rows, args.pos), generator=torch.Generator().manual_seed(3))
    collect = collect_store_distributed if ranks else collect_store
    site = f"blocks.{args.layers - 1}.hook_resid_post"
    return collect(model, site, rows, folder, dtype="fp32", seq_len=args.pos, rows_per_shard=16, batch_size=8)  # type: ignore[arg-type]


def worker(args: argparse.Namespace) -> None:
    """One rank: load, run its share of the job, combine; rank 0 writes the result and the timing."""
    from safetensors.torch import save_file

    from mechscope.model import distributed as dist
    from mechscope.model.loading import load_model

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    with dist.process_group():
        model = None if args.job == "sae" else load_model(args.folder, device=dist.local_device())
        clean, corrupt, answers = _inputs(args)
        data = _sae_data(args)
        if args.job == "patch":  # warm-ups, as the baseline's
            _sweep(model, clean[:2], corrupt[:2], answers[:2], args.chunk)
        elif args.job == "sae":
            _sae_train(data, args, 2)
        else:
            _collect(model, args, out / "warm", ranks=True)
        dist.barrier()
        start = time.perf_counter()
        if args.job == "patch":
            result = dist.map_prompts(lambda c, k, a: _sweep(model, c, k, a, args.chunk), clean, corrupt, answers)
        elif args.job == "sae":
            sae = _sae_train(data, args, args.steps)
        else:
            _collect(model, args, out / "store", ranks=True)
        elapsed = torch.tensor(time.perf_counter() - start)
        if dist.is_distributed():
            torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
        if dist.is_main():
            if args.job == "patch":
                result.save(out / "result.safetensors")  # type: ignore[attr-defined]
            elif args.job == "sae":
                save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, str(out / "sae.safetensors"))
            (out / "time.json").write_text(json.dumps({"job_s": float(elapsed)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", choices=["patch", "sae", "collect"], default="patch")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200, help="SAE training steps (--job sae)")
    parser.add_argument("--batch", type=int, default=4096, help="SAE global batch in tokens (--job sae)")
    parser.add_argument("--tokens", type=int, default=65_536, help="activations to train on (--job sae)")
    parser.add_argument("--rows", type=int, default=256, help="token rows to collect (--job collect)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--pos", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="threads per rank")
    parser.add_argument(
        "--baseline-threads", type=int, default=0, help="threads of the one process (0: ranks x threads)"
    )
    parser.add_argument("--role", default="main", help=argparse.SUPPRESS)
    parser.add_argument("--folder", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == WORKER:
        worker(args)
        return

    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        _compare_ranks(args, Path(tmp))


def _compare_ranks(args: argparse.Namespace, work: Path) -> None:
    """Time the job in one process, then on `args.ranks` torchrun ranks, in `work`; print both and the gap."""
    folder, out = work / "model", work / "out"
    out.mkdir()
    _model_folder(args, folder)
    print(f"random GPT-2: {args.layers} layers, d_model {args.d_model}; job {args.job}")

    baseline_threads = args.baseline_threads or args.threads * args.ranks
    torch.set_num_threads(baseline_threads)
    one, single, compare = _baseline(args, folder, work)

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}"]
    worker_args = [__file__, "--role", WORKER, "--folder", str(folder), "--out", str(out)]
    names = ("job", "prompts", "layers", "d_model", "heads", "vocab", "pos", "chunk", "threads")
    for name in (*names, "steps", "batch", "tokens", "rows"):
        worker_args += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    start = time.perf_counter()
    proc = subprocess.run([*command, *worker_args], capture_output=True, text=True, env={**os.environ})
    launch = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"torchrun failed:\n{proc.stderr[-3000:]}")
    elapsed = json.loads((out / "time.json").read_text())["job_s"]
    diff, what = compare(single, out)
    print(f"one process ({baseline_threads} thread(s)):     {one:8.2f} s  (baseline)")
    print(f"{args.ranks} ranks x {args.threads} thread(s), job only:    {elapsed:8.2f} s  {one / elapsed:5.2f}x")
    print(f"{args.ranks} ranks, whole torchrun launch:   {launch:8.2f} s  {one / launch:5.2f}x")
    print(f"max |ranks - one process| = {diff:.1e} over {what}")


def _baseline(args: argparse.Namespace, folder: Path, work: Path) -> tuple[float, Any, Any]:
    """The job in this process: (seconds, result, compare(result, out) -> (max difference, what))."""
    from safetensors.torch import load_file

    from mechscope.features.store import ActivationStore
    from mechscope.model.loading import load_model
    from mechscope.results import Result

    if args.job == "sae":
        data = _sae_data(args)
        _sae_train(data, args, 2)  # warm-up
        start = time.perf_counter()
        sae = _sae_train(data, args, args.steps)
        one = time.perf_counter() - start

        def compare_sae(single: Any, out: Path) -> tuple[float, str]:
            got = load_file(out / "sae.safetensors")
            ref = single.state_dict()
            return max(float((got[k] - ref[k]).abs().max()) for k in ref), f"the weights after {args.steps} steps"

        return one, sae, compare_sae
    model = load_model(folder)
    if args.job == "collect":
        _collect(model, args, work / "warm", ranks=False)
        start = time.perf_counter()
        store = _collect(model, args, work / "one", ranks=False)
        one = time.perf_counter() - start
        site = f"blocks.{args.layers - 1}.hook_resid_post"

        def compare_store(single: Any, out: Path) -> tuple[float, str]:
            got = ActivationStore(out / "store").activations(site)
            ref = single.activations(site)
            return float((got - ref).abs().max()), f"{ref.shape[0]} stored activations (same order)"

        return one, store, compare_store
    clean, corrupt, answers = _inputs(args)
    _sweep(model, clean[:2], corrupt[:2], answers[:2], args.chunk)  # warm-up
    start = time.perf_counter()
    single = _sweep(model, clean, corrupt, answers, args.chunk)
    one = time.perf_counter() - start

    def compare_patch(single: Any, out: Path) -> tuple[float, str]:
        gathered = Result.load(out / "result.safetensors")
        return float((gathered["metric"] - single["metric"]).abs().max()), f"{single['metric'].numel()} cells"

    return one, single, compare_patch


if __name__ == "__main__":
    main()
