"""Canonical site names: one spelling for every place in a model that can be read or written.

Names follow TransformerLens's (``blocks.3.attn.hook_z``) because SAE releases, Neuronpedia and circuit
tools already use them. A :class:`Site` is the parsed form; strings and Sites are accepted everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mechscope.errors import SiteError, did_you_mean

if TYPE_CHECKING:
    import torch
    from torch import Tensor

#: Sites outside the blocks, in forward order.
GLOBAL_KINDS_BEFORE: tuple[str, ...] = ("hook_embed", "hook_pos_embed")
GLOBAL_KINDS_AFTER: tuple[str, ...] = ("ln_final.hook_normalized", "logits")

#: Per-block sites, in the order a forward pass produces them.
BLOCK_KINDS: tuple[str, ...] = (
    "hook_resid_pre",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "attn.hook_result",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_pre_linear",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)

#: Sites computed inside the attention function (not module boundaries in HF).
ATTENTION_INTERNAL_KINDS: frozenset[str] = frozenset(
    {"attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z"}
)
#: Sites that need the attention probabilities to be materialised (eager computation).
PATTERN_KINDS: frozenset[str] = frozenset({"attn.hook_attn_scores", "attn.hook_pattern"})

#: Axis names of each site's activation, in the dimension vocabulary of the design doc.
SITE_AXES: dict[str, tuple[str, ...]] = {
    "hook_embed": ("batch", "pos", "d_model"),
    "hook_pos_embed": ("batch", "pos", "d_model"),
    "ln_final.hook_normalized": ("batch", "pos", "d_model"),
    "logits": ("batch", "pos", "d_vocab"),
    "hook_resid_pre": ("batch", "pos", "d_model"),
    "ln1.hook_normalized": ("batch", "pos", "d_model"),
    "attn.hook_q": ("batch", "pos", "n_heads", "d_head"),
    "attn.hook_k": ("batch", "pos", "n_kv_heads", "d_head"),
    "attn.hook_v": ("batch", "pos", "n_kv_heads", "d_head"),
    "attn.hook_attn_scores": ("batch", "n_heads", "query_pos", "key_pos"),
    "attn.hook_pattern": ("batch", "n_heads", "query_pos", "key_pos"),
    "attn.hook_z": ("batch", "pos", "n_heads", "d_head"),
    "attn.hook_result": ("batch", "pos", "n_heads", "d_model"),
    "hook_attn_out": ("batch", "pos", "d_model"),
    "hook_resid_mid": ("batch", "pos", "d_model"),
    "ln2.hook_normalized": ("batch", "pos", "d_model"),
    "mlp.hook_pre": ("batch", "pos", "d_mlp"),
    "mlp.hook_pre_linear": ("batch", "pos", "d_mlp"),
    "mlp.hook_post": ("batch", "pos", "d_mlp"),
    "hook_mlp_out": ("batch", "pos", "d_model"),
    "hook_resid_post": ("batch", "pos", "d_model"),
}

ALL_KINDS: tuple[str, ...] = GLOBAL_KINDS_BEFORE + BLOCK_KINDS + GLOBAL_KINDS_AFTER
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True, order=True)
class Site:
    """A parsed canonical site: a kind (``"attn.hook_z"``) and, inside blocks, a layer index."""

    kind: str
    layer: int | None = None

    def __post_init__(self) -> None:
        if self.kind in BLOCK_KINDS:
            if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
                raise SiteError(
                    f"site kind {self.kind!r} lives inside a block and needs a layer index >= 0; "
                    f"got layer={self.layer!r}"
                )
        elif self.kind in GLOBAL_KINDS_BEFORE + GLOBAL_KINDS_AFTER:
            if self.layer is not None:
                raise SiteError(f"site kind {self.kind!r} is outside the blocks; got layer={self.layer!r}")
        else:
            raise SiteError(f"unknown site kind {self.kind!r}.{did_you_mean(self.kind, ALL_KINDS)}")

    @property
    def name(self) -> str:
        """The canonical string, e.g. ``blocks.2.hook_resid_post``."""
        return self.kind if self.layer is None else f"blocks.{self.layer}.{self.kind}"

    @property
    def axes(self) -> tuple[str, ...]:
        """Axis names of this site's activation tensor."""
        return SITE_AXES[self.kind]

    @property
    def pos_axis(self) -> int:
        """Index of the (query) position axis in this site's activation."""
        return self.axes.index("query_pos") if "query_pos" in self.axes else self.axes.index("pos")

    @property
    def is_attention_internal(self) -> bool:
        return self.kind in ATTENTION_INTERNAL_KINDS

    @property
    def order(self) -> tuple[int, int]:
        """Sort key in forward-pass order."""
        if self.kind in GLOBAL_KINDS_BEFORE:
            return (-1, GLOBAL_KINDS_BEFORE.index(self.kind))
        if self.kind in GLOBAL_KINDS_AFTER:
            return (1 << 30, GLOBAL_KINDS_AFTER.index(self.kind))
        assert self.layer is not None
        return (self.layer, BLOCK_KINDS.index(self.kind))

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: str | Site) -> Site:
        """Parse a canonical name; raise :class:`SiteError` with close matches when it is not one."""
        if isinstance(name, Site):
            return name
        if not isinstance(name, str):
            raise SiteError(f"a site must be a canonical name string or a Site; got {type(name).__name__}")
        match = _BLOCK_RE.match(name)
        if match:
            kind = match.group(2)
            if kind not in BLOCK_KINDS:
                example = [f"blocks.{match.group(1)}.{k}" for k in BLOCK_KINDS]
                raise SiteError(f"unknown site {name!r}.{did_you_mean(name, example)}")
            return cls(kind, int(match.group(1)))
        if name in GLOBAL_KINDS_BEFORE + GLOBAL_KINDS_AFTER:
            return cls(name)
        hint = did_you_mean(name, [*GLOBAL_KINDS_BEFORE, *GLOBAL_KINDS_AFTER, *(f"blocks.0.{k}" for k in BLOCK_KINDS)])
        raise SiteError(f"unknown site {name!r}; expected 'blocks.<layer>.<kind>' or a global site.{hint}")


