"""``mechscope zoo train``: train an organism from its recipe on CPU, resumable, with a JSONL log.

Plain PyTorch on an HF model: AdamW, linear warm-up then cosine decay to 10 %, gradient clipping at 1.
Determinism: weights come from ``torch.manual_seed(recipe.seed)``, batches from (seed, step) alone, and
dropout is off, so a resumed run continues exactly where the interrupted one stopped (up to float
non-associativity across thread counts).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.zoo.checkpoint import load_checkpoint, save_checkpoint
from mechscope.zoo.organisms import Recipe, build_config
from mechscope.zoo.stream import IGNORE, Batch


@dataclass(frozen=True)
class TrainOptions:
    """Where a run lives and how it runs.

    ``steps`` overrides the recipe's total (smoke tests); ``stop_at`` ends this session early after a
    checkpoint, as an interruption would, keeping the schedule of the full run.
    """

    corpus: Path
    run_dir: Path
    tokenizer_dir: Path
    resume: bool = False
    threads: int | None = None
    steps: int | None = None
    stop_at: int | None = None
    progress: bool = True
    init_dir: Path | None = None  # folder of the recipe's warm-start weights (required when it has one)

    def __post_init__(self) -> None:
        for name in ("threads", "steps", "stop_at"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer (or unset for the default); got {value!r}")


def build_model(recipe: Recipe, vocab_size: int):
    """A freshly initialised HF model for `recipe` (MLPs zeroed and frozen when attention-only)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(build_config(recipe, vocab_size))
    if recipe.attention_only:
        blocks = model.transformer.h if recipe.architecture == "gpt2" else model.model.layers
        for block in blocks:
            for p in block.mlp.parameters():
                torch.nn.init.zeros_(p)
                p.requires_grad_(False)
    return model


def warm_start(model, recipe: Recipe, init_dir: Path | None) -> None:
    """Load the recipe's warm-start weights into `model` (in place) after checking their sha256."""
    from transformers import AutoModelForCausalLM

    from mechscope.errors import ConfigError, CorruptWeightsError
    from mechscope.zoo.corpus import sha256_file

    ws = recipe.warm_start
    if ws is None:
        return
    if init_dir is None or not (Path(init_dir) / "model.safetensors").is_file():
        folder = f"src/mechscope/zoo/models/{recipe.name}"
        raise ConfigError(
            f"recipe {recipe.name!r} continues {ws.version}; expected its folder (config.json + model.safetensors) "
            f"as init_dir, got {init_dir}. Extract it with: for f in config.json model.safetensors; do "
            f"git show {ws.commit}:{folder}/$f > DIR/$f; done"
        )
    digest = sha256_file(Path(init_dir) / "model.safetensors")
    if digest != ws.sha256:
        raise CorruptWeightsError(
            f"expected {ws.version} weights with sha256 {ws.sha256} in {init_dir}, got sha256 {digest}"
        )
    source = AutoModelForCausalLM.from_pretrained(str(init_dir))
    model.load_state_dict(source.state_dict())  # strict: same architecture and shapes or a clear error


def lr_at(step: int, recipe: Recipe, total: int) -> float:
    """Learning rate at `step`: linear warm-up, then cosine decay to 10 % of the peak."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, total - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def step_loss(model, batch: Batch) -> Tensor:
    """Mean next-token loss over every scored position of `batch`, back-propagated part by part."""
    scored = max(1, batch.scored)
    total = torch.zeros(())
    for ids, labels in batch.parts:
        logits = model(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
        )
        (loss / scored).backward()
        total += loss.detach() / scored
    return total


def train(recipe: Recipe, opts: TrainOptions, on_log: Callable[[dict], None] | None = None):
    """Train (or resume) `recipe`; returns (model, tokenizer, summary dict)."""
    from tqdm.auto import tqdm

    from mechscope.zoo.stream import BatchStream
    from mechscope.zoo.tokenizer import load_tokenizer

    torch.set_num_threads(opts.threads or max(1, min(2, os.cpu_count() or 1)))
    run_dir = Path(opts.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(opts.tokenizer_dir)
    model = build_model(recipe, len(tokenizer))
    warm_start(model, recipe, opts.init_dir)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.95),
    )
    total = int(opts.steps or recipe.total_steps)
    state = {"step": 0, "elapsed_s": 0.0, "tokens": 0}
    log_path = run_dir / "train_log.jsonl"
    if opts.resume:
        state = load_checkpoint(run_dir, model, optimizer) or state
    elif log_path.exists():
        log_path.unlink()
    streams: dict[int, BatchStream] = {}  # one per stage, built when the run reaches it
    start_step, t0, base_elapsed = int(state["step"]), time.perf_counter(), state["elapsed_s"]
    bar = tqdm(total=total, initial=start_step, desc=recipe.name, disable=not opts.progress, mininterval=2.0)
    with log_path.open("a") as log:
        for step in range(start_step, total):
            first, stage = recipe.stage_at(step)
            stage_total = min(total, first + stage.steps) - first  # a --steps override shortens the last stage
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step - first, stage, stage_total)
            if first not in streams:
                streams.clear()
                streams[first] = BatchStream(stage, tokenizer, opts.corpus)
            batch = streams[first].batch(step)
            optimizer.zero_grad(set_to_none=True)
            loss = step_loss(model, batch)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            state = {
                "step": step + 1,
                "elapsed_s": base_elapsed + time.perf_counter() - t0,
                "tokens": state["tokens"] + batch.tokens,
            }
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if (step + 1) % 20 == 0 or step + 1 == total:
                row = {**state, "loss": round(loss.item(), 4), "lr": optimizer.param_groups[0]["lr"]}
                log.write(json.dumps(row) + "\n")
                log.flush()
                if on_log:
                    on_log(row)
            stopping = opts.stop_at is not None and step + 1 >= opts.stop_at
            if (step + 1) % stage.checkpoint_every == 0 or step + 1 == total or stopping:
                save_checkpoint(run_dir, model, optimizer, state)
            if stopping:
                break
    bar.close()
    model.eval()
    summary = {
        "steps": state["step"],
        "tokens": state["tokens"],
        "wall_time_s": round(state["elapsed_s"], 1),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    return model, tokenizer, summary
