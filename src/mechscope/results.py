"""The two things every layer hands around: :class:`Result` (what a method found) and
:class:`Artifact` (something made on one model and tied to it by fingerprint).

A result holds named tensors, the axis names of each (``("layer", "pos")``) and, per axis name, the
labels of its entries (layer indices, position strings, head names). An artifact (a steering vector, a
direction, an ablation record, a detector) carries the :class:`~mechscope.io.ModelInfo` of the model it
was made on; loading it for another model raises :class:`ModelMismatchError`. Both save to the shared
file envelope (:mod:`mechscope.io`): one safetensors file, JSON header, never pickle, validated on load.

Both keep a registry (result method / artifact kind -> class) so that files load as the right type; a
second class claiming a taken name is refused, since it would silently change what old files load as.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from mechscope import observe
from mechscope.errors import ConfigError, ShapeError
from mechscope.io import Envelope, FileSchema, ModelInfo, read_envelope, register_schema, write_envelope

R = TypeVar("R", bound="Result")
A = TypeVar("A", bound="Artifact")


def _result_v1_to_v2(header: dict[str, str]) -> dict[str, str]:
    """Schema 1 kept method, config and description (axes, labels) as separate header keys."""
    description = json.loads(header.get("description", "{}"))
    body = {"config": json.loads(header.get("config", "{}")), **description}
    return {**header, "kind": header.get("method", ""), "body": json.dumps(body), "model": "null"}


def _artifact_v1_to_v2(header: dict[str, str]) -> dict[str, str]:
    """Schema 1 kept the config as its own header key."""
    return {**header, "body": json.dumps({"config": json.loads(header["config"])})}


RESULT_SCHEMA = register_schema(FileSchema("result", 2, "result", {1: _result_v1_to_v2}))
ARTIFACT_SCHEMA = register_schema(FileSchema("artifact", 2, "artifact", {1: _artifact_v1_to_v2}))
FORMAT = RESULT_SCHEMA.format
SCHEMA_VERSION = RESULT_SCHEMA.version
ARTIFACT_FORMAT = ARTIFACT_SCHEMA.format
ARTIFACT_SCHEMA_VERSION = ARTIFACT_SCHEMA.version

#: method name -> result class, filled by subclasses so that ``Result.load`` returns the right type.
_REGISTRY: dict[str, type[Result]] = {}
#: artifact kind -> class, filled by subclasses so that files load as the right type.
_ARTIFACTS: dict[str, type[Artifact]] = {}


def _register(registry: dict[str, Any], name: str, cls: type, what: str) -> None:
    """Add `cls` under `name`, refusing a second class for a taken name (a re-import of the same
    class, as reloading a module does, is allowed)."""
    existing = registry.get(name)
    same_class = existing is not None and (existing.__module__, existing.__qualname__) == (
        cls.__module__,
        cls.__qualname__,
    )
    if existing is not None and not same_class:
        raise ConfigError(
            f"{what} {name!r} is already registered by {existing.__module__}.{existing.__qualname__}; "
            f"{cls.__module__}.{cls.__qualname__} must choose another name"
        )
    registry[name] = cls


class ModelMismatchError(ConfigError):
    """An artifact (steering vector, direction, ablation) applied to a model other than its own."""


@dataclass
class Result:
    """Named tensors with named axes and per-axis labels; base of every method's result.

    Attributes:
        tensors: name -> tensor.
        axes: tensor name -> axis names, one per tensor dimension.
        labels: axis name -> labels of its entries (optional per axis; its length must match).
        config: the method's JSON-serialisable configuration, recorded for reproducibility.
    """

    method: ClassVar[str] = "result"

    tensors: dict[str, Tensor]
    axes: dict[str, tuple[str, ...]]
    labels: dict[str, list[str]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _register(_REGISTRY, cls.method, cls, "result method")

    def __post_init__(self) -> None:
        self.axes = {name: tuple(axes) for name, axes in self.axes.items()}
        self.labels = {axis: [str(x) for x in values] for axis, values in self.labels.items()}
        self.validate()
        observe.notify(self)  # run records (mechscope.records) collect results made inside a run

    # Validation -----------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check that every tensor has axis names, one per dimension, and labels that fit."""
        if set(self.tensors) != set(self.axes):
            raise ConfigError(
                f"{type(self).__name__}: tensors {sorted(self.tensors)} and axes {sorted(self.axes)} "
                "must name the same tensors"
            )
        for name, tensor in self.tensors.items():
            if not isinstance(tensor, Tensor):
                raise ConfigError(f"{type(self).__name__}: tensor {name!r} must be a torch.Tensor; got {type(tensor)}")
            axes = self.axes[name]
            if tensor.ndim != len(axes):
                raise ShapeError(
                    f"{type(self).__name__}: tensor {name!r} has {tensor.ndim} dimensions "
                    f"{tuple(tensor.shape)}; its axes {axes} name {len(axes)}"
                )
            for axis, size in zip(axes, tensor.shape):
                if axis in self.labels and len(self.labels[axis]) != size:
                    raise ShapeError(
                        f"{type(self).__name__}: axis {axis!r} of tensor {name!r} has {size} entries; "
                        f"got {len(self.labels[axis])} labels"
                    )

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.tensors:
            raise KeyError(f"{type(self).__name__} has no tensor {name!r}; it has {sorted(self.tensors)}")
        return self.tensors[name]

    # Files ----------------------------------------------------------------------------------------
    def envelope(self) -> Envelope:
        """This result as the shared file envelope (kind = method; body = config, axes, labels)."""
        body = {"config": self.config, "axes": {k: list(v) for k, v in self.axes.items()}, "labels": self.labels}
        return Envelope(kind=self.method, body=body, tensors=self.tensors)

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (tensors + JSON header). Returns the path."""
        try:
            json.dumps(self.config)
        except TypeError as exc:
            raise ConfigError(f"{type(self).__name__}.config must be JSON-serialisable: {exc}") from exc
        return write_envelope(path, self.envelope(), RESULT_SCHEMA)

    @classmethod
    def load(cls: type[R], path: str | Path) -> R:
        """Read a file written by :meth:`save`; the class is chosen by the file's method name."""
        return cls.from_envelope(read_envelope(path, RESULT_SCHEMA), str(path))

    @classmethod
    def from_envelope(cls: type[R], envelope: Envelope, where: str = "result") -> R:
        """Rebuild the result an envelope holds, as the registered class of its method."""
        method = envelope.kind
        target = _REGISTRY.get(method)
        if target is None:
            raise ConfigError(f"{where}: unknown method {method!r}; known: {sorted(_REGISTRY)}")
        if not issubclass(target, cls):
            raise ConfigError(f"{where}: holds a {method!r} result ({target.__name__}); expected {cls.__name__}")
        body = envelope.body
        try:
            config = dict(body.get("config", {}))
            axes = {k: tuple(v) for k, v in body["axes"].items()}
            labels = {k: list(v) for k, v in body["labels"].items()}
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ConfigError(f"{where}: malformed result metadata ({type(exc).__name__}: {exc})") from exc
        return target(tensors=envelope.tensors, axes=axes, labels=labels, config=config)  # type: ignore[return-value]

    # Plotting -------------------------------------------------------------------------------------
    def default_tensor(self) -> str:
        """The tensor :meth:`plot` draws when none is named (the first)."""
        return next(iter(self.tensors))

    def plot(self, name: str | None = None, *, reduce: Sequence[str] = ("batch",), title: str | None = None) -> Any:
        """A plotly figure of one tensor: a heatmap for 2-D, a bar chart for 1-D.

        Axes named in `reduce` are averaged first (by default the batch axis).
        """
        import plotly.graph_objects as go

        name = name or self.default_tensor()
        values, axes = self[name].detach().float().cpu(), list(self.axes[name])
        for axis in [a for a in axes if a in reduce]:
            values = values.mean(axes.index(axis))
            axes.remove(axis)
        title = title or f"{self.method}: {name}"
        ticks = [self.labels.get(axis, [str(i) for i in range(values.shape[i])]) for i, axis in enumerate(axes)]
        if values.ndim == 1:
            fig = go.Figure(go.Bar(x=ticks[0], y=values.tolist()))
            fig.update_layout(title=title, xaxis_title=axes[0], yaxis_title=name)
        elif values.ndim == 2:
            fig = go.Figure(go.Heatmap(z=values.tolist(), y=ticks[0], x=ticks[1], colorscale="RdBu", zmid=0))
            fig.update_layout(title=title, yaxis_title=axes[0], xaxis_title=axes[1])
            fig.update_yaxes(autorange="reversed")
        else:
            raise ShapeError(
                f"plot draws 1-D or 2-D tensors; {name!r} has axes {tuple(axes)} after averaging {tuple(reduce)}"
            )
        return fig


