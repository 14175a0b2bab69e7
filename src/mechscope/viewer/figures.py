"""What the viewer shows for one stored file: a result's plotly figure and tables, an artifact's header.

Files are read only through safetensors (a JSON header and raw tensor bytes: nothing in a store is ever
executed or unpickled) and only at paths resolved inside the store. Content-addressed files never change,
so what is derived from one is cached by its SHA-256.
"""

from __future__ import annotations

import json
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

from mechscope.records import ArtifactRecord, PathRefused, RunStore

#: Modules whose Result subclasses the viewer can draw (imported once, lazily; all below the viewer).
RESULT_MODULES = (
    "mechscope.locate",
    "mechscope.locate.circuits",
    "mechscope.steer",
    "mechscope.steer.editing",
    "mechscope.improve",
    "mechscope.improve.refusal",
)
_MAX_HEADER = 64 * 1024 * 1024
Tables = tuple[tuple[str, list[str], list[list[str]]], ...]  # (title, header, rows) per table


@dataclass(frozen=True)
class ShownFile:
    """One artifact as the page shows it. `missing` names the absent file instead of failing the page."""

    name: str
    role: str
    relative_path: str
    missing: str = ""
    figure: str = ""  # plotly JSON
    tables: tuple[tuple[str, list[str], list[list[str]]], ...] = ()  # (title, header, rows)
    header: dict[str, Any] = field(default_factory=dict)
    tensors: tuple[tuple[str, str, str], ...] = ()  # (name, dtype, shape)
    text: str = ""
    problem: str = ""
    tensor: str = ""  # the tensor the figure draws ("" for the result's default)
    plottable: tuple[str, ...] = ()  # the result's tensors that can be drawn instead


_imported = threading.Lock()
_done = False


def import_result_classes() -> None:
    """Import the modules that register Result subclasses (once; thread-safe)."""
    global _done
    with _imported:
        if _done:
            return
        for module in RESULT_MODULES:
            try:
                import_module(module)
            except ImportError:  # a part not present in this install: its results show as headers only
                continue
        _done = True


