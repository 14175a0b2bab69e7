"""Training an SAE data-parallel across the ranks of a ``torch.distributed`` group (torchrun), with
PyTorch's DistributedDataParallel: :func:`~mechscope.features.train.train_sae` uses this when a group of
several ranks is initialised (or with ``distributed=True``); its API does not change.

Each step trains on one *global* batch of ``batch_size`` rows, ``batch_size / world`` on each rank:

- a tensor of activations: every rank draws the same global batch (one seeded generator) and keeps its
  slice, so the run equals single-process training on the same tensor;
- an :class:`~mechscope.features.store.ActivationStore`: rank ``r`` reads only shards ``i`` with
  ``i % world == r`` (shuffled within its share, as the store shuffles), so the global batch of a step is the
  concatenation of the ranks' local batches;
- any other iterable: each rank passes its own stream of local batches.

DDP averages the ranks' gradients, which equals the gradient of the global batch's mean loss (every loss
term is a mean over tokens, and local batches are equal in size). What is not a gradient is made
global too: the input scale and data mean come from every rank's first batches, a feature counts as fired
when it fired on any rank (so dead-feature masks and the AuxK loss agree), and non-trainable thresholds
(BatchTopK's running estimate) are averaged over ranks after each step. One selection stays local:
BatchTopK keeps the top ``k x batch_size / world`` activations of each rank's batch, not of the global
batch, as data-parallel BatchTopK implementations do. So the trained SAE equals single-process training on
the same global batches up to float reassociation, except for BatchTopK. Rank 0 writes the checkpoint; a
resumed run loads it on every rank.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.features.architectures.base import extra_tensor
from mechscope.features.sae import SparseAutoencoder
from mechscope.model import distributed as dist


class Local:
    """What a training process shares with the others: nothing (one process); :class:`DataParallel` is
    the data-parallel counterpart. :func:`~mechscope.features.train.train_sae` calls these seams."""

    world = 1
    writes = True  # writes the checkpoint and shows progress

    def part(self, batch_size: int) -> slice:
        """The rows of each global batch of a tensor this process trains on."""
        return slice(None)

    def share(self, store: Any) -> Any:
        """The part of an activation store this process reads."""
        return store

    def rows(self, x: Tensor) -> Tensor:
        """Every process's rows (to estimate input scales and the data mean)."""
        return x

    def fired(self, fired: Tensor) -> Tensor:
        return fired

    def mean(self, values: list[float]) -> list[float]:
        return values

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    def after_step(self, sae: SparseAutoencoder) -> None:
        """Keep non-gradient state (thresholds estimated from batches) equal across processes."""


class DataParallel(Local):
    """The ranks of the initialised process group, training one SAE together."""

    def __init__(self, batch_size: int) -> None:
        if not dist.is_distributed():
            raise ConfigError(
                "distributed=True needs an initialised torch.distributed process group; start with torchrun "
                "and open one (mechscope.model.distributed.process_group())"
            )
        self.world = dist.world_size()
        self.rank = dist.rank()
        # SAE collectives use a gloo group, in an nccl job too: gloo all-reduces CPU and CUDA tensors alike
        nccl = torch.distributed.get_backend() == "nccl"
        self.group = torch.distributed.new_group(backend="gloo") if nccl else None
        self.writes = dist.is_main()
        if batch_size % self.world:
            raise ConfigError(
                f"batch_size {batch_size} must divide evenly across {self.world} ranks "
                "(each rank trains on batch_size / world rows of every global batch)"
            )

    def part(self, batch_size: int) -> slice:
        local = batch_size // self.world
        return slice(self.rank * local, (self.rank + 1) * local)

    def share(self, store: Any) -> Any:
        """A view of `store` holding only this rank's shards (``i % world == rank``)."""
        import copy

        mine = [s for i, s in enumerate(store.manifest.shards) if i % self.world == self.rank]
        if not mine:
            raise ConfigError(
                f"{store.folder}: {store.n_shards} shards cannot be shared by {self.world} ranks; "
                "collect with smaller rows_per_shard so every rank gets at least one"
            )
        view = copy.copy(store)
        view.manifest = copy.copy(store.manifest)
        view.manifest.shards = mine
        view.skipped = []
        return view

    def rows(self, x: Tensor) -> Tensor:
        return dist.gather_rows(x.cpu()).to(x.device)  # gloo gathers CPU tensors only

    def fired(self, fired: Tensor) -> Tensor:
        flags = fired.to(torch.int32)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return flags > 0

    def mean(self, values: list[float]) -> list[float]:
        total = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(total, group=self.group)
        return (total / self.world).tolist()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        # Buffers (thresholds) are averaged by after_step, not overwritten by rank 0's at every forward.
        ddp = torch.nn.parallel.DistributedDataParallel
        newer = "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters  # torch >= 2.12
        sync_buffers: dict[str, Any] = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
        return ddp(module, process_group=self.group, **sync_buffers)

    @torch.no_grad()
    def after_step(self, sae: SparseAutoencoder) -> None:
        for name, trainable in sae.architecture.extra.items():
            if not trainable:
                value = extra_tensor(sae, name)
                torch.distributed.all_reduce(value.data, group=self.group)
                value.data.div_(self.world)


__all__ = ["DataParallel", "Local"]
