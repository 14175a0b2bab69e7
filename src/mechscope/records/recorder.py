"""``with records.run(name) as run:`` -- record what the verbs inside return, with provenance.

Opt-in: nothing is recorded outside a ``run`` block. Inside one, every :class:`~mechscope.results.Result`
and :class:`~mechscope.results.Artifact` built (they announce themselves through
:mod:`mechscope.observe`) is saved with its own ``save`` format into the store's content-addressed folder
when the block ends; scalar tensors and evaluation metrics become metrics. ``run.log_metric``,
``run.log_result``, ``run.log_file``, ``run.log_config`` and ``run.log_model`` add the rest explicitly.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import random
import shutil
import struct
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mechscope import observe
from mechscope.errors import ConfigError
from mechscope.records.artifacts import EXTENSIONS, canonicalize_safetensors
from mechscope.records.provenance import ModelInfo, git_state, model_info, versions
from mechscope.records.store import ArtifactRecord, RunRecord, RunStore, new_run_id, now

_log = logging.getLogger(__name__)

#: The run that objects made now are recorded into (None outside ``records.run``).
current_run: contextvars.ContextVar[Run | None] = contextvars.ContextVar("mechscope_current_run", default=None)


def _observe(obj: object) -> None:
    active = current_run.get()
    if active is not None:
        active._observed(obj)


class Run:
    """An open run: collects results, metrics, config and models until its block ends."""

    def __init__(self, record: RunRecord, store: RunStore) -> None:
        self.id = record.id
        self.name = record.name
        self.store = store
        self.method = record.method
        self.config: dict[str, Any] = dict(record.config)
        self.seed = record.seed
        self.tags: list[str] = list(record.tags)
        self.metrics: dict[str, dict[int, float]] = {}
        self.models: list[ModelInfo] = []
        self.error = ""
        self.model_source: str | None = None
        self.capture = True
        self._objects: list[tuple[str | None, object]] = []
        self._files: list[tuple[str, Path]] = []
        self._models_seen: list[object] = []
        self._status: str | None = None

    # Logging ---------------------------------------------------------------------------------------
    def log_metric(self, name: str, value: float, *, step: int | None = None) -> None:
        """A scalar (optionally one step of a series); logging a name again at the same step replaces it."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a metric name must be a non-empty string; got {name!r}")
        try:
            number = float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"metric {name!r} must be a number; got {type(value).__name__} {value!r}") from exc
        if math.isnan(number):
            raise ConfigError(f"metric {name!r} is NaN; record numbers only")
        if step is not None and (not isinstance(step, int) or step < 0):
            raise ConfigError(f"metric step must be a non-negative int; got {step!r}")
        self.metrics.setdefault(name, {})[-1 if step is None else step] = number

    def log_metrics(self, values: Mapping[str, Any], *, prefix: str = "") -> None:
        """Every number in a (nested) mapping, named ``prefix/key/subkey``; non-numbers are skipped."""
        for key, value in values.items():
            name = f"{prefix}/{key}" if prefix else str(key)
            if isinstance(value, Mapping):
                self.log_metrics(value, prefix=name)
            elif isinstance(value, bool):
                self.log_metric(name, float(value))
            elif isinstance(value, (int, float)) and not math.isnan(float(value)):
                self.log_metric(name, value)

    def log_config(self, config: Mapping[str, Any] | None = None, **values: Any) -> None:
        """Merge keys into the run's config (must be JSON-serialisable)."""
        merged = {**(config or {}), **values}
        try:
            json.dumps(merged)
        except TypeError as exc:
            raise ConfigError(f"run config must be JSON-serialisable: {exc}") from exc
        self.config.update(merged)

    def log_result(self, obj: object, name: str | None = None) -> None:
        """Record an object that has ``save(path)`` (results, artifacts, SAEs, edit records)."""
        if not callable(getattr(obj, "save", None)):
            raise ConfigError(f"log_result takes an object with a save(path) method; got {type(obj).__name__}")
        if not any(o is obj for _, o in self._objects):
            self._objects.append((name, obj))

    def log_file(self, path: str | Path, name: str | None = None) -> None:
        """Copy a file (JSON, text, CSV, PNG, HTML or safetensors) into the store with the run.

        A JSON file holding a plotly figure (``fig.to_json()``) is drawn as a figure by the viewer.
        """
        path = Path(path)
        ext = path.name.partition(".")[2].rsplit(".", 1)[-1] if "." in path.name else ""
        if not path.is_file():
            raise ConfigError(f"log_file: no file at {str(path)!r}")
        if ext not in EXTENSIONS:
            raise ConfigError(f"log_file keeps files ending in {list(EXTENSIONS)}; got {path.name!r}")
        staged = self.store.artifacts.staging_path(ext)  # copied now: later changes to the file do not count
        shutil.copyfile(path, staged)
        self._files.append((name or path.name, staged))

    def log_model(self, model: Any, source: str | None = None) -> ModelInfo:
        """Record a model's identity now (fingerprint and full weight hash: later edits do not change it)."""
        info = model_info(model, source)
        self.models.append(info)
        return info

    def add_tags(self, *tags: str) -> None:
        self.tags += [t for t in tags if t not in self.tags]

    def fail(self, error: str) -> None:
        """Mark the run failed with a message (an exception leaving the block does this by itself)."""
        self._status, self.error = "failed", error

    # Capture ---------------------------------------------------------------------------------------
    def _observed(self, obj: object) -> None:
        if hasattr(obj, "hf_model") and callable(getattr(obj, "fingerprint", None)):  # a model being loaded
            if not any(o is obj for o in self._models_seen):
                self._models_seen.append(obj)
                self.log_model(obj, self.model_source if not self.models else None)
            return
        if not self.capture:
            return
        if callable(getattr(obj, "save", None)) and not any(o is obj for _, o in self._objects):
            self._objects.append((None, obj))

    # Closing ---------------------------------------------------------------------------------------
    def _close(self, started: float, exc: BaseException | None) -> None:
        status = self._status or ("failed" if exc is not None else "finished")
        error = self.error or ("" if exc is None else f"{type(exc).__name__}: {exc}")
        artifacts, problems = self._stage_all()
        if problems:
            error = "; ".join([e for e in (error, *problems) if e])
        methods = [a.method for a, _ in artifacts if a.method]
        try:
            self.store.finish_run(
                self.id,
                status=status,
                ended_at=now(),
                wall_s=time.perf_counter() - started,
                method=self.method or ", ".join(dict.fromkeys(methods)),
                config=self.config,
                seed=self.seed,
                error=error,
                tags=self.tags,
                models=self.models + _artifact_models(self._objects, self.models, self.model_source),
                metrics=self.metrics,
                artifacts=artifacts,
            )
        finally:
            for _, staged in artifacts:
                if staged is not None and staged.exists():
                    staged.unlink()

    def _stage_all(self) -> tuple[list[tuple[ArtifactRecord, Path | None]], list[str]]:
        """Save every collected object to a staging file (outside the write lock: saving can be slow)."""
        staged: list[tuple[ArtifactRecord, Path | None]] = []
        problems: list[str] = []
        names: set[str] = set()
        for given, obj in self._objects:
            kind = str(getattr(obj, "method", "") or getattr(obj, "kind", "") or type(obj).__name__)
            name = _unique(given or kind, names)
            path = self.store.artifacts.staging_path("safetensors")
            try:
                written = obj.save(path)  # type: ignore[attr-defined]
                written = Path(written) if written is not None else path
                if written != path:
                    written.replace(path)
                ext = _sniff(path)
                if ext == "safetensors":
                    canonicalize_safetensors(path)
                else:  # e.g. feature cards save JSON
                    path = path.replace(path.with_suffix(f".{ext}"))
            except Exception as exc:  # a result that cannot be saved must not lose the run's record
                problems.append(f"could not save {name} ({type(obj).__name__}): {type(exc).__name__}: {exc}")
                path.unlink(missing_ok=True)
                continue
            for metric, value in _scalar_metrics(obj).items():
                self.metrics.setdefault(f"{name}/{metric}", {}).setdefault(-1, value)
            role = "result" if hasattr(obj, "tensors") and hasattr(obj, "axes") else "artifact"
            config = getattr(obj, "config", {})
            staged.append(
                (
                    ArtifactRecord(
                        name=name,
                        role=role,
                        cls=f"{type(obj).__module__}.{type(obj).__qualname__}",
                        method=kind,
                        config=config if isinstance(config, dict) else {},
                        sha256="",
                        ext=ext,
                        size=0,
                    ),
                    path,
                )
            )
        for given, path in self._files:
            name = _unique(given, names)
            ext = path.name.rsplit(".", 1)[-1]
            staged.append((ArtifactRecord(name=name, role="file", sha256="", ext=ext, size=0), path))
        return staged, problems


