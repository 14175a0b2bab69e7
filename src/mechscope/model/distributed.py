"""Data parallelism over ``torch.distributed`` (started by ``torchrun``): rank helpers, input sharding,
gathering results. No scheduler of our own: torchrun starts the processes (one node or many, with its
rendezvous), this module splits the work by rank and collects it.

The jobs that parallelise this way are sweeps over prompts (activation patching, AtP, path patching, EAP)
and activation collection: every rank runs the same verb on its share of the rows, and the results are
combined -- averaged with row-count weights for metrics that average over prompts (every mechscope metric
does), or concatenated for per-row outputs. Gathered results equal the single-process ones up to float
reassociation (the batch mean is summed in another order).

Outside torchrun (no ``WORLD_SIZE`` in the environment, nothing initialised) everything here is the
identity: rank 0 of 1, the whole input, the local result. So code written with these helpers runs
unchanged in one process.

    torchrun --nproc_per_node 2 my_sweep.py        # gloo on CPU, nccl when CUDA is available
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import Tensor

from mechscope.errors import ConfigError, ShapeError
from mechscope.results import Result

T = TypeVar("T")


# Rank and world -----------------------------------------------------------------------------------------
def is_distributed() -> bool:
    """Whether a process group is initialised (this process is one rank of several, or of one)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the process that writes shared files and prints."""
    return rank() == 0


def default_backend() -> str:
    """``nccl`` when CUDA is available, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def world_size_from_env() -> int:
    """The world size torchrun announces (1 outside torchrun), readable before the group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device() -> torch.device:
    """This rank's device: ``cuda:<LOCAL_RANK>`` with CUDA (ranks share GPUs round-robin when there are
    fewer GPUs than ranks on the node), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


@contextmanager
def process_group(backend: str | None = None) -> Iterator[None]:
    """Initialise the process group from torchrun's environment for the block, and tear it down after.

    Without ``WORLD_SIZE`` in the environment (a plain ``python`` run) nothing is initialised and the
    helpers act as a world of one. An already initialised group is used as it is and left alone.
    """
    if is_distributed() or "WORLD_SIZE" not in os.environ:
        yield
        return
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE is set but {missing} are not; start the job with torchrun "
            "(torchrun --nproc_per_node N script.py), which sets them"
        )
    chosen = backend or default_backend()
    if chosen == "nccl" and torch.cuda.is_available():
        torch.cuda.set_device(local_device())
    torch.distributed.init_process_group(backend=chosen)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


# Sharding -----------------------------------------------------------------------------------------------
def shard_bounds(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """``[start, stop)`` of rank `rank_`'s contiguous share of `n` rows: the first ``n % world`` ranks take
    one row more, so shares differ by at most one and, concatenated in rank order, give ``range(n)``."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if n < 0 or w < 1 or not 0 <= r < w:
        raise ConfigError(f"expected n >= 0 and 0 <= rank < world >= 1; got n={n}, rank={r}, world={w}")
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def shard(items: Sequence[T] | Tensor) -> Any:
    """This rank's contiguous share of a sequence or of a tensor's first axis (rows)."""
    n = int(items.shape[0]) if isinstance(items, Tensor) else len(items)
    start, stop = shard_bounds(n)
    return items[start:stop]


def shard_inputs(inputs: Any) -> Any:
    """This rank's rows of model inputs: a list of texts, token ids ``[batch, pos]``, or a mapping of
    tensors with a batch axis (``input_ids``, ``attention_mask``)."""
    if isinstance(inputs, str):
        raise ConfigError("one prompt cannot be split across ranks; pass a list of prompts or a [batch, pos] tensor")
    if isinstance(inputs, Mapping):
        sizes = {k: int(v.shape[0]) for k, v in inputs.items() if isinstance(v, Tensor)}
        if len(set(sizes.values())) > 1:
            raise ShapeError(f"input tensors must share their batch size to be sharded; got {sizes}")
        return {k: shard(v) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    return shard(inputs)


def shard_stream(items: Iterable[T]) -> Iterator[T]:
    """Every ``world``-th item of a stream, starting at this rank's index (for corpora read once)."""
    r, w = rank(), world_size()
    for index, item in enumerate(items):
        if index % w == r:
            yield item


# Gathering ----------------------------------------------------------------------------------------------
def gather_rows(tensor: Tensor) -> Tensor:
    """Concatenate every rank's ``[rows_r, ...]`` tensor in rank order (rows may differ by rank); every
    rank gets the whole. Identity outside a process group."""
    if not is_distributed():
        return tensor
    device = tensor.device if torch.distributed.get_backend() != "nccl" else local_device()
    local = tensor.contiguous().to(device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size())]
    torch.distributed.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.int64, device=device))
    counts = [int(s) for s in sizes]
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in counts]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(tensor.device)


