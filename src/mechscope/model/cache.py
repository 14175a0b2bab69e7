"""ActivationCache: the activations of one run, keyed by canonical site name.

Only requested sites are stored. ``attn.hook_result`` is kept as ``hook_z`` and expanded to per-head
outputs on first access (the same ``z @ W_O`` the hook would compute), which keeps caching every site
cheap in time and memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechscope.errors import SiteError, did_you_mean
from mechscope.io import Envelope, FileSchema, read_envelope, register_schema, write_envelope
from mechscope.sites import Site, SiteLike


def _cache_v1_to_v2(header: dict[str, str]) -> dict[str, str]:
    """Schema 1 kept positions and meta as separate header keys."""
    body = {"positions": json.loads(header.get("positions", "null")), "meta": json.loads(header.get("meta", "{}"))}
    return {**header, "kind": "activation_cache", "body": json.dumps(body), "model": "null"}


CACHE_SCHEMA = register_schema(FileSchema("activation_cache", 2, "activation cache", {1: _cache_v1_to_v2}))
SCHEMA_VERSION = CACHE_SCHEMA.version


class ActivationCache(Mapping[str, Tensor]):
    """Read-only mapping from canonical site names (or :class:`Site`) to activation tensors."""

    def __init__(
        self,
        tensors: dict[str, Tensor] | None = None,
        *,
        lazy: dict[str, Callable[[], Tensor]] | None = None,
        positions: list[int] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self._tensors: dict[str, Tensor] = dict(tensors or {})
        self._lazy: dict[str, Callable[[], Tensor]] = dict(lazy or {})
        #: Positions kept (None: all), so users can map cached rows back to tokens.
        self.positions = positions
        self.meta: dict[str, Any] = dict(meta or {})

    # Mapping protocol ---------------------------------------------------------------------------------
    def __getitem__(self, key: SiteLike) -> Tensor:
        name = Site.parse(key).name
        if name in self._tensors:
            return self._tensors[name]
        if name in self._lazy:
            self._tensors[name] = self._lazy.pop(name)()
            return self._tensors[name]
        raise SiteError(
            f"site {name!r} was not cached; cached sites: {len(self)}.{did_you_mean(name, list(self))} "
            "Pass it in `sites=` to run_with_cache."
        )

    def __iter__(self) -> Iterator[str]:
        names = [*self._tensors, *self._lazy]
        return iter(sorted(names, key=lambda n: Site.parse(n).order))

    def __len__(self) -> int:
        return len(self._tensors) + len(self._lazy)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, (str, Site)):
            return False
        try:
            name = Site.parse(key).name
        except SiteError:
            return False
        return name in self._tensors or name in self._lazy

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} sites, positions={self.positions})"

    # Conveniences -------------------------------------------------------------------------------------
    def stack(self, kind: str, layers: list[int] | None = None) -> Tensor:
        """Stack one per-layer site over layers: ``cache.stack("hook_resid_post")`` -> [n_layers, ...]."""
        chosen = [
            Site.parse(n)
            for n in self
            if Site.parse(n).kind == kind and (layers is None or Site.parse(n).layer in layers)
        ]
        if not chosen:
            raise SiteError(
                f"no cached site of kind {kind!r}; cached kinds: {sorted({Site.parse(n).kind for n in self})}"
            )
        return torch.stack([self[s] for s in chosen])

    def to(self, device: str | torch.device) -> ActivationCache:
        """A copy with every materialised tensor on `device`."""
        return ActivationCache(
            {k: v.to(device) for k, v in self.materialised().items()},
            positions=self.positions,
            meta=self.meta,
        )

    def materialised(self) -> dict[str, Tensor]:
        """Every site as a plain tensor (computes lazy ones)."""
        return {name: self[name] for name in list(self)}

    # Files --------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write one safetensors file; positions and meta in its JSON header."""
        body = {"positions": self.positions, "meta": self.meta}
        return write_envelope(path, Envelope("activation_cache", body, self.materialised()), CACHE_SCHEMA)

    @classmethod
    def load(cls, path: str | Path) -> ActivationCache:
        """Read a file written by :meth:`save`, validating its format and schema."""
        envelope = read_envelope(path, CACHE_SCHEMA)
        tensors, body = envelope.tensors, envelope.body
        return cls(
            tensors,
            positions=body.get("positions"),
            meta=body.get("meta", {}),
        )