def _sniff(path: Path) -> str:
    """'safetensors' for a file with a safetensors header (what results and artifacts save), 'json' for a
    JSON document (what feature cards save), else 'safetensors' again (canonicalising it then fails clearly)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) == 8:
            (length,) = struct.unpack("<Q", raw)
            if 8 + length <= size and handle.read(1) == b"{":
                return "safetensors"
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "safetensors"
    return "json"


def _unique(name: str, taken: set[str]) -> str:
    candidate, i = name, 2
    while candidate in taken:
        candidate, i = f"{name}-{i}", i + 1
    taken.add(candidate)
    return candidate


def _scalar_metrics(obj: object) -> dict[str, float]:
    """Metrics a result carries by itself: its 0-d tensors, and an evaluation's before/after values."""
    found: dict[str, float] = {}
    tensors = getattr(obj, "tensors", None)
    if isinstance(tensors, Mapping):
        for key, tensor in tensors.items():
            if getattr(tensor, "ndim", None) == 0:
                found[str(key)] = float(tensor)
    names = getattr(obj, "metrics", None)
    if isinstance(names, list) and callable(getattr(obj, "before", None)) and callable(getattr(obj, "after", None)):
        for metric in names:
            found[f"{metric}/before"] = float(obj.before(metric))  # type: ignore[attr-defined]
            found[f"{metric}/after"] = float(obj.after(metric))  # type: ignore[attr-defined]
    return {k: v for k, v in found.items() if not math.isnan(v)}


