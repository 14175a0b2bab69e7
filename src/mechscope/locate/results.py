"""Method results: tensors with named, labelled axes that save to safetensors and plot.

A result holds named tensors, the axis names of each (``("layer", "pos")``) and, per axis name, the
labels of its entries (layer indices, position strings, head names). Files are one safetensors file
whose header metadata carries the JSON description (format, schema version, method, config, axes,
labels) -- no pickle, and everything is validated on load.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from torch import Tensor

from mechscope.errors import ConfigError, ShapeError
from mechscope.io import read_safetensors, write_safetensors

FORMAT = "mechscope.result"
SCHEMA_VERSION = 1

R = TypeVar("R", bound="Result")

#: method name -> result class, filled by subclasses so that ``Result.load`` returns the right type.
_REGISTRY: dict[str, type[Result]] = {}


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
        _REGISTRY[cls.method] = cls

    def __post_init__(self) -> None:
        self.axes = {name: tuple(axes) for name, axes in self.axes.items()}
        self.labels = {axis: [str(x) for x in values] for axis, values in self.labels.items()}
        self.validate()

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
    def metadata(self) -> dict[str, str]:
        """The safetensors header metadata (string -> string) describing this result."""
        description = {"axes": {k: list(v) for k, v in self.axes.items()}, "labels": self.labels}
        return {
            "format": FORMAT,
            "schema_version": str(SCHEMA_VERSION),
            "method": self.method,
            "config": json.dumps(self.config, sort_keys=True),
            "description": json.dumps(description, sort_keys=True),
        }

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (tensors + JSON metadata). Returns the path."""
        path = Path(path)
        try:
            json.dumps(self.config)
        except TypeError as exc:
            raise ConfigError(f"{type(self).__name__}.config must be JSON-serialisable: {exc}") from exc
        return write_safetensors(path, self.tensors, self.metadata())

    @classmethod
    def load(cls: type[R], path: str | Path) -> R:
        """Read a file written by :meth:`save`; the class is chosen by the file's method name."""
        tensors, meta = read_safetensors(path, "result")
        return cls._from_parts(tensors, meta, str(path))

    @classmethod
    def _from_parts(cls: type[R], tensors: dict[str, Tensor], meta: Mapping[str, str], where: str) -> R:
        if meta.get("format") != FORMAT:
            raise ConfigError(f"{where}: expected format {FORMAT!r}; got {meta.get('format')!r}")
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise ConfigError(f"{where}: expected schema_version {SCHEMA_VERSION}; got {meta.get('schema_version')!r}")
        method = meta.get("method", "")
        target = _REGISTRY.get(method)
        if target is None:
            raise ConfigError(f"{where}: unknown method {method!r}; known: {sorted(_REGISTRY)}")
        if not issubclass(target, cls):
            raise ConfigError(f"{where}: holds a {method!r} result ({target.__name__}); expected {cls.__name__}")
        try:
            config = json.loads(meta.get("config", "{}"))
            description = json.loads(meta["description"])
            axes = {k: tuple(v) for k, v in description["axes"].items()}
            labels = {k: list(v) for k, v in description["labels"].items()}
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{where}: malformed result metadata ({type(exc).__name__}: {exc})") from exc
        return target(tensors=tensors, axes=axes, labels=labels, config=config)  # type: ignore[return-value]

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


_REGISTRY[Result.method] = Result

__all__ = ["FORMAT", "SCHEMA_VERSION", "Result"]
