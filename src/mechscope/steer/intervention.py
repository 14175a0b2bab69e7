"""The common base of every intervention: a hook plan bound to one model, applied in a ``with`` block.

An :class:`Intervention` turns into ``model.hooks({site: fn})`` when entered and removes every hook
when left (also when the block raises), so interventions compose by nesting
(``with ablation, steering: ...``; the outer one runs first at a shared site). They act on every
forward the wrapped HF model makes inside the block -- :meth:`HookedModel.forward`,
:meth:`HookedModel.generate` and plain ``hf_model(...)`` calls alike -- and know whether a forward
reads the prompt or generated tokens (``phase``), from the KV cache HF passes in. They also note each prompt
forward's input ids and attention mask, so that positions count each row's own tokens on a padded batch
(:meth:`Intervention.row_positions`) and each row's BOS can be told apart.

:class:`Artifact` (the file side, tied to a model by fingerprint) lives on the ground floor,
:mod:`mechscope.results`; it is re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor, nn

from mechscope.errors import ConfigError, SiteError
from mechscope.model.hooks import HookFn
from mechscope.model.kv_cache import cache_argument
from mechscope.model.tokens import row_positions_mask
from mechscope.results import ARTIFACT_FORMAT, Artifact, ModelMismatchError
from mechscope.sites import Selection, Site, SiteLike, parse_sites

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

Phase = Literal["prompt", "generated"]
_Self = TypeVar("_Self", bound="Intervention")


def check_finite(name: str, value: float) -> float:
    """`value` as a float, or :class:`ConfigError` when it is NaN, infinite or not a number."""
    try:
        out = float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a finite number; got {value!r}") from exc
    if not math.isfinite(out):
        raise ConfigError(f"{name} must be a finite number; got {out}")
    return out


def require_hooked(model: Any) -> HookedModel:
    from mechscope.model.hooked import HookedModel

    if not isinstance(model, HookedModel):
        raise ConfigError(f"expected a mechscope HookedModel (mechscope.load_model(...)); got {type(model).__name__}")
    return model


def resolve_sites(model: HookedModel, sites: SiteLike | Iterable[SiteLike]) -> list[Site]:
    """Validate `sites` against `model` (at least one)."""
    chosen = [model.site(s) for s in parse_sites(sites)]
    if not chosen:
        raise ConfigError("expected at least one site; got none")
    return chosen


def axis_size(model: HookedModel, axis: str) -> int | None:
    """The size of a named model axis (``d_model``, ``n_heads``...), None for batch/positions."""
    return _axis_sizes(model).get(axis)


def _axis_sizes(model: HookedModel) -> dict[str, int]:
    d = model.dims
    return {
        "d_model": d.d_model,
        "n_heads": d.n_heads,
        "n_kv_heads": d.n_kv_heads,
        "d_head": d.d_head,
        "d_mlp": d.d_mlp,
        "d_vocab": d.d_vocab,
    }


def validate_selection(
    model: HookedModel,
    site: Site,
    *,
    heads: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
) -> None:
    """Check that `heads` / `neurons` make sense for `site` on `model` (before any hook exists)."""
    try:
        Selection.of(heads=heads, neurons=neurons).check(site, _axis_sizes(model))
    except SiteError as exc:
        raise ConfigError(str(exc)) from None


def selection_mask(
    site: Site,
    shape: torch.Size,
    device: torch.device,
    *,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
) -> Tensor | None:
    """A boolean mask (broadcastable to `shape`) of the selected entries; None selects everything
    (see :class:`~mechscope.sites.Selection`)."""
    return Selection.of(heads=heads, positions=positions, neurons=neurons).mask(site, shape, device)


def forward_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor | None, Tensor | None]:
    """``(input_ids, attention_mask)``, each [batch, pos] or None, of the arguments of a prompt forward of an
    HF model: the ids unless it was given embeddings; the mask as given, or all ones when none was (from the
    ids' or embeddings' shape). A mask whose shape is not the inputs' is dropped (None)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    ids = ids if isinstance(ids, Tensor) and ids.ndim == 2 else None
    embeds = kwargs.get("inputs_embeds")
    inputs = ids if ids is not None else embeds if isinstance(embeds, Tensor) and embeds.ndim == 3 else None
    shape = None if inputs is None else tuple(inputs.shape[:2])
    mask = kwargs.get("attention_mask")
    if mask is None and inputs is not None:
        mask = torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device)
    if not isinstance(mask, Tensor) or mask.ndim != 2 or (shape is not None and tuple(mask.shape) != shape):
        mask = None
    return ids, mask