def weighted_mean(tensor: Tensor, weight: float) -> Tensor:
    """``sum_r weight_r * tensor_r / sum_r weight_r`` over ranks (fp32 accumulation; dtype restored)."""
    if not is_distributed():
        return tensor
    device = tensor.device if torch.distributed.get_backend() != "nccl" else local_device()
    total = (tensor.detach().to(device, torch.float32) * weight).contiguous()
    torch.distributed.all_reduce(total)
    norm = torch.tensor(float(weight), device=device)
    torch.distributed.all_reduce(norm)
    return (total / norm).to(tensor.device, tensor.dtype)


def row_count(inputs: Any) -> int:
    """Rows (prompts) in model inputs, as :func:`shard_inputs` counts them."""
    if isinstance(inputs, Mapping):
        return int(next(v for v in inputs.values() if isinstance(v, Tensor)).shape[0])
    if isinstance(inputs, Tensor):
        return 1 if inputs.ndim == 1 else int(inputs.shape[0])
    return len(inputs)


def map_prompts(fn: Callable[..., Result], *inputs: Any, combine: str = "mean") -> Result:
    """Run ``fn(*shares)`` on this rank's rows of each of `inputs` and combine the ranks' results.

    `fn` returns a :class:`~mechscope.results.Result` whose tensors are either batch means (patching
    effects, AtP scores, metric values: ``combine="mean"``, weighted by each rank's row count, exact for
    metrics that average over prompts) or per-row outputs with the batch first (``combine="rows"``:
    concatenated in rank order). Every rank returns the combined result; the config gains
    ``world_size``. With one process this is ``fn(*inputs)``.

        result = map_prompts(lambda c, k: activation_patch(model, c, k, "heads", metric), clean, corrupt)
    """
    if combine not in ("mean", "rows"):
        raise ConfigError(f"combine must be 'mean' or 'rows'; got {combine!r}")
    if not inputs:
        raise ConfigError("map_prompts needs at least one batched input to split")
    counts = {row_count(x) for x in inputs}
    if len(counts) != 1:
        raise ShapeError(f"every input must have the same number of prompts to be split alike; got {sorted(counts)}")
    (n,) = counts
    if n < world_size():
        raise ConfigError(f"{n} prompts cannot be split across {world_size()} ranks; give at least one per rank")
    shares = [shard_inputs(x) for x in inputs]
    local = fn(*shares)
    if not isinstance(local, Result):
        raise ConfigError(f"map_prompts expects fn to return a mechscope Result; got {type(local).__name__}")
    if not is_distributed():
        return local
    rows = row_count(shares[0])
    if combine == "mean":
        tensors = {k: weighted_mean(v, rows) if v.is_floating_point() else v for k, v in local.tensors.items()}
        labels = dict(local.labels)
    else:  # batch-first tensors concatenated; 0-d summaries averaged; batch-axis labels were per rank
        tensors = {k: gather_rows(v) if v.ndim else weighted_mean(v, rows) for k, v in local.tensors.items()}
        batch_axes = {axes[0] for axes in local.axes.values() if axes}
        labels = {axis: values for axis, values in local.labels.items() if axis not in batch_axes}
    config = {**local.config, "world_size": world_size()}
    return type(local)(tensors=tensors, axes=dict(local.axes), labels=labels, config=config)


__all__ = [
    "barrier",
    "default_backend",
    "gather_rows",
    "is_distributed",
    "is_main",
    "local_device",
    "map_prompts",
    "process_group",
    "rank",
    "row_count",
    "shard",
    "shard_bounds",
    "shard_inputs",
    "shard_stream",
    "weighted_mean",
    "world_size",
    "world_size_from_env",
]