SiteLike = str | Site


#: Axis names that index attention heads (query heads, or the shared key/value heads of GQA).
HEAD_AXES: tuple[str, ...] = ("n_heads", "n_kv_heads")


@dataclass(frozen=True)
class Selection:
    """Which entries of a site's activation an operation touches: heads, positions and neurons.

    ``None`` selects every entry of that axis. Heads index the site's head axis, neurons its last axis;
    positions index its (query) position axis, negative from the end, and positions outside the current
    forward are skipped (so ``(-1,)`` means the newest token during generation). One value shared by hook
    helpers, interventions and patching, so every caller selects the same way.
    """

    heads: tuple[int, ...] | None = None
    positions: tuple[int, ...] | None = None
    neurons: tuple[int, ...] | None = None

    @classmethod
    def of(
        cls,
        *,
        heads: Iterable[int] | int | None = None,
        positions: Iterable[int] | int | None = None,
        neurons: Iterable[int] | int | None = None,
    ) -> Selection:
        def norm(value: Iterable[int] | int | None) -> tuple[int, ...] | None:
            if value is None:
                return None
            return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)

        return cls(norm(heads), norm(positions), norm(neurons))

    @property
    def everything(self) -> bool:
        return self.heads is None and self.positions is None and self.neurons is None

    def head_axis(self, site: Site) -> int:
        """The site's head axis; :class:`SiteError` when it has none."""
        found = [i for i, a in enumerate(site.axes) if a in HEAD_AXES]
        if not found:
            raise SiteError(f"site {site.name} has no head axis (axes {site.axes}); heads= does not apply")
        return found[0]

    def check(self, site: Site, sizes: dict[str, int]) -> None:
        """Raise :class:`SiteError` for heads/neurons out of range of `site` (`sizes`: axis name -> size)."""
        for what, values, axis in (
            ("heads", self.heads, site.axes[self.head_axis(site)] if self.heads is not None else ""),
            ("neurons", self.neurons, site.axes[-1]),
        ):
            size = sizes.get(axis)
            if values is None or size is None:
                continue
            bad = [v for v in values if not -size <= v < size]
            if bad:
                raise SiteError(f"{what} {bad} are out of range for {site.name}, whose axis has {size} entries")

    def mask(self, site: Site, shape: Sequence[int], device: torch.device | None = None) -> Tensor | None:
        """A boolean mask broadcastable to `shape`, or None when everything is selected."""
        import torch

        if self.everything:
            return None
        ndim = len(shape)
        mask = torch.ones((1,) * ndim, dtype=torch.bool, device=device)

        def along(axis: int, index: Sequence[int], skip_outside: bool) -> torch.Tensor:
            n = int(shape[axis])
            keep = torch.zeros(n, dtype=torch.bool, device=device)
            idx = [i % n for i in index if -n <= i < n] if skip_outside else [i % n for i in index]
            if idx:
                keep[torch.tensor(idx, device=device)] = True
            view = [1] * ndim
            view[axis] = n
            return keep.view(view)

        if self.heads is not None:
            mask = mask & along(self.head_axis(site), self.heads, skip_outside=False)
        if self.positions is not None:
            mask = mask & along(site.pos_axis, self.positions, skip_outside=True)
        if self.neurons is not None:
            mask = mask & along(ndim - 1, self.neurons, skip_outside=False)
        return mask


