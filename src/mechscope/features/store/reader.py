"""Reading an activation store: shards checked against their hashes, shuffled batches in bounded memory.

:meth:`ActivationStore.batches` walks the shards in a seeded random order and keeps a pool of at most
``buffer_tokens`` rows (plus one shard): each time a shard joins, the pool is shuffled and the rows beyond
half the buffer are handed out in batches, so rows of different shards mix while memory stays bounded.
Every row is handed out exactly once per epoch (the last, partial batch too unless ``drop_last``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load
from torch import Tensor

from mechscope.errors import ConfigError, ShapeError
from mechscope.features.store.parts import MISSING_KEY, read_manifest

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

ON_CORRUPT = ("raise", "skip")


class CorruptShardError(ConfigError):
    """A shard's bytes do not match the hash the manifest recorded for them."""


class ActivationStore:
    """A folder written by :func:`~mechscope.features.store.writer.collect_store` (read-only)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)  # merged from the ranks' parts when several wrote it
        #: Indices of shards found corrupt while reading with ``on_corrupt="skip"``.
        self.skipped: list[int] = []

    # What is in it --------------------------------------------------------------------------------------------
    @property
    def sites(self) -> tuple[str, ...]:
        return self.manifest.settings.sites

    @property
    def dtype(self) -> str:
        return self.manifest.settings.dtype

    @property
    def n_tokens(self) -> int:
        """Activation rows per site in the complete shards."""
        return self.manifest.tokens

    @property
    def n_shards(self) -> int:
        return len(self.manifest.shards)

    @property
    def complete(self) -> bool:
        return self.manifest.complete

    @property
    def missing(self) -> list[dict[str, Any]]:
        """What a store written by several ranks lacks: per rank whose share stopped early, the shards and
        rows it completed and the first global block it lacks (empty when complete or written by one process)."""
        return list(self.manifest.extra.get(MISSING_KEY, []))

    def width(self, site: str) -> int:
        self._check_sites([site])
        return self.manifest.widths[site]

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.folder)!r}, sites={list(self.sites)}, tokens={self.n_tokens}, "
            f"shards={self.n_shards}, dtype={self.dtype}, complete={self.complete})"
        )

    def check(self, model: HookedModel, site: str | None = None) -> None:
        """Refuse a store made on another model, or one that lacks `site`."""
        from mechscope.io import ModelInfo

        fingerprint = ModelInfo.of(model).fingerprint
        if fingerprint != self.manifest.model.fingerprint:
            raise ConfigError(
                f"{self.folder}: the store was collected on another model (fingerprint "
                f"{self.manifest.model.fingerprint}, {self.manifest.model.model_type}); this model is {fingerprint}"
            )
        if site is not None:
            self._check_sites([model.site(site).name])

    def _check_sites(self, sites: Sequence[str]) -> None:
        missing = [s for s in sites if s not in self.sites]
        if missing:
            raise ConfigError(f"{self.folder}: the store holds sites {list(self.sites)}, not {missing}")

    # Shards ---------------------------------------------------------------------------------------------------
    def shard(self, index: int, *, verify: bool = True) -> dict[str, Tensor]:
        """Tensors of shard `index` (``acts.<site>`` ``[rows, pos, d]`` and ``tokens`` ``[rows, seq_len]``);
        raises :class:`CorruptShardError` when its bytes do not match the manifest's hash."""
        if not 0 <= index < self.n_shards:
            raise ConfigError(f"expected a shard index in [0, {self.n_shards}), got {index}")
        entry = self.manifest.shards[index]
        path = self.folder / entry["file"]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CorruptShardError(f"{path}: shard {index} is unreadable ({exc})") from exc
        if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CorruptShardError(
                f"{path}: shard {index} does not match its SHA-256 in the manifest (corrupted or replaced); "
                "read with on_corrupt='skip' to leave it out, or collect again"
            )
        try:
            return load(data)
        except SafetensorError as exc:
            raise CorruptShardError(f"{path}: shard {index} is not a readable safetensors file ({exc})") from exc

    def _rows(self, index: int, sites: Sequence[str], on_corrupt: str) -> list[Tensor] | None:
        try:
            tensors = self.shard(index)
        except CorruptShardError:
            if on_corrupt == "raise":
                raise
            if index not in self.skipped:
                self.skipped.append(index)
            return None
        return [tensors[f"acts.{s}"].reshape(-1, self.manifest.widths[s]) for s in sites]

    def tokens(self) -> Iterator[Tensor]:
        """Token rows ``[rows, seq_len]`` of each shard in order (to show contexts of stored activations)."""
        for index in range(self.n_shards):
            yield self.shard(index)["tokens"].long()

    def activations(self, site: str, *, max_tokens: int | None = None) -> Tensor:
        """All (or the first `max_tokens`) activations of `site` in shard order, fp32 ``[tokens, d]``:
        for stores that fit in memory."""
        self._check_sites([site])
        out, count = [], 0
        for index in range(self.n_shards):
            part = self.shard(index)[f"acts.{site}"].reshape(-1, self.manifest.widths[site]).float()
            out.append(part)
            count += part.shape[0]
            if max_tokens is not None and count >= max_tokens:
                break
        joined = torch.cat(out)
        return joined if max_tokens is None else joined[:max_tokens]

    # Batches --------------------------------------------------------------------------------------------------
    def batches(
        self,
        batch_size: int,
        *,
        sites: Sequence[str] | None = None,
        seed: int = 0,
        epochs: int | None = 1,
        shuffle: bool = True,
        buffer_tokens: int = 65_536,
        drop_last: bool = False,
        on_corrupt: str = "raise",
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[Any]:
        """Batches ``[batch, d]`` of `sites` (default: the first site), or tuples of them, one per site,
        for the same tokens; `epochs` None repeats forever. See the module docstring."""
        chosen = list(sites or self.sites[:1])
        self._check_sites(chosen)
        if batch_size < 1 or buffer_tokens < 0:
            raise ShapeError(f"expected batch_size >= 1 and buffer_tokens >= 0, got {batch_size}, {buffer_tokens}")
        if on_corrupt not in ON_CORRUPT:
            raise ConfigError(f"expected on_corrupt one of {list(ON_CORRUPT)}, got {on_corrupt!r}")
        epoch = 0
        while epochs is None or epoch < epochs:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            for batch in self._epoch(chosen, batch_size, gen, shuffle, buffer_tokens, drop_last, on_corrupt):
                batch = [b.to(dtype) for b in batch]
                yield batch[0] if len(batch) == 1 else tuple(batch)
            epoch += 1

    def _epoch(
        self,
        sites: list[str],
        batch_size: int,
        gen: torch.Generator,
        shuffle: bool,
        buffer_tokens: int,
        drop_last: bool,
        on_corrupt: str,
    ) -> Iterator[list[Tensor]]:
        order = torch.randperm(self.n_shards, generator=gen).tolist() if shuffle else range(self.n_shards)
        pool: list[Tensor] | None = None
        for index in order:
            rows = self._rows(index, sites, on_corrupt)
            if rows is None:
                continue
            pool = rows if pool is None else [torch.cat([p, r]) for p, r in zip(pool, rows, strict=True)]
            if pool[0].shape[0] < buffer_tokens + batch_size:
                continue
            if shuffle:
                perm = torch.randperm(pool[0].shape[0], generator=gen)
                pool = [p[perm] for p in pool]
            n_out = (pool[0].shape[0] - buffer_tokens // 2) // batch_size * batch_size
            for start in range(0, n_out, batch_size):
                yield [p[start : start + batch_size] for p in pool]
            pool = [p[n_out:] for p in pool]
        if pool is None or pool[0].shape[0] == 0:
            if pool is None and self.n_shards and on_corrupt == "skip":
                raise CorruptShardError(f"{self.folder}: every shard is corrupt; nothing to read")
            return
        if shuffle:
            perm = torch.randperm(pool[0].shape[0], generator=gen)
            pool = [p[perm] for p in pool]
        end = pool[0].shape[0] // batch_size * batch_size if drop_last else pool[0].shape[0]
        for start in range(0, end, batch_size):
            yield [p[start : start + batch_size] for p in pool]


__all__ = ["ON_CORRUPT", "ActivationStore", "CorruptShardError"]
