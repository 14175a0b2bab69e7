"""Collecting one activation store with many ranks (torchrun): each rank runs the forward passes for its
share of the corpus and writes its own shards; the store has one manifest (layout and design:
:mod:`mechscope.features.store.parts`).

Phases: settings -> rank 0 opens the store (a new plan, or the plan of an interrupted run, checked to match)
-> barrier -> each rank streams the corpus's token rows, keeps the blocks dealt to it (block ``b`` to rank
``b % W``) and collects them into its part with the ordinary resumable writer (a rerun skips its complete
shards, re-checking their token ids) -> barrier -> rank 0 merges the parts into the top manifest -> barrier.
Every rank tokenises the whole corpus (cheap next to the forward passes it skips) so that no rank needs to
know the corpus length in advance.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.features.store import writer
from mechscope.features.store.manifest import MANIFEST, Manifest, StoreSettings
from mechscope.features.store.parts import PARTS_KEY, merge, part_folder, part_settings, world_of
from mechscope.features.store.reader import ActivationStore
from mechscope.io import ModelInfo
from mechscope.model import distributed as dist

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel


def collect_store_distributed(
    model: HookedModel,
    sites: str | Sequence[str],
    corpus: writer.Corpus,
    folder: str | Path,
    *,
    dtype: str = "bf16",
    seq_len: int = 128,
    skip_first: bool = True,
    rows_per_shard: int = 256,
    max_tokens: int | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> ActivationStore:
    """:func:`~mechscope.features.store.collect_store` across the ranks of the process group (every rank
    calls it with the same arguments; `folder` on a filesystem all ranks share). Outside a process group it
    collects alone, in the same layout. Resumes an interrupted collection started with the same settings,
    model and world size. Returns the store (on every rank)."""
    chosen, settings = writer.collection_settings(
        model,
        sites,
        dtype=dtype,
        seq_len=seq_len,
        skip_first=skip_first,
        rows_per_shard=rows_per_shard,
        max_tokens=max_tokens,
    )
    info = ModelInfo.of(model)
    root = Path(folder)
    _plan(root, settings, info)
    _collect_part(model, chosen, corpus, root, settings, info, batch_size, progress)
    _finish(root)
    return ActivationStore(root)


def _plan(root: Path, settings: StoreSettings, info: ModelInfo) -> None:
    """Rank 0 writes the plan (or checks an interrupted run's); every rank waits for it, then fails alike."""
    error = None
    if dist.is_main():
        try:
            _open_top(root, settings, info)
        except ConfigError as exc:
            error = str(exc)
    error = _broadcast(error)
    if error is not None:
        raise ConfigError(error)


def _open_top(root: Path, settings: StoreSettings, info: ModelInfo) -> None:
    world = dist.world_size()
    if (root / MANIFEST).is_file():
        top = Manifest.load(root)
        if world_of(top) is None:
            raise ConfigError(f"{root}: an activation store written by one process; collect into another folder")
        if top.model.fingerprint != info.fingerprint or top.settings != settings:
            raise ConfigError(
                f"{root}: this store was collected with other settings or on another model ({top.settings}, "
                f"model {top.model.fingerprint}); got {settings}, model {info.fingerprint}. "
                "Use the same settings to resume, or another folder"
            )
        if world_of(top) != world:
            raise ConfigError(
                f"{root}: this store was collected by {world_of(top)} ranks (blocks are dealt by rank), so it "
                f"resumes with {world_of(top)} ranks; got a world of {world}"
            )
        return
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"{root}: expected an empty folder or an activation store, found other files")
    root.mkdir(parents=True, exist_ok=True)
    top = Manifest(settings, info, {})
    top.extra = {PARTS_KEY: {"world_size": world, "layout": "block b of rows_per_shard rows -> rank b % world"}}
    top.save(root)


def _broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank (after a barrier, since the collective waits for rank 0)."""
    if not dist.is_distributed():
        return value
    box = [value]
    import torch

    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _collect_part(
    model: HookedModel,
    chosen: list[Any],
    corpus: writer.Corpus,
    root: Path,
    settings: StoreSettings,
    info: ModelInfo,
    batch_size: int,
    progress: bool,
) -> None:
    folder = part_folder(root, dist.rank())
    part = writer._open(folder, part_settings(settings), info)
    if part.complete:
        return
    rows = _my_rows(model, corpus, settings)
    if not part.shards:
        first = next(rows, None)
        if first is None:  # a corpus of fewer blocks than ranks: this rank's share is empty
            part.complete = True
            part.save(folder)
            return
        rows = _prepend(first, rows)
    writer._collect(model, chosen, part, folder, rows, batch_size, progress and dist.is_main())


def _my_rows(model: HookedModel, corpus: writer.Corpus, settings: StoreSettings) -> Iterator[Tensor]:
    """This rank's token rows: the corpus's rows up to the token limit, in blocks of ``rows_per_shard``
    dealt round-robin to the ranks."""
    limit = None if settings.max_tokens is None else -(-settings.max_tokens // settings.per_row)
    rank, world, block = dist.rank(), dist.world_size(), settings.rows_per_shard
    for index, row in enumerate(writer._token_rows(model, corpus, settings.seq_len)):
        if limit is not None and index >= limit:
            return
        if (index // block) % world == rank:
            yield row


def _prepend(first: Tensor, rest: Iterator[Tensor]) -> Iterator[Tensor]:
    yield first
    yield from rest


def _finish(root: Path) -> None:
    """After every rank's part is complete, rank 0 writes the merged manifest."""
    dist.barrier()
    if dist.is_main():
        merged = merge(root, Manifest.load(root))
        if not merged.complete:  # cannot happen after the barrier unless a part was removed meanwhile
            raise ConfigError(f"{root}: ranks finished but parts are missing: {merged.extra.get('missing')}")
        merged.extra.pop("missing", None)
        merged.save(root)
    dist.barrier()


__all__ = ["collect_store_distributed"]
