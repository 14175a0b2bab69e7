"""SAE training throughput: mechscope's train_sae against a dense reference loop in the same run, and the
activation store's read throughput against what training consumes.

The reference is the training step SAELens and most SAE trainers run (dense encode, dense top-k mask,
dense decode ``f @ W_dec``, summed squared error, Adam, decoder renormalisation), written here in plain
PyTorch on the same activations, batch size and steps; and, where a Python with the real sae-lens package
is given (``--saelens-python``, default ``$MECHSCOPE_SAELENS_PYTHON``), SAELens's own training step
(``training_forward_pass`` + backward + Adam, without its data pipeline) on the same activations, for
TopK both with its dense decode and with ``use_sparse_activations``. mechscope's TopK step decodes
sparsely (``embedding_bag`` over the k active rows). Prints tokens/s and the ratios.

    python benchmarks/bench_sae.py                       # d_in 768, 6144 features, k 32, batch 4096
    python benchmarks/bench_sae.py --d-in 64 --d-sae 512 --batch 1024 --steps 200   # the small case
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_device_option, synchronize


def reference_steps(x: torch.Tensor, d_sae: int, k: int | None, l1: float, steps: int, batch: int) -> float:
    """Seconds for `steps` dense training steps (see the module docstring)."""
    d = x.shape[1]
    gen = torch.Generator().manual_seed(0)
    w_dec = torch.randn(d_sae, d, generator=gen).to(x.device)
    w_dec = (w_dec / w_dec.norm(dim=-1, keepdim=True)).requires_grad_(True)
    w_enc = w_dec.detach().T.clone().requires_grad_(True)
    b_enc = torch.zeros(d_sae, device=x.device, requires_grad=True)
    b_dec = torch.zeros(d, device=x.device, requires_grad=True)
    opt = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=1e-3)
    start = time.perf_counter()
    for _ in range(steps):
        rows = torch.randint(0, x.shape[0], (batch,), generator=gen)
        xb = x[rows]
        pre = (xb - b_dec) @ w_enc + b_enc
        if k is None:
            f = torch.relu(pre)
        else:
            top = pre.topk(k, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        recon = f @ w_dec + b_dec
        loss = (recon - xb).pow(2).sum(-1).mean()
        if k is None:
            loss = loss + l1 * (f * w_dec.norm(dim=-1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            w_dec.div_(w_dec.norm(dim=-1, keepdim=True))
    synchronize(x.device)
    return time.perf_counter() - start


def mechscope_steps(x: torch.Tensor, d_sae: int, k: int | None, l1: float, steps: int, batch: int) -> float:
    from mechscope.features import SAEConfig, SAETrainConfig, train_sae

    activation = "relu" if k is None else "topk"
    config = SAEConfig(d_in=x.shape[1], d_sae=d_sae, activation=activation, k=k)
    train = SAETrainConfig(steps=steps, batch_size=batch, lr=1e-3, l1_coefficient=l1, log_every=steps, scale_batches=1)
    synchronize(x.device)
    start = time.perf_counter()
    train_sae(x, config, train)  # on x's device
    synchronize(x.device)
    return time.perf_counter() - start


def store_read(x: torch.Tensor, batch: int) -> tuple[float, int]:
    """(seconds, rows) to stream one shuffled epoch of a bf16 store holding `x` (written with the store's
    own shard writer; the store is built from a token-free stand-in, so this measures reading only)."""
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        return _timed_store_read(x, batch, Path(tmp))


def _timed_store_read(x: torch.Tensor, batch: int, folder: Path) -> tuple[float, int]:
    """store_read's body, writing its store into `folder`."""
    from safetensors.torch import save

    from mechscope.features.store import ActivationStore
    from mechscope.features.store.manifest import Manifest, StoreSettings, shard_name
    from mechscope.features.store.writer import _write_bytes
    from mechscope.io import ModelInfo

    settings = StoreSettings(sites=("blocks.0.hook_resid_post",), dtype="bf16", seq_len=129, rows_per_shard=64)
    manifest = Manifest(settings, ModelInfo(fingerprint="bench"), {"blocks.0.hook_resid_post": x.shape[1]})
    import hashlib

    per_shard = 64 * 128
    for i, part in enumerate(x.split(per_shard)):
        rows = part.shape[0] // 128
        if rows == 0:
            break
        tensors = {
            "acts.blocks.0.hook_resid_post": part[: rows * 128].reshape(rows, 128, -1).bfloat16(),
            "tokens": torch.zeros(rows, 129, dtype=torch.int32),
        }
        data = save(tensors)
        _write_bytes(folder / shard_name(i), data)
        manifest.shards.append(
            {
                "file": shard_name(i),
                "rows": rows,
                "sha256": hashlib.sha256(data).hexdigest(),
                "tokens_sha256": "",
                "bytes": len(data),
            }
        )
    manifest.complete = True
    manifest.save(folder)
    store = ActivationStore(folder)
    start = time.perf_counter()
    n = sum(b.shape[0] for b in store.batches(batch, buffer_tokens=8 * per_shard))
    return time.perf_counter() - start, n


