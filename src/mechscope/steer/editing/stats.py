"""Second-moment statistics of MLP keys, ``C = E[k k^T]``, cached on disk and resumable.

ROME and MEMIT solve least-squares problems whose metric is the covariance of the keys an MLP output
projection sees on ordinary text (the key is the projection's input: ``act(W_in x)`` or, for gated MLPs,
``act(gate) * up``, which is the canonical site ``blocks.{L}.mlp.hook_post``). Computing it means
running the model over many tokens, so results are cached per (model fingerprint, layer, token count,
stream), and partial sums are checkpointed so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.io import Envelope, FileSchema, ModelInfo, read_envelope, register_schema, write_envelope
from mechscope.model.tokens import packed_rows, special_prefix
from mechscope.steer.editing.requests import EditError


def _stats_v1_to_v2(header: dict[str, str]) -> dict[str, str]:
    """Schema 1 kept everything as header strings (its config as a Python repr: a v1 checkpoint never
    matches a config again, so an interrupted v1 run restarts; finished v1 statistics still load)."""
    partial = "batches" in header
    body: dict[str, Any] = {"config": header.get("config", "")}
    if partial:
        body |= {"batches": int(header["batches"]), "tokens": int(header["tokens"])}
    else:
        body |= {"layer": int(header.get("layer", -1)), "tokens": int(header.get("tokens", 0))}
    model = {"fingerprint": header.get("fingerprint", "")}
    kind = "partial" if partial else "mom2"
    return {**header, "kind": kind, "body": json.dumps(body), "model": json.dumps(model)}


#: Finished statistics (one layer each) and the checkpointed partial sums of an unfinished run share a schema.
STATS_SCHEMA = register_schema(FileSchema("mlp_key_stats", 2, "MLP key statistics", {1: _stats_v1_to_v2}))
FORMAT = STATS_SCHEMA.format
SCHEMA_VERSION = STATS_SCHEMA.version


@dataclass(frozen=True, kw_only=True)
class StatsConfig:
    """How to estimate ``E[k k^T]``: how many tokens, in windows of what length, from which stream.

    ``stream`` names the text source and is part of the cache key: ``None`` (default) means the model's
    default text (:func:`mechscope.data.corpus.default_stream`: ``"zoo"``, the organisms' planted-task
    text, on the organisms; ``"english"``, standard-library docstrings, on any other model); give any
    other label with your own texts. ``checkpoint_every`` counts batches.
    """

    n_tokens: int = 20_000
    seq_len: int = 64
    batch_size: int = 16
    checkpoint_every: int = 8
    stream: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_tokens", "seq_len", "batch_size", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"StatsConfig.{name} must be a positive integer; got {value!r}")
        if self.stream is not None and (not self.stream or any(c in self.stream for c in "/\\ ")):
            raise ConfigError(
                f"StatsConfig.stream must be a short label without '/', '\\' or spaces; got {self.stream!r}"
            )


def default_cache_dir() -> Path:
    """``$MECHSCOPE_CACHE/stats`` (default ``~/.cache/mechscope/stats``)."""
    return Path(os.environ.get("MECHSCOPE_CACHE", Path.home() / ".cache" / "mechscope")) / "stats"


def zoo_texts(seed: int = 0) -> Iterator[str]:
    """The organisms' planted-task training text (every text task of :mod:`mechscope.data.tasks`),
    shuffled deterministically: the text the organisms were trained on, generated, never downloaded."""
    yield from _zoo_text_list(seed)


@lru_cache(maxsize=4)
def _zoo_text_list(seed: int) -> tuple[str, ...]:
    from mechscope.data.corpus import zoo_texts as organism_texts

    return tuple(organism_texts("train", seed, shuffle_key=f"mechscope-stats:{seed}"))


def default_stream_texts(model: Any, stream: str, seed: int) -> Iterator[str]:
    """The text of a default stream: ``"zoo"`` (:func:`zoo_texts`) or ``"english"`` (standard-library docs)."""
    if stream == "zoo":
        return zoo_texts(seed)
    if stream == "english":
        from mechscope.data.corpus import english_texts

        return iter(english_texts("train", seed))
    raise ConfigError(f"no texts given for the statistics stream {stream!r}; pass texts= (or stream=None)")


def resolve_stream(model: Any, config: StatsConfig, texts: Iterable[str] | None) -> StatsConfig:
    """`config` with its stream named (the label keys the cache): the model's default stream when ``stream``
    is None and no texts are given; for unlabelled texts, ``texts-<hash>`` of a list's content (``texts``
    for an iterator, which cannot be hashed without consuming it: label those yourself)."""
    from dataclasses import replace

    if config.stream is not None:
        return config
    if texts is None:
        from mechscope.data.corpus import default_stream

        return replace(config, stream=default_stream(model))
    if isinstance(texts, Sequence) and not isinstance(texts, str):
        import hashlib

        digest = hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()[:12]
        return replace(config, stream=f"texts-{digest}")
    return replace(config, stream="texts")


def stats_key(fingerprint: str, layer: int | str, config: StatsConfig, *, start: int = 0) -> str:
    """File stem of a layer's cached statistics; `start` is the number of tokens each window begins with
    before the text (the tokenizer's BOS), left out of the statistics and named in the stem when there are any."""
    rows = f"-p{start}" if start else ""
    return f"{fingerprint}-L{layer}-n{config.n_tokens}-s{config.seq_len}{rows}-{config.stream}-seed{config.seed}"


def check_stats(stats: Tensor, layer: int, d_mlp: int) -> None:
    """:class:`EditError` unless `stats` is a finite ``[d_mlp, d_mlp]`` matrix."""
    if stats.shape != (d_mlp, d_mlp):
        raise EditError(
            f"statistics of layer {layer} must be [d_mlp, d_mlp] = [{d_mlp}, {d_mlp}]; got {tuple(stats.shape)}"
        )
    if not bool(torch.isfinite(stats).all()):
        bad = int((~torch.isfinite(stats)).sum())
        raise EditError(
            f"second-moment statistics of layer {layer} contain {bad} NaN/inf entries; recompute them "
            "(delete the cached file) from text on which the model's activations are finite"
        )
    if not float(stats.diagonal().abs().max()) > 0:
        raise EditError(
            f"second-moment statistics of layer {layer} are all zero (no MLP key ever fired on the text they were "
            "computed from), so no least-squares edit is defined; recompute them from more or other text"
        )


def _batches(tokenizer: Any, texts: Iterable[str], config: StatsConfig) -> Iterator[Tensor]:
    rows: list[list[int]] = []
    for window in packed_rows(tokenizer, texts, config.seq_len):  # BOS first where the tokenizer adds one
        rows.append(window)
        if len(rows) == config.batch_size:
            yield torch.tensor(rows, dtype=torch.long)
            rows = []
    if rows:
        yield torch.tensor(rows, dtype=torch.long)


def second_moments(
    model: Any,
    layers: Sequence[int],
    *,
    config: StatsConfig | None = None,
    texts: Iterable[str] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    max_batches: int | None = None,
) -> dict[int, Float[Tensor, "d_mlp d_mlp"]]:
    """``E[k k^T]`` of the MLP keys (``blocks.{L}.mlp.hook_post``) of each of `layers`, from disk when cached.

    Layers missing from the cache are computed together in one pass over `texts` (default: the model's
    default text, :func:`resolve_stream`) of ``config.n_tokens`` tokens; partial sums are checkpointed every
    ``config.checkpoint_every`` batches, and a later call resumes from them. ``max_batches`` stops
    early after that many new batches, leaving the checkpoint, and returns only the layers that
    were already cached (used to test resuming).
    """
    config = resolve_stream(model, config or StatsConfig(), texts)
    layers = sorted(set(int(layer) for layer in layers))
    if not layers:
        raise ConfigError("expected at least one layer for second-moment statistics")
    for layer in layers:
        if not 0 <= layer < model.dims.n_layers:
            raise ConfigError(f"layer {layer} does not exist; this model has layers 0..{model.dims.n_layers - 1}")
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    fp = model.fingerprint()
    start = len(special_prefix(model.tokenizer))
    d_mlp = model.dims.d_mlp
    out: dict[int, Tensor] = {}
    for layer in layers:
        path = folder / f"{stats_key(fp, layer, config, start=start)}.safetensors"
        if path.is_file():
            try:
                tensors = read_envelope(path, STATS_SCHEMA).tensors
            except ConfigError as exc:
                raise EditError(f"{str(path)!r} is not a mechscope statistics file: {exc}") from exc
            if "mom2" not in tensors:
                raise EditError(f"{str(path)!r} is not a mechscope statistics file (no 'mom2' tensor)")
            check_stats(tensors["mom2"], layer, d_mlp)
            out[layer] = tensors["mom2"].to(model.device)
    todo = [layer for layer in layers if layer not in out]
    if todo:
        computed = _compute(model, todo, config, texts, folder, fp, progress, max_batches, start)
        if computed is None:
            return out
        out.update(computed)
    return {layer: out[layer] for layer in layers}


def _compute(
    model: Any,
    layers: list[int],
    config: StatsConfig,
    texts: Iterable[str] | None,
    folder: Path,
    fp: str,
    progress: bool,
    max_batches: int | None,
    start: int,
) -> dict[int, Tensor] | None:
    """The statistics over the text stream's windows, leaving out each window's first `start` tokens (the BOS
    the tokenizer puts before text: no key is ever edited there, and its activations are outliers)."""
    from tqdm.auto import tqdm

    if model.tokenizer is None:
        raise ConfigError("computing statistics from text needs the model's tokenizer")
    d_mlp = model.dims.d_mlp
    tag = stats_key(fp, "_".join(map(str, layers)), config, start=start)
    partial = folder / f"{tag}.partial.safetensors"
    sums = {layer: torch.zeros(d_mlp, d_mlp, dtype=torch.float64) for layer in layers}
    done_batches, done_tokens = 0, 0
    if partial.is_file():
        try:
            saved = read_envelope(partial, STATS_SCHEMA)
        except ConfigError:
            saved = None  # an unreadable or older checkpoint is recomputed, never trusted
        if saved is not None and saved.kind == "partial" and saved.body.get("config") == asdict(config):
            sums = {layer: saved.tensors[f"sum/{layer}"] for layer in layers}
            done_batches, done_tokens = int(saved.body["batches"]), int(saved.body["tokens"])
    stream = texts if texts is not None else default_stream_texts(model, str(config.stream), config.seed)
    sites = [f"blocks.{layer}.mlp.hook_post" for layer in layers]
    stop = max(layers) + 1
    bar = tqdm(total=config.n_tokens, initial=done_tokens, desc="MLP key statistics", unit="tok", disable=not progress)

    def checkpoint(batches: int, tokens: int) -> None:
        body = {"config": asdict(config), "batches": batches, "tokens": tokens}
        tensors = {f"sum/{layer}": s for layer, s in sums.items()}
        write_envelope(partial, Envelope("partial", body, tensors, ModelInfo(fingerprint=fp)), STATS_SCHEMA)

    new = 0
    index = -1
    try:
        for index, batch in enumerate(_batches(model.tokenizer, stream, config)):
            if index < done_batches:
                continue
            if done_tokens >= config.n_tokens:
                break
            _, cache = model.run_with_cache(batch, sites, stop_at_layer=stop if stop < model.dims.n_layers else None)
            take = min(batch[:, start:].numel(), config.n_tokens - done_tokens)
            for layer, site in zip(layers, sites, strict=True):
                keys = cache[site][:, start:].reshape(-1, d_mlp)[:take].to("cpu", torch.float64)
                sums[layer] += keys.T @ keys
            done_tokens += take
            done_batches = index + 1
            new += 1
            bar.update(take)
            if done_batches % config.checkpoint_every == 0:
                checkpoint(done_batches, done_tokens)
            if max_batches is not None and new >= max_batches and done_tokens < config.n_tokens:
                checkpoint(done_batches, done_tokens)
                return None
    finally:
        bar.close()
    if done_tokens == 0:
        raise ConfigError("the text stream gave no complete window of tokens; give more text or a shorter seq_len")
    if done_tokens < config.n_tokens:
        raise ConfigError(
            f"the text stream ran out after {done_tokens} tokens; expected {config.n_tokens} "
            "(give more text or a smaller n_tokens)"
        )
    result: dict[int, Tensor] = {}
    for layer in layers:
        mom2 = (sums[layer] / done_tokens).to(torch.float32)
        check_stats(mom2, layer, d_mlp)
        body = {"layer": layer, "tokens": done_tokens, "config": asdict(config)}
        envelope = Envelope("mom2", body, {"mom2": mom2}, ModelInfo(fingerprint=fp))
        write_envelope(folder / f"{stats_key(fp, layer, config, start=start)}.safetensors", envelope, STATS_SCHEMA)
        result[layer] = mom2.to(model.device)
    partial.unlink(missing_ok=True)
    return result


__all__ = [
    "StatsConfig",
    "check_stats",
    "default_cache_dir",
    "default_stream_texts",
    "resolve_stream",
    "second_moments",
    "stats_key",
    "zoo_texts",
]
