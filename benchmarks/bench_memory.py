"""Peak memory of the long jobs -- caching every site, batched head patching, SAE training -- at two model
sizes and two batch sizes, so users can see how cost grows, plus the memory knob of each job.

Every case runs in a fresh Python process (one job per process, nothing left from another case). The
process builds its model and inputs, runs a small warm-up, collects garbage, hands free heap pages back to
the OS (``malloc_trim``: memory freed but kept by the allocator would otherwise hide the job's), resets the
kernel's peak-RSS counter (writing 5 to ``/proc/self/clear_refs`` resets ``VmHWM``, the counter that
``getrusage``'s ``ru_maxrss`` reads) and records its resident set; it then runs the job once and reads
``VmHWM``. The job's peak is ``VmHWM`` minus the resident set before it: all memory the job touched at its
worst moment (tensors, allocator slack, autograd buffers), which ``tracemalloc`` cannot see (torch allocates
outside Python's allocator). Where the counter cannot be reset, RSS is sampled every millisecond by a
thread instead (said in the output).

Ratios are to the same job's smallest case (small model, small batch) of the same run. A second table
shows each job's knob: patching's ``chunk_size``, caching a subset of positions (with and without the
per-head ``hook_result`` sites), and the SAE batch size.

    python benchmarks/bench_memory.py            # ~5 min on 2 CPU cores
    python benchmarks/bench_memory.py --quick    # one size, for a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: model name -> GPT-2 config (random weights; vocabulary 4096 so the unembedding counts as in real models).
MODELS: dict[str, dict[str, Any]] = {
    "small": {"n_layer": 4, "n_embd": 256, "n_head": 8},
    "large": {"n_layer": 8, "n_embd": 512, "n_head": 8},
}
VOCAB = 4096
#: job -> (small batch, large batch): token rows of 64 (cache), prompts of 32 tokens (patch), tokens (sae).
BATCHES = {"cache": (4, 16), "patch": (2, 8), "sae": (1024, 4096)}
#: job -> the knob varied in the second table (on the large model, large batch) and its values.
KNOBS: dict[str, tuple[str, list[Any]]] = {
    "patch": ("chunk_size", [32, 4]),
    "cache": ("positions", ["all", "last", "last-noresult"]),
    "sae": ("batch_size", [4096, 512]),
}


# One case, in its own process -------------------------------------------------------------------------------
def _status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) * 1024 if match else 0


class _Peak:
    """Peak resident memory over a block: the kernel's reset counter, or 1 ms sampling where not resettable."""

    def __enter__(self) -> _Peak:
        gc.collect()
        _trim()  # freed memory of the setup and warm-up goes back to the OS, so it cannot hide the job's
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM reset"
        except OSError:
            self.method = "RSS sampled every 1 ms"
            self._stop = threading.Event()
            self._max = 0
            self._thread = threading.Thread(target=self._sample, daemon=True)
        self.before = _status("VmRSS")
        if self.method.startswith("RSS"):
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _status("VmRSS"))
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self.method.startswith("RSS"):
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, _status("VmRSS"))
        else:
            self.peak = _status("VmHWM")


