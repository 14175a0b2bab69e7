"""A data-parallel features job for ``torchrun`` (run by tests/scale/test_distributed_features.py): one
activation store collected by every rank, SAEs trained with DistributedDataParallel on a tensor (each
architecture) and on the store (with a checkpoint). Every rank saves the weights it ends with.

    torchrun --standalone --nproc_per_node 2 tests/scale/dist_features_job.py MODEL_FOLDER OUT_FOLDER

``MECHSCOPE_TEST_DEVICE=cuda`` (scripts/gpu_check.sh) runs the model and the training on each rank's GPU
(nccl for the job when every rank has one; the SAE's collectives use gloo, which takes CUDA tensors).

Test hooks (environment): ``MECHSCOPE_TEST_DIE=rank:shards`` SIGKILLs that rank once it has written that
many shards; ``MECHSCOPE_TEST_STOP_AT=step`` interrupts training on every rank right after the checkpoint
of that step is written, and the job trains again with the same checkpoint path (resuming).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import signal
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mechscope.features import train as train_module
from mechscope.features.sae import SAEConfig
from mechscope.features.store import writer
from mechscope.features.store.distributed import collect_store_distributed
from mechscope.features.train import SAETrainConfig, checkpoint_info, train_sae
from mechscope.model import distributed as dist
from mechscope.model.loading import load_model

SITE = "blocks.0.hook_resid_post"
SEQ_LEN = 8
ROWS_PER_SHARD = 4
TEXTS = [f"Sentence number {i} is about the cat and the mat, then the dog." for i in range(12)]
D_IN, D_SAE = 16, 32
#: name -> (SAE config, training config) of the SAEs trained on a tensor; "topk-aux" has features that die
#: (a wide dictionary, k = 2), so the AuxK loss and the dead masks are exercised across ranks.
TENSOR_RUNS: dict[str, tuple[SAEConfig, SAETrainConfig]] = {
    name: (
        SAEConfig(d_in=D_IN, d_sae=d_sae, activation=activation, k=k),
        SAETrainConfig(steps=40, batch_size=32, lr=3e-3, warmup=5, dead_steps=dead, log_every=5, seed=3),
    )
    for name, activation, k, d_sae, dead in [
        ("relu", "relu", None, D_SAE, 10),
        ("topk", "topk", 4, D_SAE, 10),
        ("topk-aux", "topk", 2, 8 * D_SAE, 3),
        ("jumprelu", "jumprelu", None, D_SAE, 10),
        ("batchtopk", "batchtopk", 4, D_SAE, 10),
    ]
}
STORE_TRAIN = SAETrainConfig(
    steps=20, batch_size=16, lr=3e-3, warmup=3, dead_steps=5, log_every=5, checkpoint_every=10, scale_batches=2
)


def store_sae_config(d_model: int) -> SAEConfig:
    return SAEConfig(d_in=d_model, d_sae=2 * d_model, activation="topk", k=4, site=SITE)


def tensor_data() -> torch.Tensor:
    """Activations with a planted sparse structure (so features fire and die like real ones)."""
    gen = torch.Generator().manual_seed(0)
    atoms = torch.randn(24, D_IN, generator=gen)
    codes = torch.rand(600, 24, generator=gen) * (torch.rand(600, 24, generator=gen) < 0.15)
    return codes @ atoms + 0.05 * torch.randn(600, D_IN, generator=gen)


def _die_after_shards() -> None:
    spec = os.environ.get("MECHSCOPE_TEST_DIE")
    if not spec or int(spec.split(":")[0]) != dist.rank():
        return
    limit, written, original = int(spec.split(":")[1]), [0], writer._write_shard

    def write_then_maybe_die(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        written[0] += 1
        if written[0] >= limit:
            os.kill(os.getpid(), signal.SIGKILL)

    writer._write_shard = write_then_maybe_die  # type: ignore[assignment]


class Interrupted(Exception):
    """Raised on every rank by the MECHSCOPE_TEST_STOP_AT hook."""


def _interrupt_after_checkpoint() -> None:
    """Every rank stops training at the start of step `MECHSCOPE_TEST_STOP_AT` (after rank 0 wrote that step's
    checkpoint: the barrier waits for it), as a job interrupted there would."""
    spec = os.environ.get("MECHSCOPE_TEST_STOP_AT")
    if not spec:
        return
    original = train_module._StepLoss.forward

    def forward_or_stop(self: Any, x: torch.Tensor, y: torch.Tensor, state: Any) -> torch.Tensor:
        if state.step == int(spec):
            train_module._StepLoss.forward = original  # type: ignore[method-assign]
            dist.barrier()
            raise Interrupted
        return original(self, x, y, state)

    train_module._StepLoss.forward = forward_or_stop  # type: ignore[method-assign]


def _save(sae: torch.nn.Module, path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}, str(path))


def main(model_folder: str, out: str) -> None:
    torch.set_num_threads(1)
    out_dir = Path(out)
    rank = f"rank{int(os.environ.get('RANK', '0'))}"
    device = torch.device(os.environ.get("MECHSCOPE_TEST_DEVICE", "cpu"))
    gpus = device.type == "cuda" and torch.cuda.device_count() >= dist.world_size_from_env()
    with dist.process_group("nccl" if gpus else "gloo"):
        where = dist.local_device() if device.type == "cuda" else device
        model = load_model(model_folder, device=where)
        _die_after_shards()
        store = collect_store_distributed(
            model, SITE, TEXTS, out_dir / "store", dtype="fp32", seq_len=SEQ_LEN, rows_per_shard=ROWS_PER_SHARD
        )
        if not os.environ.get("MECHSCOPE_TEST_SKIP_TENSOR"):
            x = tensor_data()
            for name, (config, cfg) in TENSOR_RUNS.items():
                sae, log = train_sae(x, config, cfg, device=where)
                _save(sae, out_dir / f"tensor-{name}-{rank}.safetensors")
                if dist.is_main():
                    (out_dir / f"tensor-{name}-log.json").write_text(json.dumps(log))
        _interrupt_after_checkpoint()
        config, checkpoint = store_sae_config(model.dims.d_model), out_dir / "ckpt.safetensors"
        try:
            sae, _ = train_sae(store, config, STORE_TRAIN, checkpoint=checkpoint, device=where)
        except Interrupted:
            if dist.is_main():
                (out_dir / "interrupted.json").write_text(json.dumps(checkpoint_info(checkpoint)["step"]))
            sae, _ = train_sae(store, config, STORE_TRAIN, checkpoint=checkpoint, device=where)  # resumes
        _save(sae, out_dir / f"store-{rank}.safetensors")
        dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
