"""Edit records: exactly which weights an edit changed, so it can be reverted bit for bit and saved.

A record keeps, per changed parameter, the tensor before the edit and after it. ``revert`` copies the
"before" tensors back (an exact copy, not a subtraction, so no rounding can creep in), ``apply``
re-applies the "after" tensors (e.g. a saved edit on a freshly loaded model). Both check that the model
currently holds the state they start from, so edits cannot be undone out of order by accident.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechscope.errors import ConfigError
from mechscope.io import Envelope, FileSchema, ModelInfo, read_envelope, register_schema, write_envelope
from mechscope.steer.editing.requests import EditError, EditRequest


def _record_v1_to_v2(header: dict[str, str]) -> dict[str, str]:
    """Schema 1 kept method, fingerprint, requests and info as separate header keys."""
    body = {"requests": json.loads(header.get("requests", "[]")), "info": json.loads(header.get("info", "{}"))}
    model = {"fingerprint": header.get("fingerprint", "")}
    return {**header, "kind": header.get("method", ""), "body": json.dumps(body), "model": json.dumps(model)}


EDIT_RECORD_SCHEMA = register_schema(FileSchema("edit_record", 2, "edit record", {1: _record_v1_to_v2}))
FORMAT = EDIT_RECORD_SCHEMA.format
SCHEMA_VERSION = EDIT_RECORD_SCHEMA.version


def mlp_out_name(model: Any, layer: int) -> str:
    """Parameter name (in ``model.hf_model``) of layer `layer`'s MLP output-projection weight."""
    if not 0 <= layer < model.dims.n_layers:
        raise EditError(f"layer {layer} does not exist; this model has layers 0..{model.dims.n_layers - 1}")
    return f"{model.adapter.layers}.{layer}.{model.adapter.mlp_down}.weight"


def mlp_out_weight(model: Any, layer: int) -> Float[Tensor, "d_model d_mlp"]:
    """The MLP output projection of `layer` as a ``[d_model, d_mlp]`` matrix (values = W @ keys).

    GPT-2's Conv1D stores ``[in, out]``; nn.Linear stores ``[out, in]``. This returns a view in the
    ``[out, in]`` convention for both.
    """
    weight = model.hf_model.get_parameter(mlp_out_name(model, layer))
    return model.adapter.orientation.out_in(weight)


def add_to_mlp_out(model: Any, layer: int, delta: Float[Tensor, "d_model d_mlp"]) -> None:
    """``W += delta`` in place on layer `layer`'s MLP output projection (``delta`` in ``[out, in]``)."""
    weight = model.hf_model.get_parameter(mlp_out_name(model, layer))
    with torch.no_grad():
        update = model.adapter.orientation.stored_from_out_in(delta)
        if update.shape != weight.shape:
            raise EditError(f"update of shape {tuple(update.shape)} does not fit weight {tuple(weight.shape)}")
        weight.add_(update.to(weight.dtype))


def _params(model: Any) -> dict[str, nn.Parameter]:
    hf = model.hf_model if hasattr(model, "hf_model") else model
    return dict(hf.named_parameters())