def _trim() -> None:
    """glibc's ``malloc_trim(0)``: return free heap pages to the OS (no-op elsewhere)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _model(name: str) -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from mechscope.model.hooked import HookedModel

    torch.manual_seed(0)
    config = GPT2Config(**MODELS[name], vocab_size=VOCAB, n_positions=128, bos_token_id=0, eos_token_id=0)
    return HookedModel(GPT2LMHeadModel(config).eval())


def _case(job: str, model_name: str, batch: int, knob: Any) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    out: dict[str, Any] = {}
    if job == "cache":
        model = _model(model_name)
        tokens = torch.randint(0, VOCAB, (batch, 64), generator=gen)
        positions = None if knob in (None, "all") else [-1]
        # "last-noresult": every site but hook_result (per-head outputs, [batch, pos, head, d_model] per layer)
        sites = [s for s in model._inventory if not s.kind.endswith("hook_result")] if knob == "last-noresult" else None
        model.run_with_cache(tokens[:1, :8], sites, positions=positions)  # warm-up (lazy initialisation)
        with _Peak() as peak:
            _, cache = model.run_with_cache(tokens, sites, positions=positions)
            out["data_bytes"] = sum(t.numel() * t.element_size() for t in cache.values())
    elif job == "patch":
        from mechscope.locate import activation_patch
        from mechscope.locate.metrics import logit_diff

        model = _model(model_name)
        clean = torch.randint(0, VOCAB, (batch, 32), generator=gen)
        corrupt = clean.clone()
        corrupt[:, 16] = torch.randint(0, VOCAB, (batch,), generator=gen)
        answers = torch.randint(0, VOCAB, (batch, 2), generator=gen)

        def metric(logits: torch.Tensor) -> torch.Tensor:
            return logit_diff(logits, answers[:, 0], answers[:, 1])

        chunk = 32 if knob is None else int(knob)
        activation_patch(model, clean[:, :4], corrupt[:, :4], "heads", metric, chunk_size=chunk)  # warm-up
        with _Peak() as peak:
            result = activation_patch(model, clean, corrupt, "heads", metric, chunk_size=chunk)
        out["data_bytes"] = sum(t.numel() * t.element_size() for t in result.tensors.values())
    else:
        from mechscope.features.sae import SAEConfig
        from mechscope.features.train import SAETrainConfig, train_sae

        d_model = MODELS[model_name]["n_embd"]
        data = torch.randn(16_384, d_model, generator=gen)
        config = SAEConfig(d_in=d_model, d_sae=8 * d_model, activation="topk", k=32)
        size = batch if knob is None else int(knob)
        train_sae(data, config, SAETrainConfig(steps=2, batch_size=8, warmup=1))  # warm-up (code paths only)
        with _Peak() as peak:
            train_sae(data, config, SAETrainConfig(steps=20, batch_size=size, warmup=2))
        out["data_bytes"] = 4 * (2 * d_model * 8 * d_model) * 4  # W_enc + W_dec, grads and Adam's two moments
    return {**out, "before": peak.before, "peak": peak.peak, "job": peak.peak - peak.before, "method": peak.method}


def _worker(args: argparse.Namespace) -> None:
    knob = None if args.knob == "-" else args.knob
    print(json.dumps(_case(args.job, args.model, args.batch, knob)))


# The driver ---------------------------------------------------------------------------------------------
def _run(job: str, model: str, batch: int, knob: Any = None) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", job, model, str(batch), "-" if knob is None else str(knob)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model only, no knob table")
    parser.add_argument("--worker", nargs=4, metavar=("JOB", "MODEL", "BATCH", "KNOB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job, model, batch, knob = args.worker
        _worker(argparse.Namespace(job=job, model=model, batch=int(batch), knob=knob))
        return
    models = ["small"] if args.quick else list(MODELS)
    print(f"models: {', '.join(f'{k} {v}' for k, v in MODELS.items() if k in models)}, vocab {VOCAB}; 1 thread")
    print("job peak = peak resident memory during the job minus resident memory before it (fresh process per case)")
    print(f"{'job':6} {'model':6} {'batch':>6} {'before MiB':>10} {'job peak MiB':>12} {'data MiB':>9} {'ratio':>6}")
    method = ""
    for job, sizes in BATCHES.items():
        base = None
        for model in models:
            for batch in sizes:
                got = _run(job, model, batch)
                base = base or max(got["job"], 1)
                method = got["method"]
                print(
                    f"{job:6} {model:6} {batch:6d} {_mib(got['before']):>10} {_mib(got['job']):>12} "
                    f"{_mib(got['data_bytes']):>9} {got['job'] / base:6.2f}x"
                )
    print("batch: token rows of 64 (cache), prompt pairs of 32 tokens (patch), tokens per step (sae)")
    print("data: cached tensors (cache), the result (patch), SAE weights + grads + Adam moments (sae)")
    print(f"peak measured by: {method}")
    if args.quick:
        return
    print("\nknobs (large model, large batch):")
    for job, (name, values) in KNOBS.items():
        rows = [_run(job, "large", BATCHES[job][1], value) for value in values]
        for value, got in zip(values, rows, strict=True):
            print(
                f"{job:6} {name}={value!s:5} job peak {_mib(got['job'])} MiB "
                f"({got['job'] / max(rows[0]['job'], 1):.2f}x of {name}={values[0]})"
            )


if __name__ == "__main__":
    main()