def _artifact_models(
    objects: Sequence[tuple[str | None, object]], logged: Sequence[ModelInfo], source: str | None
) -> list[ModelInfo]:
    """Models known only through the artifacts made on them (their fingerprint and type)."""
    known = {m.fingerprint for m in logged}
    found: list[ModelInfo] = []
    for _, obj in objects:
        fingerprint = getattr(obj, "fingerprint", None)
        if isinstance(fingerprint, str) and fingerprint and fingerprint not in known:
            known.add(fingerprint)
            found.append(
                ModelInfo(
                    source=source if source and not logged and not found else f"(from {type(obj).__name__})",
                    fingerprint=fingerprint,
                    model_type=str(getattr(obj, "model_type", "")),
                )
            )
    return found


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    import torch

    torch.manual_seed(seed)


@contextmanager
def run(
    name: str,
    *,
    tags: Sequence[str] = (),
    store: str | Path | RunStore | None = None,
    config: Mapping[str, Any] | None = None,
    method: str = "",
    model: Any = None,
    model_source: str | None = None,
    seed: int | None = None,
    description: str = "",
    command: str | None = None,
    capture: bool = True,
) -> Iterator[Run]:
    """Record one run into `store` (a folder; default ``$MECHSCOPE_RUNS`` or ``./mechscope-runs``).

    `model` (a HookedModel) is fingerprinted at the start, so edits made inside the block do not change
    what was recorded as the input; `model_source` names it (a folder or bundled name). `seed`, when
    given, seeds Python, NumPy and torch and is recorded.
    An exception leaving the block marks the run failed (and propagates); the record is written either way.
    With `capture=False` only what is logged explicitly is recorded (e.g. a loop that builds thousands of
    intermediate results, of which only some matter).
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"a run needs a non-empty name; got {name!r}")
    if isinstance(tags, str):
        raise ConfigError(f"tags must be a sequence of strings, not one string ({tags!r}); use tags=[{tags!r}]")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ConfigError(f"seed must be an int; got {seed!r}")
    opened = not isinstance(store, RunStore)
    the_store = RunStore(store) if not isinstance(store, RunStore) else store
    try:
        cwd = Path.cwd()
        commit, dirty = git_state(cwd)
        record = RunRecord(
            id=new_run_id(),
            name=name,
            status="running",
            method=method,
            config=dict(config or {}),
            description=description,
            seed=seed,
            started_at=now(),
            versions=versions(),
            git_commit=commit,
            git_dirty=dirty,
            cwd=str(cwd),
            command=command if command is not None else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            tags=tuple(dict.fromkeys(tags)),
        )
        active = Run(record, the_store)
        active.log_config(config or {})
        active.model_source = model_source
        active.capture = capture
        if model is not None:
            active.log_model(model, model_source)
        if seed is not None:
            _seed_everything(seed)
        the_store.begin_run(record)
        if not observe.subscribed(_observe):
            observe.subscribe(_observe)
        token = current_run.set(active)
        started = time.perf_counter()
        try:
            yield active
        except BaseException as exc:
            current_run.reset(token)
            try:
                active._close(started, exc)
            except Exception as close_exc:  # keep the user's exception; say the record was not written
                message = f"mechscope.records: run {active.id} could not be written: {close_exc}"
                if hasattr(exc, "add_note"):  # Python >= 3.11: printed with the user's traceback
                    exc.add_note(message)
                else:  # Python 3.10 has no exception notes: say it through logging rather than not at all
                    _log.error(message)
            raise
        current_run.reset(token)
        active._close(started, None)
    finally:
        if opened:
            the_store.close()


__all__ = ["Run", "current_run", "run"]
