"""A data-parallel job for ``torchrun`` (run by tests/scale/test_distributed.py and scripts/gpu_check.sh):
a head-patching sweep and an AtP sweep split across ranks and gathered, per-row activations gathered, and
one activation store collected by every rank (each writes its own shards; one manifest).

    torchrun --standalone --nproc_per_node 2 tests/scale/dist_job.py MODEL_FOLDER OUT_FOLDER
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
from pathlib import Path

import torch

from mechscope.features.store.distributed import collect_store_distributed
from mechscope.locate import activation_patch, attribution_patch
from mechscope.locate.metrics import logit_diff
from mechscope.model import distributed as dist
from mechscope.model.loading import load_model
from mechscope.results import Result

N_PROMPTS = 5  # uneven on 2 ranks: 3 + 2
SITE = "blocks.0.hook_resid_post"
SEQ_LEN = 8
TEXTS = [f"Sentence number {i} is about the cat and the mat, then the dog." for i in range(12)]


def prompts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean and corrupt token rows and each row's (answer, wrong answer) token ids."""
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(4, 100, (N_PROMPTS, 7), generator=gen)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(4, 100, (N_PROMPTS,), generator=gen)
    answers = torch.randint(4, 100, (N_PROMPTS, 2), generator=gen)
    return clean, corrupt, answers


def metric(answers: torch.Tensor):  # per-row targets travel with their rows: shard them like the prompts
    return lambda logits: logit_diff(logits, answers[:, 0], answers[:, 1])


class RowActivations(Result):
    """Per-prompt activations (batch first), for the row-gathering check."""

    method = "test_row_activations"


def main(model_folder: str, out: str) -> None:
    torch.set_num_threads(1)
    out_dir = Path(out)
    device = torch.device(os.environ.get("MECHSCOPE_TEST_DEVICE", "cpu"))
    # nccl wants one GPU per rank; CPU runs (and several ranks sharing one GPU in tests) use gloo
    backend = "nccl" if device.type == "cuda" and torch.cuda.device_count() >= dist.world_size_from_env() else "gloo"
    with dist.process_group(backend):
        model = load_model(model_folder, device=dist.local_device() if device.type == "cuda" else device)
        clean, corrupt, answers = prompts()
        patch = dist.map_prompts(
            lambda c, k, a: activation_patch(model, c, k, "heads", metric(a)), clean, corrupt, answers
        )
        atp = dist.map_prompts(lambda c, k, a: attribution_patch(model, c, k, metric(a)), clean, corrupt, answers)

        def rows(c: torch.Tensor) -> Result:
            _, cache = model.run_with_cache(c, ["blocks.1.hook_resid_post"])
            return RowActivations(
                tensors={"acts": cache["blocks.1.hook_resid_post"].cpu()}, axes={"acts": ("batch", "pos", "d_model")}
            )

        gathered = dist.map_prompts(rows, clean, combine="rows")
        # Activation collection: blocks of token rows dealt to the ranks, one store, one manifest.
        store = collect_store_distributed(
            model, SITE, TEXTS, out_dir / "store", dtype="fp32", seq_len=SEQ_LEN, rows_per_shard=4
        )
        dist.barrier()
        if dist.is_main():
            patch.save(out_dir / "patch.safetensors")
            atp.save(out_dir / "atp.safetensors")
            gathered.save(out_dir / "rows.safetensors")
            info = {"world_size": dist.world_size(), "patch_config": patch.config}
            (out_dir / "info.json").write_text(json.dumps(info))
        assert store.complete


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
