"""`mechscope clean`: list (and, with ``--yes``, remove) temporary files and folders left by killed writes.

Every mechscope writer works in a hidden sibling first and renames it into place, so a kill leaves the old
artifact or the new one -- plus, at worst, the hidden temporary. Their names are recognisable:

- ``.NAME.XXXXXXXX.tmp`` files: the atomic file writer (:func:`mechscope.io.write_bytes_atomic`), used by
  results, SAEs, cards, activation-store shards, GGUF indexes and assembled GGUF files;
- ``.NAME.new-XXXXXXXX`` / ``.NAME.old-XXXXXXXX`` folders: an organism's staged save and the folder it retired;
- ``.NAME.tmp-XXXXXXXX`` folders: a GGUF conversion in progress; ``.NAME.discard-PID-NS``: a cache entry
  being deleted.

A temporary that is younger than the grace period is never removed (another process may be writing it right
now); for a folder, its age is that of the newest file inside. Symbolic links are never followed or removed.
Run records' staging files are collected by ``mechscope runs gc``, not here.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

#: The random part of a ``tempfile.mkstemp`` / ``mkdtemp`` name (8 characters of ``[a-z0-9_]``).
_RANDOM = r"[a-z0-9_]{8}"
#: Temporary files written by the atomic writer.
ORPHAN_FILE = re.compile(rf"^\..+\.{_RANDOM}\.tmp$")
#: Temporary folders: staged organism saves (new-), retired organism folders (old-), GGUF conversions (tmp-).
ORPHAN_FOLDER = re.compile(rf"^\..+\.(?:(?:new|old|tmp)-{_RANDOM}|discard-\d+-\d+)$")
#: Default grace period: one hour (a GGUF conversion of a large model can take several minutes).
DEFAULT_GRACE_S = 3600.0


@dataclass(frozen=True)
class Orphan:
    """A temporary file or folder a killed write left behind."""

    path: Path
    is_folder: bool
    size: int  # bytes (a folder: everything inside)
    age_s: float  # seconds since its newest content was modified


def _newest_and_size(folder: Path) -> tuple[float, int]:
    newest, size = folder.lstat().st_mtime, 0
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            try:
                info = (Path(root) / name).lstat()
            except OSError:
                continue
            newest = max(newest, info.st_mtime)
            if name in files:
                size += info.st_size
    return newest, size


def find_orphans(folder: Path, *, now: float | None = None) -> Iterator[Orphan]:
    """Every temporary left under `folder` (searched recursively; an orphan folder is not searched inside)."""
    now = time.time() if now is None else now
    for root, dirs, files in os.walk(folder, followlinks=False):
        base = Path(root)
        for name in sorted(files):
            path = base / name
            if ORPHAN_FILE.match(name) and not path.is_symlink():
                info = path.lstat()
                yield Orphan(path, False, info.st_size, now - info.st_mtime)
        for name in sorted(dirs):
            path = base / name
            if ORPHAN_FOLDER.match(name) and not path.is_symlink():
                newest, size = _newest_and_size(path)
                yield Orphan(path, True, size, now - newest)
        dirs[:] = sorted(d for d in dirs if not ORPHAN_FOLDER.match(d))


def remove_orphan(orphan: Orphan) -> None:
    """Delete one orphan (a folder with everything inside)."""
    if orphan.is_folder:
        shutil.rmtree(orphan.path)
    else:
        orphan.path.unlink(missing_ok=True)


def default_folders() -> list[Path]:
    """Where mechscope writes when no folder is named: the caches, the output folder, the bundled organisms."""
    from mechscope.cli.common import out_dir
    from mechscope.model.gguf import cache_root
    from mechscope.steer.editing.stats import default_cache_dir

    folders = [cache_root().parent, default_cache_dir().parent, out_dir()]
    import mechscope.zoo

    folders.append(Path(mechscope.zoo.__file__).parent / "models")
    unique: list[Path] = []
    for folder in folders:
        if folder.is_dir() and folder.resolve() not in {f.resolve() for f in unique}:
            unique.append(folder)
    return unique


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _unique(orphans: Iterable[Orphan]) -> list[Orphan]:
    seen: set[Path] = set()
    out = []
    for orphan in orphans:
        key = orphan.path.resolve()
        if key not in seen:
            seen.add(key)
            out.append(orphan)
    return out


def clean(
    folders: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Folders to search (recursively). Default: the mechscope caches, output folder and organisms."
        ),
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes/--dry-run", help="Remove the orphans (default: --dry-run, only list them).")
    ] = False,
    grace: Annotated[
        float,
        typer.Option(help="Seconds: temporaries modified more recently are kept (another process may be writing)."),
    ] = DEFAULT_GRACE_S,
) -> None:
    """List temporary files and folders left by interrupted writes; remove them with --yes."""
    from mechscope.errors import ConfigError

    if not grace >= 0:
        raise ConfigError(f"--grace must be a number of seconds >= 0; got {grace}")
    roots = list(folders) if folders else default_folders()
    for root in roots:
        if not root.is_dir():
            raise ConfigError(f"expected a folder to search for temporary files; got {str(root)!r}, which is not one")
    orphans = _unique(o for root in roots for o in find_orphans(root))
    typer.echo(f"searched {', '.join(str(r) for r in roots) or '(no default folder exists)'}")
    removed = kept = 0
    freed = 0
    for orphan in orphans:
        kind = "folder" if orphan.is_folder else "file"
        if orphan.age_s < grace:
            kept += 1
            typer.echo(f"  keep    {orphan.path}  ({kind}, {_size(orphan.size)}, {orphan.age_s:.0f} s old < grace)")
            continue
        if yes:
            remove_orphan(orphan)
            removed += 1
            freed += orphan.size
            typer.echo(f"  removed {orphan.path}  ({kind}, {_size(orphan.size)})")
        else:
            typer.echo(f"  orphan  {orphan.path}  ({kind}, {_size(orphan.size)}, {orphan.age_s / 60:.0f} min old)")
    stale = len(orphans) - kept
    if yes:
        typer.echo(f"removed {removed} orphan(s), {_size(freed)}; kept {kept} younger than {grace:g} s")
    else:
        hint = "; run again with --yes to remove them" if stale else ""
        typer.echo(f"{stale} orphan(s) older than {grace:g} s, {kept} younger kept{hint}")


__all__ = ["DEFAULT_GRACE_S", "ORPHAN_FILE", "ORPHAN_FOLDER", "Orphan", "clean", "default_folders", "find_orphans"]
