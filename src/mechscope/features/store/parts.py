"""One activation store written by several ranks: its layout, and its manifest merged from the ranks' parts.

Layout of a store collected by ``W`` ranks (:func:`~mechscope.features.store.distributed.collect_store_distributed`)::

    folder/manifest.json              the one manifest (settings, model, every complete shard, what is missing)
    folder/rank-00000/manifest.json   rank 0's part: an ordinary store of the rows rank 0 collected
    folder/rank-00000/shard-*.safetensors
    folder/rank-00001/...

The corpus's token rows are cut into blocks of ``rows_per_shard`` rows; block ``b`` goes to rank ``b % W``,
so rank ``r``'s local shard ``i`` is global block ``i * W + r``, and the merged shard list (sorted by block)
is the one-process store's shard list, row for row. Each file has one writer: a rank writes only its part
(atomically, shard then part manifest, as any store), rank 0 writes the top manifest -- once at the start
(the plan: world size, settings, no shards) and once after every rank finished (every shard, complete).
No file locks (unreliable on the network filesystems several nodes share) and no shared file a dying rank
can leave half-updated. When a rank died, the top manifest still says "incomplete", and readers merge the
parts themselves (:func:`read_manifest`): they see every complete shard of every rank, and ``missing``
names the rank whose share stopped early and the first block it lacks.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from mechscope.errors import ConfigError
from mechscope.features.store.manifest import MANIFEST, Manifest, StoreSettings

PARTS_KEY = "parts"
MISSING_KEY = "missing"


def part_folder(folder: Path, rank: int) -> Path:
    return folder / f"rank-{rank:05d}"


def part_settings(settings: StoreSettings) -> StoreSettings:
    """A part's settings: the store's, without the token limit (it applies to the whole corpus and is
    enforced before rows are dealt to ranks)."""
    return replace(settings, max_tokens=None)


def world_of(manifest: Manifest) -> int | None:
    """The number of ranks that write `manifest`'s store (None: one process wrote it as one store)."""
    parts = manifest.extra.get(PARTS_KEY)
    return None if parts is None else int(parts["world_size"])


def read_manifest(folder: Path) -> Manifest:
    """The manifest of the store at `folder`: as written, or merged from the ranks' parts when the top
    manifest of a multi-rank store is not complete (a rank died, or the collection is running). Read-only."""
    top = Manifest.load(folder)
    if world_of(top) is None or top.complete:
        return top
    return merge(folder, top)


def merge(folder: Path, top: Manifest) -> Manifest:
    """`top` with the complete shards of every rank's part (in global block order), their widths, and
    ``missing``: one entry per rank whose part is absent or incomplete."""
    world = world_of(top)
    if world is None:
        raise ConfigError(f"{folder}: not a store written by several ranks")
    found: list[tuple[int, dict[str, Any]]] = []
    widths: dict[str, int] = dict(top.widths)
    missing: list[dict[str, Any]] = []
    for rank in range(world):
        part = _load_part(folder, rank, top)
        if part is None:
            missing.append({"rank": rank, "shards_done": 0, "rows_done": 0, "next_block": rank})
            continue
        widths.update(part.widths)
        for index, shard in enumerate(part.shards):
            block = index * world + rank
            entry = {**shard, "file": f"{part_folder(Path(), rank).name}/{shard['file']}", "rank": rank}
            found.append((block, {**entry, "block": block}))
        if not part.complete:
            missing.append(
                {
                    "rank": rank,
                    "shards_done": len(part.shards),
                    "rows_done": part.rows,
                    "next_block": len(part.shards) * world + rank,
                }
            )
    merged = Manifest(top.settings, top.model, widths)
    merged.shards = [entry for _, entry in sorted(found, key=lambda item: item[0])]
    merged.complete = not missing
    merged.extra = {**top.extra, MISSING_KEY: missing}
    return merged


def _load_part(folder: Path, rank: int, top: Manifest) -> Manifest | None:
    path = part_folder(folder, rank)
    if not (path / MANIFEST).is_file():
        return None
    part = Manifest.load(path)
    if part.model.fingerprint != top.model.fingerprint or part.settings != part_settings(top.settings):
        raise ConfigError(
            f"{path}: this rank's part was collected with another model or other settings than the store "
            f"({part.settings}, model {part.model.fingerprint}); expected {part_settings(top.settings)}, "
            f"model {top.model.fingerprint}"
        )
    return part


__all__ = ["MISSING_KEY", "PARTS_KEY", "merge", "part_folder", "part_settings", "read_manifest", "world_of"]
