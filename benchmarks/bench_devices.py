"""Forward, caching every residual site, batched head patching, AtP and SAE training steps on each device and
dtype available, with the ratio to the CPU fp32 baseline measured in the same run.

    python benchmarks/bench_devices.py                      # CPU fp32/bf16 (+ CUDA fp32/bf16 when present)
    python benchmarks/bench_devices.py --layers 12 --d-model 768 --batch 8 --pos 128   # GPT-2-small size

Each figure is the fastest of --repeats timed runs after one warm-up (CUDA timings synchronise). The same
seed builds the same random GPT-2 on every device; the patching and AtP results are checked against CPU fp32
(max absolute difference printed), so a fast wrong answer cannot pass unnoticed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from common import add_model_options, best_of


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _model(args: argparse.Namespace, device: str, dtype: torch.dtype) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    from mechscope.model.loading import load_model

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
    return load_model(GPT2LMHeadModel(config).eval(), dtype=dtype, device=device)


def _measure(args: argparse.Namespace, device: str, dtype: torch.dtype) -> dict[str, Any]:
    from mechscope.features import train_sae
    from mechscope.features.sae import SAEConfig
    from mechscope.features.train import SAETrainConfig
    from mechscope.locate import activation_patch, attribution_patch
    from mechscope.locate.metrics import logit_diff

    model = _model(args, device, dtype)
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(0, args.vocab, (args.batch, args.pos), generator=gen)
    corrupt = clean.clone()
    corrupt[:, args.pos // 2] = torch.randint(0, args.vocab, (args.batch,), generator=gen)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logit_diff(logits, 5, 6)

    sites = [f"blocks.{layer}.hook_resid_post" for layer in range(args.layers)]
    out: dict[str, Any] = {}

    def timed(name: str, fn: Any) -> Any:
        result = fn()  # warm-up (kernels, allocator)
        _sync(device)

        def run() -> None:
            fn()
            _sync(device)

        out[name] = best_of(run, args.repeats)
        return result

    with torch.no_grad():
        timed("forward", lambda: model(clean))
        timed("cache resid", lambda: model.run_with_cache(clean, sites))
    patch = timed("head patching", lambda: activation_patch(model, clean, corrupt, "heads", metric))
    atp = timed("AtP", lambda: attribution_patch(model, clean, corrupt, metric))
    out["patch"], out["atp"] = patch["metric"].float().cpu(), atp["heads"].float().cpu()
    x = torch.randn(args.sae_tokens, args.d_model, generator=gen).to(device)
    sae_cfg = SAEConfig(d_in=args.d_model, d_sae=args.d_model * 8, activation="topk", k=32)
    train_cfg = SAETrainConfig(steps=args.sae_steps, batch_size=1024, warmup=1)
    try:
        timed("SAE steps", lambda: train_sae(x, sae_cfg, train_cfg))
    except Exception as exc:  # report what does not run on this device rather than hide it
        out["SAE steps"] = f"fails: {type(exc).__name__}: {str(exc)[:80]}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser, batch=4)
    parser.set_defaults(layers=4, d_model=256, heads=8, vocab=8192, pos=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sae-tokens", type=int, default=8192)
    parser.add_argument("--sae-steps", type=int, default=10)
    parser.add_argument("--devices", default="cpu,cuda", help="comma-separated; cuda is skipped without a GPU")
    parser.add_argument(
        "--cpu-dtypes",
        default="fp32,bf16",
        help="dtypes run on the CPU (fp32 is the baseline and always runs): 'fp32' alone skips CPU bf16, "
        "which CPUs without bf16 arithmetic run 2-3x slower than fp32 and which costs minutes at GPT-2 size",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    known = {"fp32": torch.float32, "bf16": torch.bfloat16}
    wrong = [name for name in args.cpu_dtypes.split(",") if name not in known]
    if wrong:
        parser.error(f"--cpu-dtypes takes fp32 and bf16, comma-separated; got {', '.join(wrong)}")
    cpu_dtypes = [torch.float32, *(known[n] for n in args.cpu_dtypes.split(",") if n != "fp32")]
    devices = [d for d in args.devices.split(",") if d == "cpu" or (d.startswith("cuda") and torch.cuda.is_available())]
    runs = [(d, dt) for d in dict.fromkeys(["cpu", *devices]) for dt in (cpu_dtypes if d == "cpu" else known.values())]
    print(f"random GPT-2: {args.layers} layers, d_model {args.d_model}, batch {args.batch} x {args.pos}")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name(0)}")
    results = {run: _measure(args, *run) for run in runs}
    base = results["cpu", torch.float32]
    names = ["forward", "cache resid", "head patching", "AtP", "SAE steps"]
    print(f"{'device':8} {'dtype':9} " + " ".join(f"{n:>22}" for n in names) + "   max |diff| vs cpu fp32 (patch, AtP)")
    for (device, dtype), res in results.items():
        cells = []
        for n in names:
            value = res[n]
            if isinstance(value, str) or isinstance(base[n], str):
                cells.append(f"{str(value)[:22]:>22}")
            else:
                cells.append(f"{value * 1e3:9.1f} ms {base[n] / value:7.1f}x")
        diffs = [float((res[k] - base[k]).abs().max()) for k in ("patch", "atp")]
        label = str(dtype).removeprefix("torch.")
        print(f"{device:8} {label:9} " + " ".join(cells) + f"   {diffs[0]:.1e}, {diffs[1]:.1e}")


if __name__ == "__main__":
    main()
