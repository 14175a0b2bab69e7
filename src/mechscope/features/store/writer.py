"""Collecting activations into a sharded store, streaming, resumable after a kill.

Phases: settings and model info -> open the folder (new, or resume a matching incomplete store) ->
stream token rows from the corpus (texts, text files, or token rows), skipping the rows of complete
shards (their token ids re-checked against the manifest) -> per shard: forward passes in batches that
stop after the last collected site's layer, cast to the storage dtype, serialise, write to a temporary
file, rename, record in the manifest. Memory is one shard's activations whatever the corpus size; a kill
at any moment leaves at worst a temporary file (removed on resume) or, between the rename and the manifest, a
shard file not yet listed (written again on resume), and never a listed half-written shard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.features.store.manifest import DTYPES, MANIFEST, Manifest, StoreSettings, shard_name
from mechscope.features.store.reader import ActivationStore
from mechscope.features.store.rows import per_token_site
from mechscope.io import ModelInfo, write_bytes_atomic
from mechscope.model.tokens import packed_rows

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

#: A corpus: texts (a list or any iterable), a text file or folder of them (one document per line), a
#: list of such paths, or token rows ``[rows, seq_len]``.
Corpus = Iterable[str] | str | Path | Sequence[Path] | Tensor


def collect_store(
    model: HookedModel,
    sites: str | Sequence[str],
    corpus: Corpus,
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
    """Collect the activations of `sites` over `corpus` into `folder` (see the module docstring);
    resumes an incomplete store made with the same settings on the same model. Returns the store."""
    chosen, settings = collection_settings(
        model,
        sites,
        dtype=dtype,
        seq_len=seq_len,
        skip_first=skip_first,
        rows_per_shard=rows_per_shard,
        max_tokens=max_tokens,
    )
    info = ModelInfo.of(model)
    folder = Path(folder)
    manifest = _open(folder, settings, info)
    if not manifest.complete:
        _collect(model, chosen, manifest, folder, _token_rows(model, corpus, seq_len), batch_size, progress)
    return ActivationStore(folder)


def collection_settings(
    model: HookedModel,
    sites: str | Sequence[str],
    *,
    dtype: str,
    seq_len: int,
    skip_first: bool,
    rows_per_shard: int,
    max_tokens: int | None,
) -> tuple[list[Any], StoreSettings]:
    """The per-token sites a collection reads (checked on `model`) and the settings its manifest records;
    shared by the one-process and the many-rank collections."""
    names = (sites,) if isinstance(sites, str) else tuple(sites)
    chosen = [per_token_site(model, s) for s in names]
    settings = StoreSettings(
        sites=tuple(c.name for c in chosen),
        dtype=dtype,
        seq_len=seq_len,
        skip_first=skip_first,
        rows_per_shard=rows_per_shard,
        max_tokens=max_tokens,
    )
    return chosen, settings


def _open(folder: Path, settings: StoreSettings, info: ModelInfo) -> Manifest:
    """A fresh manifest, or the existing one when it matches (temporary files of a killed run removed)."""
    if (folder / MANIFEST).is_file():
        manifest = Manifest.load(folder)
        if "parts" in manifest.extra:  # its shards live in the ranks' parts (features.store.parts)
            raise ConfigError(
                f"{folder}: this store is collected by several ranks; resume it with collect_store_distributed"
            )
        if manifest.model.fingerprint != info.fingerprint:
            raise ConfigError(
                f"{folder}: this store was collected on another model (fingerprint {manifest.model.fingerprint}, "
                f"this model {info.fingerprint}); use another folder"
            )
        if manifest.settings != settings:
            raise ConfigError(
                f"{folder}: this store was collected with other settings ({manifest.settings}); "
                f"got {settings}. Use the same settings to resume, or another folder"
            )
    else:
        if folder.exists() and any(folder.iterdir()):
            raise ConfigError(f"{folder}: expected an empty folder or an activation store, found other files")
        manifest = Manifest(settings, info, {})
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".shard-*.tmp"):
        stale.unlink()
    return manifest


def _token_rows(model: HookedModel, corpus: Corpus, seq_len: int) -> Iterator[Tensor]:
    """``[seq_len]`` token rows of `corpus`: given rows as they are, texts packed by
    :func:`~mechscope.model.tokens.packed_rows` (the rows :func:`token_rows` makes, streamed)."""
    if isinstance(corpus, Tensor):
        if corpus.ndim != 2 or corpus.shape[1] != seq_len:
            raise ConfigError(f"expected token rows of shape [rows, seq_len={seq_len}], got {tuple(corpus.shape)}")
        yield from corpus.long()
        return
    for row in packed_rows(model.tokenizer, _texts(corpus), seq_len):
        yield torch.tensor(row)


def _texts(corpus: Corpus) -> Iterator[str]:
    if isinstance(corpus, str | Path):
        yield from _file_texts(Path(corpus))
        return
    for item in corpus:  # type: ignore[union-attr]
        if isinstance(item, Path):
            yield from _file_texts(item)
        elif isinstance(item, str):
            yield item
        else:
            raise ConfigError(f"expected texts or paths in the corpus, got {type(item).__name__}")


def _file_texts(path: Path) -> Iterator[str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise ConfigError(f"no text file at {str(path)!r}")
    for file in files:
        with file.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.strip():
                    yield line.rstrip("\n")


def _collect(
    model: HookedModel,
    chosen: list[Any],
    manifest: Manifest,
    folder: Path,
    rows: Iterator[Tensor],
    batch_size: int,
    progress: bool,
) -> None:
    from tqdm.auto import tqdm

    settings = manifest.settings
    limit = None if settings.max_tokens is None else -(-settings.max_tokens // settings.per_row)
    bar = tqdm(total=limit, initial=manifest.rows, unit="row", disable=not progress, desc="collect")
    for index, shard in enumerate(manifest.shards):  # resume: skip what is there, checking it is the same text
        ids = _take(rows, int(shard["rows"]), settings.seq_len)
        if ids is None or _digest(ids) != shard["tokens_sha256"]:
            raise ConfigError(
                f"{folder}: the corpus differs from the one shard {index} was collected from; "
                "resume with the same corpus, or collect into another folder"
            )
    while limit is None or manifest.rows < limit:
        want = settings.rows_per_shard if limit is None else min(settings.rows_per_shard, limit - manifest.rows)
        ids = _take(rows, want, settings.seq_len, partial=True)
        if ids is None:
            break
        _write_shard(model, chosen, manifest, folder, ids, batch_size)
        bar.update(ids.shape[0])
    bar.close()
    if not manifest.shards:
        raise ConfigError(f"expected at least {settings.seq_len} tokens in the corpus, got fewer")
    manifest.complete = True
    manifest.save(folder)


def _take(rows: Iterator[Tensor], n: int, seq_len: int, partial: bool = False) -> Tensor | None:
    got = [row for _, row in zip(range(n), rows, strict=False)]
    if not got or (len(got) < n and not partial):
        return None
    return torch.stack(got)


def _digest(ids: Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()


@torch.no_grad()
def _write_shard(
    model: HookedModel, chosen: list[Any], manifest: Manifest, folder: Path, ids: Tensor, batch_size: int
) -> None:
    settings = manifest.settings
    dtype = getattr(torch, DTYPES[settings.dtype])
    layers = [c.layer for c in chosen]
    stop = None if None in layers or max(layers) + 1 >= model.dims.n_layers else max(layers) + 1
    device = next(model.hf_model.parameters()).device
    parts: dict[str, list[Tensor]] = {c.name: [] for c in chosen}
    for start in range(0, ids.shape[0], batch_size):
        _, cache = model.run_with_cache(ids[start : start + batch_size].to(device), chosen, stop_at_layer=stop)
        for c in chosen:
            parts[c.name].append(cache[c.name][:, int(settings.skip_first) :].to("cpu", dtype))
    tensors = {f"acts.{name}": torch.cat(p).contiguous() for name, p in parts.items()}
    tensors["tokens"] = ids.to(torch.int32).contiguous()
    for name, p in parts.items():
        manifest.widths[name] = int(p[0].shape[-1])
    index = len(manifest.shards)
    data = save(tensors, metadata={"format": "mechscope.activation_shard", "index": str(index)})
    path = folder / shard_name(index)
    try:
        _write_bytes(path, data)
    except OSError as exc:
        raise ConfigError(
            f"writing {path} failed ({exc}); the store keeps its {index} complete shards and resumes from there"
        ) from exc
    manifest.shards.append(
        {
            "file": path.name,
            "rows": int(ids.shape[0]),
            "sha256": hashlib.sha256(data).hexdigest(),
            "tokens_sha256": _digest(ids),
            "bytes": len(data),
        }
    )
    manifest.save(folder)


def _write_bytes(path: Path, data: bytes) -> None:
    """`data` to `path` atomically (io's writer): a kill leaves no half-written shard. A seam for fault tests."""
    write_bytes_atomic(path, data)


__all__ = ["Corpus", "collect_store"]