def open_hooks(model: HookedModel, pre_hooks: Sequence[Any], plan: dict[Site, list[HookFn]]) -> ExitStack:
    """Attach `pre_hooks` (forward pre-hooks with kwargs on the HF model) and the hook `plan`; returns the
    stack that removes them all. Nothing stays attached when attaching fails part-way."""
    stack = ExitStack()
    try:
        for pre_hook in pre_hooks:
            handle = model.hf_model.register_forward_pre_hook(pre_hook, with_kwargs=True)
            stack.callback(handle.remove)
        stack.enter_context(model.hooks(plan))  # type: ignore[arg-type]
    except BaseException:
        stack.close()
        raise
    return stack


class Intervention:
    """A change to a model's forward pass, active inside ``with intervention:`` only.

    Subclasses build their hook plan in :meth:`hook_plan` and validate everything in ``__init__``,
    so that a bad argument fails before any hook is attached and leaves the model untouched.
    """

    kind: ClassVar[str] = "intervention"
    #: Interventions this one is made of (their hooks are in its plan): each sees every forward it sees.
    children: Sequence[Intervention] = ()
    #: The current prompt forward's input ids and attention mask, [batch, pos] (None during a generation
    #: step, which reads one new column, or when the forward did not give them).
    forward_ids: Tensor | None = None
    forward_mask: Tensor | None = None

    def __init__(self, model: HookedModel) -> None:
        self.model = require_hooked(model)
        self.phase: Phase = "prompt"
        self._stack: ExitStack | None = None
        self._row_positions: dict[tuple[int, ...], Tensor | None] = {}  # this forward's, by selection

    def hook_plan(self) -> dict[Site, list[HookFn]]:
        """``{site: [fn, ...]}`` to attach while active: by default the children's plans, in their order."""
        if not self.children:
            raise NotImplementedError(f"{type(self).__name__} has neither a hook plan nor children")
        plan: dict[Site, list[HookFn]] = {}
        for child in self.children:
            for site, fns in child.hook_plan().items():
                plan.setdefault(site, []).extend(fns)
        return plan

    @property
    def active(self) -> bool:
        return self._stack is not None

    def __enter__(self: _Self) -> _Self:  # `with conditional(...) as c:` types c as a ConditionalSteering
        if self._stack is not None:
            raise ConfigError(f"{type(self).__name__} is already active; build a second one to apply it twice")
        self._stack = open_hooks(self.model, [self._track_phase], self.hook_plan())
        return self

    def __exit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def _track_phase(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A forward pre-hook on the HF model: note whether this forward reads the prompt or generated
        tokens (and whatever else a subclass needs of its inputs), here and in every child."""
        cache = cache_argument(kwargs)
        seen = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            seen = int(cache.get_seq_length())
        self.phase = "prompt" if seen == 0 else "generated"
        self.forward_ids, self.forward_mask = forward_inputs(args, kwargs) if self.phase == "prompt" else (None, None)
        self._row_positions = {}
        for child in self.children:
            child._track_phase(module, args, kwargs)

    def row_positions(self, positions: Sequence[int], n_pos: int) -> Tensor | None:
        """[batch, pos] bool: `positions` counted in each row's own tokens of the current prompt forward --
        negative from its last real token, non-negative from its first -- when that forward is padded, so a
        position names the same token of a text whatever the padding around it (and none in a row too short
        for it). None for an unpadded forward or a generation step: positions are then the forward's columns."""
        mask = self.forward_mask
        if mask is None or mask.shape[1] != n_pos:
            return None
        key = tuple(positions)
        if key not in self._row_positions:  # one check per forward and selection, not per layer
            self._row_positions[key] = None if bool(mask.bool().all()) else row_positions_mask(mask, key)
        return self._row_positions[key]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"

    def describe(self) -> str:
        """A one-line human description (used in reports)."""
        return self.kind


@contextmanager
def applied(*interventions: Intervention) -> Iterator[tuple[Intervention, ...]]:
    """Enter several interventions in order (the first is outermost) and leave them all."""
    with ExitStack() as stack:
        for intervention in interventions:
            stack.enter_context(intervention)
        yield interventions


__all__ = [
    "ARTIFACT_FORMAT",
    "Artifact",
    "Intervention",
    "ModelMismatchError",
    "Phase",
    "applied",
    "check_finite",
    "forward_inputs",
    "open_hooks",
    "resolve_sites",
    "selection_mask",
    "validate_selection",
]