def parse_sites(sites: SiteLike | Iterable[SiteLike]) -> list[Site]:
    """Parse one site or many into a de-duplicated list, in the order given."""
    if isinstance(sites, (str, Site)):
        items: Iterable[SiteLike] = [sites]
    elif isinstance(sites, Iterable):
        items = sites
    else:
        raise SiteError(f"sites must be a site name, a Site or an iterable of them; got {type(sites).__name__}")
    seen: dict[Site, None] = {}
    for item in items:
        seen[Site.parse(item)] = None
    return list(seen)


def filter_sites(
    sites: Iterable[Site], *, kinds: Sequence[str] | str | None = None, layers: Iterable[int] | None = None
) -> list[Site]:
    """Keep the sites whose kind is in `kinds` (e.g. ``"hook_resid_post"``) and layer in `layers`."""
    kind_set = {kinds} if isinstance(kinds, str) else (set(kinds) if kinds is not None else None)
    layer_set = set(layers) if layers is not None else None
    return [
        s
        for s in sites
        if (kind_set is None or s.kind in kind_set)
        and (layer_set is None or (s.layer is not None and s.layer in layer_set))
    ]


# Helper constructors, so editors can complete site names.
def embed() -> Site:
    return Site("hook_embed")


def pos_embed() -> Site:
    return Site("hook_pos_embed")


def final_norm() -> Site:
    return Site("ln_final.hook_normalized")


def logits() -> Site:
    return Site("logits")


def resid_pre(layer: int) -> Site:
    return Site("hook_resid_pre", layer)


def resid_mid(layer: int) -> Site:
    return Site("hook_resid_mid", layer)


def resid_post(layer: int) -> Site:
    return Site("hook_resid_post", layer)


def attn_out(layer: int) -> Site:
    return Site("hook_attn_out", layer)


def mlp_out(layer: int) -> Site:
    return Site("hook_mlp_out", layer)


def q(layer: int) -> Site:
    return Site("attn.hook_q", layer)


def k(layer: int) -> Site:
    return Site("attn.hook_k", layer)


def v(layer: int) -> Site:
    return Site("attn.hook_v", layer)


def attn_scores(layer: int) -> Site:
    return Site("attn.hook_attn_scores", layer)


def pattern(layer: int) -> Site:
    return Site("attn.hook_pattern", layer)


def z(layer: int) -> Site:
    return Site("attn.hook_z", layer)


def result(layer: int) -> Site:
    return Site("attn.hook_result", layer)


def mlp_pre(layer: int) -> Site:
    return Site("mlp.hook_pre", layer)


def mlp_pre_linear(layer: int) -> Site:
    return Site("mlp.hook_pre_linear", layer)


def mlp_post(layer: int) -> Site:
    return Site("mlp.hook_post", layer)


def ln1(layer: int) -> Site:
    return Site("ln1.hook_normalized", layer)


def ln2(layer: int) -> Site:
    return Site("ln2.hook_normalized", layer)
