"""A head-patching sweep over many prompts in one process vs split across ranks by torchrun (gloo on CPU, nccl
with GPUs), with the ratio to the one-process baseline measured in the same run and the largest difference
between the gathered and the one-process result.

    python benchmarks/bench_distributed.py --ranks 2 --prompts 32

Two times are printed for the ranks: the sweep alone (slowest rank, from its own clock, gather included) and
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


def _sweep(model: object, clean: torch.Tensor, corrupt: torch.Tensor, answers: torch.Tensor, chunk: int) -> object:
    from mechscope.locate import activation_patch
    from mechscope.locate.metrics import logit_diff

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logit_diff(logits, answers[:, 0], answers[:, 1])

    return activation_patch(model, clean, corrupt, "heads", metric, chunk_size=chunk)  # type: ignore[arg-type]


def worker(args: argparse.Namespace) -> None:
    """One rank: load, sweep its share, gather; rank 0 writes the result and the timing."""
    from mechscope.model import distributed as dist
    from mechscope.model.loading import load_model

    torch.set_num_threads(args.threads)
    with dist.process_group():
        model = load_model(args.folder, device=dist.local_device())
        clean, corrupt, answers = _inputs(args)
        _sweep(model, clean[:2], corrupt[:2], answers[:2], args.chunk)  # warm-up, as the baseline's
        dist.barrier()
        start = time.perf_counter()
        result = dist.map_prompts(lambda c, k, a: _sweep(model, c, k, a, args.chunk), clean, corrupt, answers)
        elapsed = torch.tensor(time.perf_counter() - start)
        if dist.is_distributed():
            torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
        if dist.is_main():
            result.save(Path(args.out) / "result.safetensors")  # type: ignore[attr-defined]
            (Path(args.out) / "time.json").write_text(json.dumps({"sweep_s": float(elapsed)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
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

    from mechscope.locate import PatchResult
    from mechscope.model.loading import load_model
    from mechscope.results import Result

    work = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    folder, out = work / "model", work / "out"
    out.mkdir()
    _model_folder(args, folder)
    print(f"random GPT-2: {args.layers} layers, d_model {args.d_model}; {args.prompts} prompts x {args.pos} tokens")

    baseline_threads = args.baseline_threads or args.threads * args.ranks
    torch.set_num_threads(baseline_threads)
    model = load_model(folder)
    clean, corrupt, answers = _inputs(args)
    _sweep(model, clean[:2], corrupt[:2], answers[:2], args.chunk)  # warm-up
    start = time.perf_counter()
    single = _sweep(model, clean, corrupt, answers, args.chunk)
    one = time.perf_counter() - start
    assert isinstance(single, PatchResult)

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}"]
    worker_args = [__file__, "--role", WORKER, "--folder", str(folder), "--out", str(out)]
    for name in ("prompts", "layers", "d_model", "heads", "vocab", "pos", "chunk", "threads"):
        worker_args += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    start = time.perf_counter()
    proc = subprocess.run([*command, *worker_args], capture_output=True, text=True, env={**os.environ})
    launch = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"torchrun failed:\n{proc.stderr[-3000:]}")
    sweep = json.loads((out / "time.json").read_text())["sweep_s"]
    gathered = Result.load(out / "result.safetensors")
    diff = float((gathered["metric"] - single["metric"]).abs().max())
    print(f"one process ({baseline_threads} thread(s)):     {one:8.2f} s  (baseline)")
    print(f"{args.ranks} ranks x {args.threads} thread(s), sweep only:  {sweep:8.2f} s  {one / sweep:5.2f}x")
    print(f"{args.ranks} ranks, whole torchrun launch:   {launch:8.2f} s  {one / launch:5.2f}x")
    print(f"max |gathered - one process| = {diff:.1e} over {single['metric'].numel()} cells")


if __name__ == "__main__":
    main()