def safetensors_header(path: Path) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """(metadata, [(tensor, dtype, shape)]) read from a safetensors header alone (no tensor is loaded)."""
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ValueError("file is shorter than a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if length > _MAX_HEADER:
            raise ValueError(f"safetensors header of {length} bytes is implausibly large")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not a JSON object")
    meta = header.pop("__metadata__", {}) or {}
    tensors = [(k, str(v.get("dtype", "?")), str(tuple(v.get("shape", [])))) for k, v in header.items()]
    return {str(k): str(v) for k, v in meta.items()}, tensors


class FileViews:
    """Builds :class:`ShownFile` values for a store, caching by content hash (bounded)."""

    def __init__(self, store: RunStore, *, capacity: int = 256) -> None:
        self.store = store
        self.capacity = capacity
        self._cache: OrderedDict[tuple[str, str, str, str], ShownFile] = OrderedDict()
        self._lock = threading.Lock()

    def show(self, art: ArtifactRecord, tensor: str = "") -> ShownFile:
        """The file as shown; for a result, `tensor` picks the tensor its figure draws (default: its own)."""
        key = (art.sha256, art.ext, art.name, tensor)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        shown = self._build(art, tensor)
        if not shown.missing:
            with self._lock:
                self._cache[key] = shown
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
        return shown

    def _build(self, art: ArtifactRecord, tensor: str) -> ShownFile:
        try:
            path = self.store.artifact_path(art)
            relative = self.store.artifacts.relative(art.sha256, art.ext)
        except PathRefused as exc:
            return ShownFile(art.name, art.role, art.sha256, missing=f"refused: {exc}")
        if not path.is_file():
            return ShownFile(
                art.name,
                art.role,
                relative,
                missing=f"missing file {relative}: the run references it but it is not in {self.store.root}",
            )
        if art.ext == "safetensors":
            return self._safetensors(art, path, relative, tensor)
        if art.ext == "json" and (figure := _plotly_json(path)):
            return ShownFile(art.name, art.role, relative, figure=figure)
        if art.ext in ("json", "txt", "csv"):
            return ShownFile(art.name, art.role, relative, text=_text(path, art.ext))
        return ShownFile(art.name, art.role, relative)

    def _safetensors(self, art: ArtifactRecord, path: Path, relative: str, tensor: str) -> ShownFile:
        try:
            meta, tensors = safetensors_header(path)
        except (OSError, ValueError) as exc:
            return ShownFile(art.name, art.role, relative, problem=f"unreadable safetensors file: {exc}")
        header = {k: _maybe_json(v) for k, v in meta.items()}
        if art.role != "result":
            return ShownFile(art.name, art.role, relative, header=header, tensors=tuple(tensors))
        figure, tables, problem, shown, plottable = self._result_views(path, tensor)
        return ShownFile(
            art.name,
            art.role,
            relative,
            figure=figure,
            tables=tables,
            header=header,
            tensors=tuple(tensors),
            problem=problem,
            tensor=shown,
            plottable=plottable,
        )

    def _result_views(self, path: Path, tensor: str) -> tuple[str, Tables, str, str, tuple[str, ...]]:
        """(figure JSON, tables, problem, tensor drawn, tensors that can be drawn) of a result file."""
        import_result_classes()
        from mechscope.results import Result

        try:
            result = Result.load(path)
        except Exception as exc:  # shown on the page: one bad file must not break the run page
            return "", (), f"cannot load this result: {type(exc).__name__}: {exc}", "", ()
        plottable = tuple(n for n, axes in result.axes.items() if len([a for a in axes if a != "batch"]) in (1, 2))
        tables = []
        for method in ("table", "samples_table"):
            fn = getattr(result, method, None)
            if callable(fn):
                try:
                    header, rows = markdown_table(str(fn()))
                    tables.append((method.replace("_", " "), header, rows))
                except Exception:
                    continue
        if tensor and tensor not in result.tensors:
            problem = f"this result has no tensor {tensor!r}; it has {sorted(result.tensors)}"
            return "", tuple(tables), problem, "", plottable
        try:
            figure = (result.plot(tensor) if tensor else result.plot()).to_json()
        except Exception as exc:
            return "", tuple(tables), f"no figure: {type(exc).__name__}: {exc}", tensor, plottable
        return figure, tuple(tables), "", tensor or result.default_tensor(), plottable


def markdown_table(text: str) -> tuple[list[str], list[list[str]]]:
    """A Markdown pipe table as (header, rows); ValueError when `text` is not one."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip().startswith("|")]
    if len(lines) < 2:
        raise ValueError("not a Markdown table")

    def cells(line: str) -> list[str]:
        parts = line.strip().strip("|").replace("\\|", "\x00").split("|")
        return [p.strip().replace("\x00", "|").strip("`") for p in parts]

    return cells(lines[0]), [cells(line) for line in lines[2:]]


def _text(path: Path, ext: str, limit: int = 200_000) -> str:
    raw = path.read_bytes()[:limit].decode("utf-8", errors="replace")
    if ext == "json":
        try:
            return json.dumps(json.loads(raw), indent=2, ensure_ascii=False)
        except json.JSONDecodeError:
            return raw
    return raw


def _plotly_json(path: Path, limit: int = 20_000_000) -> str:
    """The text of a JSON file holding a plotly figure (``{"data": [...], "layout": {...}}``), else ""."""
    if path.stat().st_size > limit:
        return ""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return ""
    if isinstance(doc, dict) and isinstance(doc.get("data"), list) and isinstance(doc.get("layout", {}), dict):
        return json.dumps(doc)
    return ""


def _maybe_json(value: str) -> Any:
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return value


__all__ = ["FileViews", "ShownFile", "import_result_classes", "markdown_table", "safetensors_header"]