def saelens_steps(python: str, x_path: Path, arch: str, args: argparse.Namespace, sparse: bool) -> float | None:
    """Seconds for SAELens's own steps, or None when it fails (printed)."""
    script = Path(__file__).with_name("_saelens_steps.py")
    command = [python, str(script), str(x_path), arch, str(args.d_sae), str(args.k), str(args.steps)]
    command += [str(args.batch), str(args.threads), "1" if sparse else "0", str(args.repeats)]
    done = subprocess.run(
        command, capture_output=True, text=True, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    if done.returncode != 0:
        print(f"SAELens run failed: {done.stderr[-500:]}")
        return None
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=6144)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--archs", default="topk,relu", help="comma-separated: topk, relu")
    parser.add_argument("--saelens-python", default=os.environ.get("MECHSCOPE_SAELENS_PYTHON", ""))
    parser.add_argument(
        "--saelens-sparse", action="store_true", help="also SAELens's use_sparse_activations (fails on CPU torch)"
    )
    add_device_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x_cpu = torch.randn(args.tokens, args.d_in, generator=torch.Generator().manual_seed(0))
    x = x_cpu.to(args.device)
    tokens = args.steps * args.batch
    print(
        f"d_in {args.d_in}, d_sae {args.d_sae}, batch {args.batch}, {args.steps} steps, {args.threads} threads, "
        f"{args.device}"
    )
    runs = (("topk", args.k, 0.0), ("relu", None, 5.0 / args.d_in**0.5))
    for name, k, l1 in (run for run in runs if run[0] in args.archs.split(",")):
        reference_steps(x, args.d_sae, k, l1, 2, args.batch)  # warm-up
        mechscope_steps(x, args.d_sae, k, l1, 2, args.batch)
        ref = ours = float("inf")
        for _ in range(args.repeats):  # interleaved, best of: the least disturbed by other load
            ref = min(ref, reference_steps(x, args.d_sae, k, l1, args.steps, args.batch))
            ours = min(ours, mechscope_steps(x, args.d_sae, k, l1, args.steps, args.batch))
        print(
            f"{name:5s} dense reference {tokens / ref:10.0f} tok/s   mechscope {tokens / ours:10.0f} tok/s   "
            f"ratio {ref / ours:.2f}x"
        )
        if args.saelens_python:
            from safetensors.torch import save_file

            with tempfile.TemporaryDirectory(prefix="bench-sae-") as tmp:
                x_path = Path(tmp) / "x.safetensors"
                save_file({"x": x_cpu}, str(x_path))
                for sparse in (False, True) if k is not None and args.saelens_sparse else (False,):
                    theirs = saelens_steps(args.saelens_python, x_path, name, args, sparse)
                    if theirs is not None:
                        label = "SAELens" + (" (use_sparse_activations)" if sparse else "")
                        print(
                            f"      {label:34s} {tokens / theirs:10.0f} tok/s   "
                            f"mechscope / SAELens {theirs / ours:.2f}x"
                        )
    seconds, rows = store_read(x_cpu, args.batch)
    print(f"store read (bf16, shuffled): {rows / seconds:10.0f} tok/s = {rows / seconds / (tokens / ours):.1f}x "
          "what the last training above consumes")  # fmt: skip


if __name__ == "__main__":
    main()
