"""Hook sessions: attach user functions to canonical sites for the duration of a ``with`` block.

A hook function is ``fn(activation, ctx) -> Tensor | None``. Returning None keeps the activation
(reading, or editing in place); returning a tensor of the same shape replaces it. Each session groups
its sites by HF module so that one torch hook per module runs all of them, and removes every hook in
``finally`` -- also when the block raises. Sessions are thread-local: torch hooks live on modules that
every thread shares, so each hook checks the running thread and stays inert for forwards of other threads
(a forward in a thread without a session sees no hooks).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mechscope.errors import ShapeError
from mechscope.model.attention import HANDLERS_ATTR
from mechscope.sites import BLOCK_KINDS, Site

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel
    from mechscope.model.layout import ModelLayout


@dataclass(frozen=True)
class HookContext:
    """What a hook function knows about where it runs."""

    site: Site
    model: HookedModel

    @property
    def name(self) -> str:
        return self.site.name

    @property
    def layer(self) -> int | None:
        return self.site.layer


HookFn = Callable[[Tensor, HookContext], "Tensor | None"]


def apply_hook(fn: HookFn, activation: Tensor, ctx: HookContext) -> Tensor:
    """Run one hook function and validate what it returns."""
    out = fn(activation, ctx)
    if out is None:
        return activation
    if not isinstance(out, Tensor):
        raise ShapeError(
            f"hook on {ctx.name} must return None or a tensor of shape {tuple(activation.shape)}; "
            f"got {type(out).__name__}"
        )
    if out.shape != activation.shape:
        raise ShapeError(
            f"hook on {ctx.name} returned shape {tuple(out.shape)}; expected {tuple(activation.shape)} "
            f"(axes {ctx.site.axes})"
        )
    if out.dtype != activation.dtype or out.device != activation.device:
        out = out.to(device=activation.device, dtype=activation.dtype)
    return out


def _chain(fns: list[HookFn], activation: Tensor, ctx: HookContext) -> Tensor:
    for fn in fns:
        activation = apply_hook(fn, activation, ctx)
    return activation


def _first_tensor(value: Any) -> Tensor:
    return value if isinstance(value, Tensor) else value[0]


def _replace_first(value: Any, new: Tensor) -> Any:
    if isinstance(value, Tensor):
        return new
    return (new, *value[1:])


class HookSession:
    """The torch hooks of one ``model.hooks({...})`` block. Use it as a context manager.

    It reads module paths and weights from the model's :class:`~mechscope.model.layout.ModelLayout`;
    `owner` (the HookedModel) is only handed to hook functions in their :class:`HookContext`. The
    owner keeps its own list of active sessions (this class never edits it)."""

    def __init__(self, layout: ModelLayout, hooks: dict[Site, list[HookFn]], owner: HookedModel) -> None:
        self.layout = layout
        self.owner = owner
        self.hooks = hooks
        #: sessions are thread-local: their hooks act only on forwards run by the thread that opened them
        self._thread = threading.get_ident()
        self._handles: list[RemovableHandle] = []
        self._attention_modules: list[tuple[nn.Module, dict[str, Any]]] = []
        self._stash: dict[int, Tensor] = {}

    # Installation -----------------------------------------------------------------------------------
    def __enter__(self) -> HookSession:
        try:
            self._install()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, entry in self._attention_modules:
            chain: list[dict[str, Any]] = module.__dict__.get("_mechscope_attention_chain", [])
            if entry in chain:
                chain.remove(entry)
            _refresh_attention_handlers(module)
        self._attention_modules.clear()
        self._stash.clear()

    def _foreign(self) -> bool:
        """Whether the running forward belongs to another thread than this session's."""
        return threading.get_ident() != self._thread

    def _ctx(self, site: Site) -> HookContext:
        return HookContext(site, self.owner)

    def _install(self) -> None:
        by_layer: dict[int | None, list[Site]] = defaultdict(list)
        for site in sorted(self.hooks, key=lambda s: s.order):
            by_layer[site.layer].append(site)
        for layer, sites in by_layer.items():
            if layer is None:
                self._install_global(sites)
            else:
                self._install_layer(layer, sites)

    def _install_global(self, sites: list[Site]) -> None:
        m = self.layout
        module_of = {
            "hook_embed": m.adapter.embed,
            "hook_pos_embed": m.adapter.pos_embed,
            "ln_final.hook_normalized": m.adapter.final_norm,
        }
        for site in sites:
            if site.kind == "logits":
                self._output_hook(m.hf_model, [site], getter=_get_logits, setter=_set_logits)
            else:
                path = module_of[site.kind]
                assert path is not None
                self._output_hook(m.module(path), [site])

    def _install_layer(self, layer: int, sites: list[Site]) -> None:
        m, a = self.layout, self.layout.adapter
        kinds = {s.kind: s for s in sites}
        mod = lambda path: m.layer_module(layer, path)  # noqa: E731

        needs_stash = "hook_resid_mid" in kinds
        if "hook_resid_pre" in kinds or needs_stash:
            self._layer_pre_hook(layer, kinds.get("hook_resid_pre"), stash=needs_stash)
        if "ln1.hook_normalized" in kinds:
            assert a.ln1 is not None
            self._output_hook(mod(a.ln1), [kinds["ln1.hook_normalized"]])
        attn_sites = [s for s in sites if s.is_attention_internal]
        if attn_sites:
            self._attention_hooks(mod(a.attn), attn_sites)
        if "attn.hook_result" in kinds:
            self._result_hook(mod(a.o_proj), kinds["attn.hook_result"])
        if "hook_attn_out" in kinds or needs_stash:
            self._attn_out_hook(layer, mod(a.attn_out_module), kinds.get("hook_attn_out"), kinds.get("hook_resid_mid"))
        if "ln2.hook_normalized" in kinds:
            assert a.ln2 is not None
            self._output_hook(mod(a.ln2), [kinds["ln2.hook_normalized"]])
        self._mlp_input_hooks(layer, kinds)
        if "mlp.hook_post" in kinds:
            self._input_hook(mod(a.mlp_down), kinds["mlp.hook_post"])
        if "hook_mlp_out" in kinds:
            self._output_hook(mod(a.mlp_out_module), [kinds["hook_mlp_out"]])
        if "hook_resid_post" in kinds:
            self._output_hook(m.layer(layer), [kinds["hook_resid_post"]])

    # Hook builders ----------------------------------------------------------------------------------
    def _fns(self, site: Site) -> list[HookFn]:
        return self.hooks[site]

    def _output_hook(
        self,
        module: nn.Module,
        sites: list[Site],
        getter: Callable[[Any], Tensor] = _first_tensor,
        setter: Callable[[Any, Tensor], Any] = _replace_first,
        derived: bool = False,
    ) -> None:
        """`derived`: the getter builds a new tensor (a slice), so under autograd it must be written
        back for gradients taken at the site to reach it."""
        plans = [(self._ctx(s), self._fns(s)) for s in sites]

        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            if self._foreign():
                return None
            for ctx, fns in plans:
                before = getter(output)
                after = _chain(fns, before, ctx)
                if after is not before or (derived and after.requires_grad):
                    output = setter(output, after)
            return output

        self._handles.append(module.register_forward_hook(hook))

    def _input_hook(self, module: nn.Module, site: Site) -> None:
        ctx, fns = self._ctx(site), self._fns(site)

        def hook(_module: nn.Module, args: tuple[Any, ...]) -> Any:
            if self._foreign():
                return None
            before = args[0]
            after = _chain(fns, before, ctx)
            return None if after is before else (after, *args[1:])

        self._handles.append(module.register_forward_pre_hook(hook))

    def _layer_pre_hook(self, layer: int, site: Site | None, *, stash: bool) -> None:
        plan = (self._ctx(site), self._fns(site)) if site is not None else None

        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if self._foreign():
                return None
            before = args[0] if args else kwargs["hidden_states"]
            after = _chain(plan[1], before, plan[0]) if plan is not None else before
            if stash:
                self._stash[layer] = after
            if after is before:
                return None
            if args:
                return (after, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": after}

        self._handles.append(self.layout.layer(layer).register_forward_pre_hook(hook, with_kwargs=True))

    def _attn_out_hook(self, layer: int, module: nn.Module, out_site: Site | None, mid_site: Site | None) -> None:
        out_plan = (self._ctx(out_site), self._fns(out_site)) if out_site is not None else None
        mid_plan = (self._ctx(mid_site), self._fns(mid_site)) if mid_site is not None else None

        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            if self._foreign():
                return None
            attn_out = _first_tensor(output)
            new_out = _chain(out_plan[1], attn_out, out_plan[0]) if out_plan is not None else attn_out
            if mid_plan is not None:
                resid_pre = self._stash.pop(layer)
                mid = resid_pre + new_out  # the exact sum HF computes next
                new_mid = _chain(mid_plan[1], mid, mid_plan[0])
                # Under autograd, route the residual through `mid` so gradients at the site exist.
                if new_mid is not mid or new_mid.requires_grad:
                    # HF adds resid_pre to what attention returns; return the difference.
                    new_out = new_mid - resid_pre
            return output if new_out is attn_out else _replace_first(output, new_out)

        self._handles.append(module.register_forward_hook(hook))

    def _result_hook(self, o_proj: nn.Module, site: Site) -> None:
        ctx, fns = self._ctx(site), self._fns(site)
        layer = site.layer
        assert layer is not None

        def hook(_module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Any:
            if self._foreign():
                return None
            z_flat = args[0]
            result = self.layout.head_results(z_flat, layer)
            new = _chain(fns, result, ctx)
            if new is result and not new.requires_grad:  # under autograd, `result` must feed the graph
                return None
            return new.sum(dim=-2) + self.layout.weights.b_O_layer(layer)

        self._handles.append(o_proj.register_forward_hook(hook))

    def _mlp_input_hooks(self, layer: int, kinds: dict[str, Site]) -> None:
        m, a = self.layout, self.layout.adapter
        pre, lin = kinds.get("mlp.hook_pre"), kinds.get("mlp.hook_pre_linear")
        if pre is None and lin is None:
            return
        d_mlp = m.dims.d_mlp
        slices = a.mlp_kind.fused_slices(d_mlp)
        if slices is not None:  # one projection computes both; each site is a slice of its output
            for site in (s for s in (pre, lin) if s is not None):
                part = slices[site.kind]

                def getter(out: Any, part: slice = part) -> Tensor:
                    return out[..., part]

                def setter(out: Tensor, new: Tensor, part: slice = part) -> Tensor:
                    return torch.cat([out[..., : part.start], new, out[..., part.stop :]], dim=-1)

                self._output_hook(m.layer_module(layer, a.mlp_in), [site], getter=getter, setter=setter, derived=True)
            return
        if pre is not None:
            self._output_hook(m.layer_module(layer, a.mlp_in), [pre])
        if lin is not None:
            assert a.mlp_up is not None
            self._output_hook(m.layer_module(layer, a.mlp_up), [lin])

    def _attention_hooks(self, module: nn.Module, sites: list[Site]) -> None:
        plans = {s.kind: (self._ctx(s), self._fns(s)) for s in sites}
        entry = {"plans": plans, "thread": self._thread}
        chain: list[dict[str, Any]] = module.__dict__.setdefault("_mechscope_attention_chain", [])
        chain.append(entry)
        self._attention_modules.append((module, entry))
        _refresh_attention_handlers(module)


def _refresh_attention_handlers(module: nn.Module) -> None:
    """Rebuild the single handler the attention function calls from every active session's plans."""
    chain: list[dict[str, Any]] = module.__dict__.get("_mechscope_attention_chain", [])
    if not chain:
        module.__dict__.pop(HANDLERS_ATTR, None)
        return
    kinds = frozenset(k for entry in chain for k in entry["plans"])
    entries = list(chain)

    def handle(kind: str, activation: Tensor) -> Tensor:
        thread = threading.get_ident()
        for entry in entries:
            if entry["thread"] != thread:
                continue  # another thread's session: a forward sees only its own thread's hooks
            plan = entry["plans"].get(kind)
            if plan is not None:
                activation = _chain(plan[1], activation, plan[0])
        return activation

    threads = frozenset(entry["thread"] for entry in chain)
    module.__dict__[HANDLERS_ATTR] = {"handle": handle, "kinds": kinds, "threads": threads}


def _get_logits(output: Any) -> Tensor:
    return output.logits if hasattr(output, "logits") else _first_tensor(output)


def _set_logits(output: Any, new: Tensor) -> Any:
    if hasattr(output, "logits"):
        output.logits = new
        return output
    return _replace_first(output, new)


def sort_sites(sites: list[Site]) -> list[Site]:
    """Sites in forward-pass order."""
    return sorted(sites, key=lambda s: s.order)


__all__ = ["BLOCK_KINDS", "HookContext", "HookFn", "HookSession", "apply_hook", "sort_sites"]
