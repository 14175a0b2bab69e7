"""The run database: one SQLite file, a schema version (``PRAGMA user_version``) and ordered migrations.

Every open checks the file before touching it: a file that is not a SQLite database, or one written by a
newer mechscope, raises :class:`StoreError` and is left exactly as it was. Writers use WAL mode (readers
never block the writer) and a busy timeout, so several processes can record into one store at once.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from mechscope.errors import MechscopeError

#: The schema this mechscope writes and reads; stores from newer versions are refused.
SCHEMA_VERSION = 1
#: How long a writer waits for another process's transaction (seconds).
BUSY_TIMEOUT_S = 60.0

_V1 = """
CREATE TABLE migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at TEXT NOT NULL
);
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'finished', 'failed')),
    method TEXT NOT NULL DEFAULT '',
    config TEXT NOT NULL DEFAULT '{}',
    description TEXT NOT NULL DEFAULT '',
    seed INTEGER,
    started_at TEXT NOT NULL,
    ended_at TEXT,
    wall_s REAL,
    versions TEXT NOT NULL DEFAULT '{}',
    git_commit TEXT,
    git_dirty INTEGER,
    cwd TEXT NOT NULL DEFAULT '',
    command TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX runs_started ON runs (started_at);
CREATE TABLE tags (
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    tag TEXT NOT NULL,
    PRIMARY KEY (run_id, tag)
);
CREATE TABLE models (
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    source TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    weights_sha256 TEXT NOT NULL DEFAULT '',
    model_type TEXT NOT NULL DEFAULT '',
    n_params INTEGER,
    PRIMARY KEY (run_id, position)
);
CREATE TABLE metrics (
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT -1,
    value REAL NOT NULL,
    PRIMARY KEY (run_id, name, step)
);
CREATE TABLE artifacts (
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('result', 'artifact', 'file')),
    class TEXT NOT NULL DEFAULT '',
    method TEXT NOT NULL DEFAULT '',
    config TEXT NOT NULL DEFAULT '{}',
    sha256 TEXT NOT NULL,
    ext TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (run_id, name)
);
CREATE INDEX artifacts_sha ON artifacts (sha256);
"""

#: (version, name, SQL). Applied in order to bring a store up to :data:`SCHEMA_VERSION`; append only.
MIGRATIONS: tuple[tuple[int, str, str], ...] = ((1, "initial schema", _V1),)


class StoreError(MechscopeError):
    """A run store that cannot be used as asked (newer schema, not a database, missing run...)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _check_version(conn: sqlite3.Connection, where: Path, newest: int = SCHEMA_VERSION) -> int:
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        raise StoreError(
            f"{str(where)!r} is not a readable mechscope run database ({exc}); it was left untouched. "
            "Point --runs at another folder or move the file away."
        ) from exc
    if version > newest:
        raise StoreError(
            f"run store {str(where)!r} has schema version {version}; this mechscope reads versions up to "
            f"{newest}. Upgrade mechscope to read it (the store was left untouched)."
        )
    return version


def _use_wal(conn: sqlite3.Connection) -> None:
    """Put the database in WAL mode (a setting the file keeps). Changing the journal mode needs an exclusive
    lock that SQLite may refuse at once, without its busy handler, while a second process opens the same new
    file: seen as "database is locked" from one of two writers starting on a fresh store. Retried until
    BUSY_TIMEOUT_S, as every other lock here waits."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def connect_rw(path: Path, migrations: Sequence[tuple[int, str, str]] = MIGRATIONS) -> sqlite3.Connection:
    """Open (creating when absent) the database at `path` for writing, migrated to the newest schema."""
    existed = path.exists()
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    try:
        version = _check_version(conn, path, max(v for v, _, _ in migrations))
        if existed and version == 0 and _has_tables(conn):
            raise StoreError(f"{str(path)!r} is a SQLite database but not a mechscope run store; it was left untouched")
        _use_wal(conn)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        _migrate(conn, path, migrations)
    except BaseException:
        conn.close()
        raise
    return conn


def connect_ro(path: Path) -> sqlite3.Connection:
    """Open the database read-only (``mode=ro``): the viewer can never change a store."""
    if not path.is_file():
        raise StoreError(f"no run database at {str(path)!r}; record a run first (records.run or --record)")
    conn = sqlite3.connect(
        f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S, check_same_thread=False
    )
    try:
        version = _check_version(conn, path)
        if version < SCHEMA_VERSION:
            raise StoreError(
                f"run store {str(path)!r} has schema version {version}; open it once for writing "
                f"(e.g. `mechscope runs list`) to migrate it to {SCHEMA_VERSION}"
            )
    except BaseException:
        conn.close()
        raise
    return conn


def _has_tables(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0] > 0


def _migrate(conn: sqlite3.Connection, where: Path, migrations: Sequence[tuple[int, str, str]]) -> None:
    """Apply the migrations newer than the file's version, each in its own transaction."""
    newest = max(v for v, _, _ in migrations)
    for version, name, sql in migrations:
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if current > newest:
                raise StoreError(
                    f"run store {str(where)!r} has schema version {current}; this mechscope reads versions up to "
                    f"{newest}. Upgrade mechscope to read it (the store was left untouched)."
                )
            if current >= version:
                conn.execute("ROLLBACK")
                continue
            if current != version - 1:
                raise StoreError(f"run store {str(where)!r}: no migration from version {current} to {version}")
            for statement in _statements(sql):
                conn.execute(statement)
            conn.execute("INSERT INTO migrations (version, name, applied_at) VALUES (?, ?, ?)", (version, name, _now()))
            conn.execute(f"PRAGMA user_version = {int(version)}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def _statements(sql: str) -> list[str]:
    """Split a migration script into statements (``executescript`` would commit our transaction)."""
    return [s.strip() for s in sql.split(";") if s.strip()]


__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "StoreError", "connect_ro", "connect_rw"]
