"""A run store: ``DIR/runs.sqlite`` (the records) and ``DIR/artifacts/`` (their files, by content hash).

:class:`RunStore` reads and writes records as :class:`RunRecord` values; every write is one transaction
(``BEGIN IMMEDIATE``), so concurrent writers in several processes serialise instead of corrupting the file.
``read_only=True`` opens the database with ``mode=ro`` (the viewer's way): nothing can be changed.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mechscope.records.artifacts import ArtifactFolder, parse_name
from mechscope.records.provenance import ModelInfo
from mechscope.records.schema import StoreError, connect_ro, connect_rw

DB_NAME = "runs.sqlite"
DEFAULT_DIR = "mechscope-runs"
ENV_VAR = "MECHSCOPE_RUNS"
STATUSES = ("running", "finished", "failed")


def default_store_dir() -> Path:
    """``$MECHSCOPE_RUNS`` when set, else ``./mechscope-runs`` in the current directory."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


@dataclass(frozen=True, kw_only=True)
class ArtifactRecord:
    """One file of a run: a saved result or artifact, or a logged file, addressed by its SHA-256."""

    name: str
    role: str
    sha256: str
    ext: str
    size: int
    cls: str = ""
    method: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def relative_path(self) -> str:
        return f"artifacts/{self.sha256[:2]}/{self.sha256}.{self.ext}"


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """Everything recorded about one run. `metrics` maps a name to ``{step: value}`` (step -1: no step)."""

    id: str
    name: str
    status: str
    started_at: str
    method: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    seed: int | None = None
    ended_at: str | None = None
    wall_s: float | None = None
    versions: dict[str, str] = field(default_factory=dict)
    git_commit: str | None = None
    git_dirty: bool | None = None
    cwd: str = ""
    command: str = ""
    error: str = ""
    tags: tuple[str, ...] = ()
    models: tuple[ModelInfo, ...] = ()
    metrics: dict[str, dict[int, float]] = field(default_factory=dict)
    artifacts: tuple[ArtifactRecord, ...] = ()

    def metric(self, name: str) -> float:
        """The value of a metric logged without a step (or its last step)."""
        if name not in self.metrics:
            raise KeyError(f"run {self.id} has no metric {name!r}; it has {sorted(self.metrics)}")
        series = self.metrics[name]
        return series[max(series)]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status,
            "method": self.method,
            "config": self.config,
            "description": self.description,
            "seed": self.seed,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "wall_s": self.wall_s,
            "versions": self.versions,
            "git_commit": self.git_commit,
            "git_dirty": self.git_dirty,
            "cwd": self.cwd,
            "command": self.command,
            "error": self.error,
            "tags": list(self.tags),
            "models": [m.to_json() for m in self.models],
            "metrics": {k: {str(s): v for s, v in sorted(series.items())} for k, series in self.metrics.items()},
            "artifacts": [
                {
                    "name": a.name,
                    "role": a.role,
                    "class": a.cls,
                    "method": a.method,
                    "config": a.config,
                    "sha256": a.sha256,
                    "ext": a.ext,
                    "size": a.size,
                    "path": a.relative_path,
                }
                for a in self.artifacts
            ],
        }


@dataclass(frozen=True, kw_only=True)
class GcReport:
    """What :meth:`RunStore.gc` removed (or would remove with ``dry_run``) and how many bytes."""

    removed: tuple[Path, ...]
    kept: int
    freed_bytes: int
    dry_run: bool