class Artifact:
    """Something saved to disk and tied to the model it was made on (by fingerprint).

    Subclasses set ``kind`` and implement :meth:`_parts` / :meth:`_from_parts`.
    """

    kind: ClassVar[str] = "artifact"

    def __init__(self, *, fingerprint: str, model_type: str, d_model: int) -> None:
        self.fingerprint = fingerprint
        self.model_type = model_type
        self.d_model = d_model
        observe.notify(self)  # run records collect artifacts made inside a run

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _register(_ARTIFACTS, cls.kind, cls, "artifact kind")

    @staticmethod
    def model_info(model: Any) -> dict[str, Any]:
        """The keyword arguments recording `model` in an artifact."""
        return {"fingerprint": model.fingerprint(), "model_type": model.dims.model_type, "d_model": model.dims.d_model}

    def check_model(self, model: Any) -> None:
        """:class:`ShapeError` for a model of another width, :class:`ModelMismatchError` for another model."""
        if model.dims.d_model != self.d_model:
            raise ShapeError(
                f"this {self.kind} has width d_model={self.d_model}; the model has d_model={model.dims.d_model}"
            )
        actual = model.fingerprint()
        if actual == self.fingerprint or self._made_on_a_narrower_cast(model):
            return
        raise ModelMismatchError(
            f"this {self.kind} was made on model {self.fingerprint} ({self.model_type}); the given model is "
            f"{actual} ({model.dims.model_type}). Rebuild it on this model (weights, config or dtype differ: an "
            "artifact made on a model's bf16 or fp16 weights applies to its fp32 original too, but one made in "
            "fp32 cannot be checked against rounded weights)."
        )

    def _made_on_a_narrower_cast(self, model: Any) -> bool:
        """Whether this artifact was made on `model`'s weights cast to bf16 or fp16 (and `model` is fp32): the
        same checkpoint, read here at full precision."""
        if str(getattr(model, "dtype", "")) != "torch.float32":
            return False
        return any(model.fingerprint(dtype=half) == self.fingerprint for half in (torch.bfloat16, torch.float16))

    def _parts(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        raise NotImplementedError

    @classmethod
    def _from_parts(cls: type[A], tensors: dict[str, Tensor], config: dict[str, Any], info: dict[str, Any]) -> A:
        raise NotImplementedError

    @property
    def model(self) -> ModelInfo:
        """The model this artifact was made on."""
        return ModelInfo(fingerprint=self.fingerprint, model_type=self.model_type, d_model=self.d_model)

    def envelope(self) -> Envelope:
        """This artifact as the shared file envelope (kind, body = config, model info)."""
        tensors, config = self._parts()
        return Envelope(kind=self.kind, body={"config": config}, tensors=tensors, model=self.model)

    def save(self, path: str | Path) -> Path:
        """One safetensors file: tensors + JSON header (kind, config, model fingerprint)."""
        envelope = self.envelope()
        try:
            json.dumps(envelope.body)
        except TypeError as exc:
            raise ConfigError(f"{self.kind} config must be JSON-serialisable: {exc}") from exc
        return write_envelope(path, envelope, ARTIFACT_SCHEMA)

    @classmethod
    def load(cls: type[A], path: str | Path, model: Any | None = None) -> A:
        """Read a file written by :meth:`save`; with `model`, also check it was made on that model."""
        envelope = read_envelope(path, ARTIFACT_SCHEMA)
        where = str(path)
        kind = envelope.kind
        target = _ARTIFACTS.get(kind)
        if target is None or not issubclass(target, cls):
            raise ConfigError(
                f"{where}: holds a {kind!r} artifact; expected a {cls.kind!r} (known: {sorted(_ARTIFACTS)})"
            )
        if envelope.model is None:
            raise ConfigError(f"{where}: a {kind} artifact must record the model it was made on; it records none")
        info = {
            "fingerprint": envelope.model.fingerprint,
            "model_type": envelope.model.model_type,
            "d_model": envelope.model.d_model,
        }
        try:
            artifact = target._from_parts(envelope.tensors, envelope.body["config"], info)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: malformed {kind} artifact ({type(exc).__name__}: {exc})") from exc
        if model is not None:
            artifact.check_model(model)
        return artifact  # type: ignore[return-value]


_REGISTRY[Result.method] = Result

__all__ = [
    "ARTIFACT_FORMAT",
    "ARTIFACT_SCHEMA",
    "FORMAT",
    "RESULT_SCHEMA",
    "SCHEMA_VERSION",
    "Artifact",
    "ModelInfo",
    "ModelMismatchError",
    "Result",
]
