"""The activation store's manifest: what was collected, how, on which model, and which shards are complete.

A store is a folder of ``shard-NNNNN.safetensors`` files and one ``manifest.json`` (mechscope's JSON
envelope, family ``activation_store``). The manifest is rewritten atomically after each shard is
renamed into place, so it lists exactly the complete shards, each with its row count and the SHA-256 of
its bytes (checked when read) and of its token ids (checked when a collection resumes, so a resumed
run cannot silently continue over another corpus).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mechscope.errors import ConfigError
from mechscope.io import (
    Envelope,
    FileSchema,
    ModelInfo,
    read_json_envelope,
    register_schema,
    write_json_envelope,
)

STORE_SCHEMA = register_schema(FileSchema("activation_store", 1, "activation store manifest"))
MANIFEST = "manifest.json"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


_BODY_KEYS = {"settings", "settings_hash", "widths", "shards", "complete", "rows", "tokens", "bytes"}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


@dataclass(frozen=True, kw_only=True)
class StoreSettings:
    """How a store is collected (hashed: a resumed collection must use the same).

    Attributes:
        sites: canonical sites collected at every token.
        dtype: storage dtype, ``fp32``, ``bf16`` or ``fp16``.
        seq_len: tokens per row; ``skip_first``: position 0 of each row left out of the activations.
        rows_per_shard: rows per shard file (the unit of resumption).
        max_tokens: stop after this many activation rows (None: the whole corpus).
    """

    sites: tuple[str, ...]
    dtype: str = "bf16"
    seq_len: int = 128
    skip_first: bool = True
    rows_per_shard: int = 256
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.sites or len(set(self.sites)) != len(self.sites):
            raise ConfigError(f"expected one or more distinct sites, got {list(self.sites)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"expected dtype one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.seq_len < 2 or self.rows_per_shard < 1:
            raise ConfigError(
                f"expected seq_len >= 2 and rows_per_shard >= 1, got {self.seq_len}, {self.rows_per_shard}"
            )
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"expected max_tokens >= 1 or None, got {self.max_tokens}")

    @property
    def per_row(self) -> int:
        """Activation rows (tokens) per token row."""
        return self.seq_len - int(self.skip_first)

    def digest(self, model: ModelInfo) -> str:
        data = json.dumps({"settings": asdict(self), "model": model.fingerprint}, sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()[:16]


@dataclass
class Manifest:
    """The manifest's content (see the module docstring)."""

    settings: StoreSettings
    model: ModelInfo
    widths: dict[str, int]
    shards: list[dict[str, Any]] = field(default_factory=list)  # file, rows, sha256, tokens_sha256, bytes
    complete: bool = False
    #: Further body fields kept as they are (a store written by several ranks: its parts, what is missing).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(int(s["rows"]) for s in self.shards)

    @property
    def tokens(self) -> int:
        """Activation rows per site."""
        return self.rows * self.settings.per_row

    @property
    def bytes(self) -> int:
        return sum(int(s["bytes"]) for s in self.shards)

    def save(self, folder: Path) -> None:
        body = {
            "settings": asdict(self.settings),
            "settings_hash": self.settings.digest(self.model),
            "widths": self.widths,
            "shards": self.shards,
            "complete": self.complete,
            "rows": self.rows,
            "tokens": self.tokens,
            "bytes": self.bytes,
            **self.extra,
        }
        write_json_envelope(folder / MANIFEST, Envelope("activation_store", body, model=self.model), STORE_SCHEMA)

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        if not path.is_file():
            raise ConfigError(f"no activation store at {str(folder)!r} (expected {MANIFEST} there)")
        envelope = read_json_envelope(path, STORE_SCHEMA)
        body = envelope.body
        if envelope.model is None:
            raise ConfigError(f"{path}: the manifest names no model")
        try:
            raw = dict(body["settings"])
            raw["sites"] = tuple(raw["sites"])
            settings = StoreSettings(**raw)
            manifest = cls(settings, envelope.model, {k: int(v) for k, v in body["widths"].items()})
            manifest.shards = [dict(s) for s in body["shards"]]
            manifest.complete = bool(body["complete"])
            manifest.extra = {k: v for k, v in body.items() if k not in _BODY_KEYS}
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: malformed activation store manifest ({exc!r})") from exc
        if body.get("settings_hash") != settings.digest(envelope.model):
            raise ConfigError(f"{path}: the settings hash does not match the settings (edited by hand?)")
        return manifest


__all__ = ["DTYPES", "MANIFEST", "STORE_SCHEMA", "Manifest", "StoreSettings", "shard_name"]