@dataclass
class EditRecord:
    """What an edit changed: parameter name -> (before, after), plus how it was made.

    Attributes:
        before: the changed parameters' values before the edit (exact copies, on CPU).
        after: their values after the edit.
        method: ``"rome"``, ``"memit"``, ``"finetune"``...
        requests: the requests the edit realises.
        fingerprint: the model fingerprint before the edit.
        info: JSON-serialisable details (layers, config, optimisation losses).
    """

    before: dict[str, Tensor]
    after: dict[str, Tensor]
    method: str
    requests: list[EditRequest] = field(default_factory=list)
    fingerprint: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.before) != set(self.after):
            raise EditError(f"an edit record needs the same parameters before and after; got {sorted(self.before)}")
        for name in self.before:
            if self.before[name].shape != self.after[name].shape:
                raise EditError(
                    f"record of {name!r}: before {tuple(self.before[name].shape)} vs after "
                    f"{tuple(self.after[name].shape)}"
                )

    @classmethod
    def capture(cls, model: Any, names: Sequence[str], method: str, **kwargs: Any) -> EditRecord:
        """A record whose ``before`` and ``after`` are both the current values of `names` (call
        :meth:`finish` after changing them)."""
        params = _params(model)
        unknown = [n for n in names if n not in params]
        if unknown:
            raise EditError(f"the model has no parameters {unknown}")
        offloaded = [n for n in names if params[n].device.type == "meta"]
        if offloaded:  # accelerate keeps these on disk/CPU store: an edit could not be written there
            raise EditError(
                f"cannot edit {offloaded[:3]}: accelerate offloaded them (device_map with CPU/disk offload); "
                "load the model so the edited layers sit on a device"
            )
        snap = {n: params[n].detach().to("cpu", copy=True) for n in names}
        return cls(before=snap, after={n: t.clone() for n, t in snap.items()}, method=method, **kwargs)

    def finish(self, model: Any) -> EditRecord:
        """Record the current values of the tracked parameters as the ``after`` state."""
        params = _params(model)
        self.after = {n: params[n].detach().to("cpu", copy=True) for n in self.before}
        return self

    @property
    def names(self) -> list[str]:
        return sorted(self.before)

    def changed(self) -> list[str]:
        """Parameters whose value actually differs after the edit."""
        return [n for n in self.names if not torch.equal(self.before[n], self.after[n])]

    def _check_state(self, model: Any, state: dict[str, Tensor], what: str) -> dict[str, nn.Parameter]:
        params = _params(model)
        missing = [n for n in self.before if n not in params]
        if missing:
            raise EditError(f"cannot {what}: the model has no parameters {missing} (a record made on another model?)")
        for n, t in state.items():
            p = params[n]
            if p.shape != t.shape:
                raise EditError(
                    f"cannot {what}: {n!r} is {tuple(p.shape)} in the model, {tuple(t.shape)} in the record"
                )
            if not torch.equal(p.detach().cpu(), t):
                return {}
        return params

    def revert(self, model: Any, *, check: bool = True) -> None:
        """Restore every recorded parameter exactly to its value before the edit.

        With ``check`` (default) the model must hold the edit's ``after`` state (so a later edit of the
        same weights must be reverted first); an :class:`EditError` says so otherwise.
        """
        params = self._check_state(model, self.after, "revert")
        if not params and check:
            raise EditError(
                "cannot revert: the model's weights are not those this edit left (another edit or training "
                "changed them since); revert later edits first, or pass check=False to force"
            )
        params = params or _params(model)
        with torch.no_grad():
            for n, t in self.before.items():
                params[n].copy_(t.to(params[n].device))

    def apply(self, model: Any, *, check: bool = True) -> None:
        """Write the edit's ``after`` values (e.g. a saved record onto a freshly loaded model)."""
        params = self._check_state(model, self.before, "apply")
        if not params and check:
            raise EditError(
                "cannot apply: the model's weights are not those the edit was made on (pass check=False to force)"
            )
        params = params or _params(model)
        with torch.no_grad():
            for n, t in self.after.items():
                params[n].copy_(t.to(params[n].device))

    @contextmanager
    def applied(self, model: Any) -> Iterator[Any]:
        """The edit as an intervention: applied inside the block (if not already), the model restored after.

        ``evaluate(model, record.applied(model), task)`` measures an edit like any other intervention.
        A model already holding the edit keeps it on exit; one without it is reverted bit for bit.
        """
        already = bool(self._check_state(model, self.after, "apply"))
        if not already:
            self.apply(model)
        try:
            yield model
        finally:
            if not already:
                self.revert(model, check=False)

    # Files ----------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """One safetensors file: ``before/<name>`` and ``after/<name>`` tensors + JSON header metadata."""
        tensors = {f"before/{n}": t for n, t in self.before.items()}
        tensors |= {f"after/{n}": t for n, t in self.after.items()}
        body = {
            "requests": [r.to_dict() for r in self.requests],
            "info": json.loads(json.dumps(self.info, default=str)),
        }
        envelope = Envelope(self.method, body, tensors, ModelInfo(fingerprint=self.fingerprint))
        return write_envelope(path, envelope, EDIT_RECORD_SCHEMA)

    @classmethod
    def load(cls, path: str | Path) -> EditRecord:
        try:
            envelope = read_envelope(path, EDIT_RECORD_SCHEMA)
        except ConfigError as exc:
            raise EditError(str(exc)) from exc
        tensors, body = envelope.tensors, envelope.body
        before = {k.removeprefix("before/"): v for k, v in tensors.items() if k.startswith("before/")}
        after = {k.removeprefix("after/"): v for k, v in tensors.items() if k.startswith("after/")}
        try:
            requests = [EditRequest.from_dict(r) for r in body.get("requests", [])]
        except (KeyError, TypeError, ValueError) as exc:
            raise EditError(f"{str(path)!r}: malformed edit requests ({exc})") from exc
        return cls(
            before=before,
            after=after,
            method=envelope.kind,
            requests=requests,
            fingerprint=envelope.model.fingerprint if envelope.model is not None else "",
            info=dict(body.get("info", {})),
        )


def snapshot(model: Any) -> dict[str, Tensor]:
    """A copy of every parameter, for bit-for-bit comparisons (tests, fine-tuning checks)."""
    return {n: p.detach().clone() for n, p in _params(model).items()}


def equal_to_snapshot(model: Any, snap: dict[str, Tensor]) -> list[str]:
    """Names of parameters whose current value differs from `snap` (empty: bit-for-bit equal)."""
    params = _params(model)
    return [n for n, t in snap.items() if not torch.equal(params[n].detach(), t)]


__all__ = [
    "EditRecord",
    "add_to_mlp_out",
    "equal_to_snapshot",
    "mlp_out_name",
    "mlp_out_weight",
    "snapshot",
]