def new_run_id() -> str:
    """Sortable, unique across processes: UTC time plus 6 random hex digits."""
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class RunStore:
    """One store folder. Open with :func:`open_store` (or ``RunStore(dir)``); close with :meth:`close`."""

    def __init__(self, root: str | Path | None = None, *, read_only: bool = False) -> None:
        self.root = Path(root) if root is not None else default_store_dir()
        self.read_only = read_only
        self.db_path = self.root / DB_NAME
        self.artifacts = ArtifactFolder(self.root)
        if read_only:
            self._conn = connect_ro(self.db_path)
        else:
            if self.root.exists() and not self.root.is_dir():
                raise StoreError(f"run store {str(self.root)!r} exists and is not a folder")
            self.root.mkdir(parents=True, exist_ok=True)
            self._conn = connect_rw(self.db_path)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.Lock()

    # Life cycle ------------------------------------------------------------------------------------
    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; takes the database's write lock at its start (no upgrade deadlocks)."""
        if self.read_only:
            raise StoreError(f"run store {str(self.root)!r} was opened read-only")
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # Writing ---------------------------------------------------------------------------------------
    def begin_run(self, record: RunRecord) -> None:
        """Insert a run in state 'running' with its provenance (so an interrupted run is still visible)."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO runs (id, name, status, method, config, description, seed, started_at, versions, "
                "git_commit, git_dirty, cwd, command) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.name,
                    record.method,
                    _dump(record.config),
                    record.description,
                    record.seed,
                    record.started_at,
                    _dump(record.versions),
                    record.git_commit,
                    None if record.git_dirty is None else int(record.git_dirty),
                    record.cwd,
                    record.command,
                ),
            )
            conn.executemany("INSERT INTO tags (run_id, tag) VALUES (?, ?)", [(record.id, t) for t in record.tags])

    def finish_run(
        self,
        run_id: str,
        *,
        status: str,
        ended_at: str,
        wall_s: float,
        method: str,
        config: dict[str, Any],
        seed: int | None,
        error: str,
        tags: Sequence[str],
        models: Sequence[ModelInfo],
        metrics: dict[str, dict[int, float]],
        artifacts: Sequence[tuple[ArtifactRecord, Path | None]],
    ) -> None:
        """Write a run's outcome in one transaction; staged artifact files move to their address inside it
        (so :meth:`gc`, which takes the same lock, never sees a file before its reference)."""
        if status not in STATUSES:
            raise StoreError(f"run status must be one of {STATUSES}; got {status!r}")
        with self._write() as conn:
            conn.execute(
                "UPDATE runs SET status=?, ended_at=?, wall_s=?, method=?, config=?, seed=?, error=? WHERE id=?",
                (status, ended_at, wall_s, method, _dump(config), seed, error, run_id),
            )
            conn.executemany(
                "INSERT OR IGNORE INTO tags (run_id, tag) VALUES (?, ?)", [(run_id, t) for t in dict.fromkeys(tags)]
            )
            conn.executemany(
                "INSERT INTO models (run_id, position, source, fingerprint, weights_sha256, model_type, n_params) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (run_id, i, m.source, m.fingerprint, m.weights_sha256, m.model_type, m.n_params)
                    for i, m in enumerate(models)
                ],
            )
            conn.executemany(
                "INSERT OR REPLACE INTO metrics (run_id, name, step, value) VALUES (?, ?, ?, ?)",
                [(run_id, name, step, float(v)) for name, series in metrics.items() for step, v in series.items()],
            )
            for art, staged in artifacts:
                sha, size = (art.sha256, art.size) if staged is None else self.artifacts.commit(staged, art.ext)
                conn.execute(
                    "INSERT INTO artifacts (run_id, name, role, class, method, config, sha256, ext, size) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, art.name, art.role, art.cls, art.method, _dump(art.config), sha, art.ext, size),
                )

    def delete_run(self, run_id: str) -> None:
        """Remove a run's record (its files stay until :meth:`gc` finds them unreferenced)."""
        self.get(run_id)
        with self._write() as conn:
            conn.execute("DELETE FROM runs WHERE id=?", (run_id,))

    def gc(self, *, dry_run: bool = False, staged_older_than_s: float = 3600.0) -> GcReport:
        """Delete artifact files no run references (and staged files older than an hour).

        Runs under the write lock, so no writer can add a reference while files are being removed.
        """
        ctx: AbstractContextManager[sqlite3.Connection] = self._write() if not dry_run else nullcontext(self._conn)
        with ctx as conn:
            referenced = {(r[0], r[1]) for r in conn.execute("SELECT DISTINCT sha256, ext FROM artifacts")}
            removed: list[Path] = []
            freed = kept = 0
            for path in self.artifacts.files():
                parsed = parse_name(path)
                if parsed is not None and parsed in referenced:
                    kept += 1
                    continue
                removed.append(path)
                freed += path.lstat().st_size
            removed += self.artifacts.stale_staged(staged_older_than_s)
            if not dry_run:
                for path in removed:
                    path.unlink(missing_ok=True)
        return GcReport(removed=tuple(removed), kept=kept, freed_bytes=freed, dry_run=dry_run)

    # Reading ---------------------------------------------------------------------------------------
    def ids(self) -> list[str]:
        return [r[0] for r in self._read("SELECT id FROM runs ORDER BY started_at DESC, id DESC")]

    def runs(
        self,
        *,
        text: str = "",
        tag: str = "",
        method: str = "",
        status: str = "",
        limit: int | None = None,
    ) -> list[RunRecord]:
        """Runs, newest first, filtered: `text` in the name, description or id; exact tag, method, status."""
        where, params = _filters(text, tag, method, status)
        sql = f"SELECT r.id FROM runs r WHERE {where} ORDER BY r.started_at DESC, r.id DESC"
        if limit is not None:
            sql += f" LIMIT {max(0, int(limit))}"
        return [self.get(r[0]) for r in self._read(sql, params)]

    def count(self, *, text: str = "", tag: str = "", method: str = "", status: str = "") -> int:
        """How many runs :meth:`runs` would return without a limit."""
        where, params = _filters(text, tag, method, status)
        return int(self._read(f"SELECT count(*) FROM runs r WHERE {where}", params)[0][0])

    def get(self, run_id: str) -> RunRecord:
        """The full record of one run; :class:`StoreError` naming close ids when there is none."""
        with self._lock:
            conn = self._conn
            row = conn.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
            if row is None:
                close = [r[0] for r in conn.execute("SELECT id FROM runs WHERE instr(id, ?) LIMIT 5", (run_id,))]
                hint = f"; runs whose id contains it: {close}" if close else ""
                raise StoreError(f"no run {run_id!r} in {str(self.root)!r}{hint}")
            tags = tuple(r[0] for r in conn.execute("SELECT tag FROM tags WHERE run_id=? ORDER BY tag", (run_id,)))
            models = tuple(
                ModelInfo(
                    source=r["source"],
                    fingerprint=r["fingerprint"],
                    weights_sha256=r["weights_sha256"],
                    model_type=r["model_type"],
                    n_params=r["n_params"],
                )
                for r in conn.execute("SELECT * FROM models WHERE run_id=? ORDER BY position", (run_id,))
            )
            metrics: dict[str, dict[int, float]] = {}
            for r in conn.execute(
                "SELECT name, step, value FROM metrics WHERE run_id=? ORDER BY name, step", (run_id,)
            ):
                metrics.setdefault(r[0], {})[int(r[1])] = float(r[2])
            artifacts = tuple(
                ArtifactRecord(
                    name=r["name"],
                    role=r["role"],
                    cls=r["class"],
                    method=r["method"],
                    config=_load(r["config"]),
                    sha256=r["sha256"],
                    ext=r["ext"],
                    size=r["size"],
                )
                for r in conn.execute("SELECT * FROM artifacts WHERE run_id=? ORDER BY rowid", (run_id,))
            )
        return RunRecord(
            id=row["id"],
            name=row["name"],
            status=row["status"],
            method=row["method"],
            config=_load(row["config"]),
            description=row["description"],
            seed=row["seed"],
            started_at=row["started_at"],
            ended_at=row["ended_at"],
            wall_s=row["wall_s"],
            versions=_load(row["versions"]),
            git_commit=row["git_commit"],
            git_dirty=None if row["git_dirty"] is None else bool(row["git_dirty"]),
            cwd=row["cwd"],
            command=row["command"],
            error=row["error"],
            tags=tags,
            models=models,
            metrics=metrics,
            artifacts=artifacts,
        )

    def tags(self) -> list[str]:
        return [r[0] for r in self._read("SELECT DISTINCT tag FROM tags ORDER BY tag")]

    def methods(self) -> list[str]:
        return [r[0] for r in self._read("SELECT DISTINCT method FROM runs WHERE method != '' ORDER BY method")]

    def artifact_path(self, artifact: ArtifactRecord) -> Path:
        """The file of an artifact, resolved inside the store (refuses names that would leave it)."""
        return self.artifacts.path(artifact.sha256, artifact.ext)

    def export(self, run_ids: Sequence[str] | None = None) -> dict[str, Any]:
        """A JSON-ready document of the chosen runs (all when None), with the store's schema version."""
        from mechscope.records.schema import SCHEMA_VERSION

        ids = list(run_ids) if run_ids else self.ids()
        return {
            "format": "mechscope.runs",
            "schema_version": SCHEMA_VERSION,
            "store": str(self.root),
            "runs": [self.get(i).to_json() for i in ids],
        }


def _filters(text: str, tag: str, method: str, status: str) -> tuple[str, list[Any]]:
    where: list[str] = ["1=1"]
    params: list[Any] = []
    if text:
        where.append("(instr(lower(r.name), lower(?)) OR instr(lower(r.description), lower(?)) OR instr(r.id, ?))")
        params += [text, text, text]
    if tag:
        where.append("EXISTS (SELECT 1 FROM tags t WHERE t.run_id = r.id AND t.tag = ?)")
        params.append(tag)
    if method:
        where.append("r.method = ?")
        params.append(method)
    if status:
        where.append("r.status = ?")
        params.append(status)
    return " AND ".join(where), params


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _load(text: str | None) -> Any:
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"unreadable": text}


def open_store(root: str | Path | None = None, *, read_only: bool = False) -> RunStore:
    """Open (creating unless `read_only`) the store folder `root` (default :func:`default_store_dir`)."""
    return RunStore(root, read_only=read_only)


__all__ = [
    "DB_NAME",
    "DEFAULT_DIR",
    "ENV_VAR",
    "ArtifactRecord",
    "GcReport",
    "RunRecord",
    "RunStore",
    "default_store_dir",
    "new_run_id",
    "open_store",
]
