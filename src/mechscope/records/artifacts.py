"""The content-addressed artifacts folder beside the database: ``artifacts/<sha[:2]>/<sha256>.<ext>``.

Files are named by the SHA-256 of their bytes, so the same result recorded twice is stored once and a file
can never be silently replaced. Every path handed out is resolved inside the folder: names that are not a
hex digest with a known extension, ``..``, absolute paths and symlinks pointing outside are refused.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import struct
import time
from pathlib import Path, PurePosixPath

from mechscope.model.sources.checksums import sha256_file
from mechscope.records.schema import StoreError

#: Extensions the store keeps (result and artifact files are safetensors; logged files may be JSON or text).
EXTENSIONS = ("safetensors", "json", "txt", "csv", "png", "html")
_SHA = re.compile(r"[0-9a-f]{64}")


class PathRefused(StoreError):
    """An artifact path that would leave the store (traversal, absolute path, symlink out)."""


class ArtifactFolder:
    """``root/artifacts``: put files in by content, resolve names back to paths safely."""

    def __init__(self, root: Path) -> None:
        self.root = root / "artifacts"
        self.tmp = self.root / "tmp"

    def staging_path(self, ext: str) -> Path:
        """A fresh temporary path inside the store (same file system, so the final move is a rename)."""
        _check_ext(ext)
        self.tmp.mkdir(parents=True, exist_ok=True)
        return self.tmp / f"{os.getpid()}-{secrets.token_hex(8)}.{ext}"

    def commit(self, staged: Path, ext: str) -> tuple[str, int]:
        """Move a staged file to its content address; returns (sha256, size). A duplicate is dropped."""
        sha, size = sha256_file(staged), staged.stat().st_size
        final = self.root / sha[:2] / f"{sha}.{ext}"
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.is_file() and not final.is_symlink():
            staged.unlink()
        else:
            staged.replace(final)
        return sha, size

    def relative(self, sha: str, ext: str) -> str:
        """The store-relative name of an artifact, validated (``artifacts/ab/ab….safetensors``)."""
        if not isinstance(sha, str) or not _SHA.fullmatch(sha):
            raise PathRefused(f"artifact name {sha!r} is not a SHA-256 hex digest")
        _check_ext(ext)
        return f"artifacts/{sha[:2]}/{sha}.{ext}"

    def path(self, sha: str, ext: str) -> Path:
        """The file of an artifact, resolved inside the store (whether or not it exists)."""
        return self.resolve(self.relative(sha, ext))

    def resolve(self, relative: str) -> Path:
        """A store-relative path resolved inside ``artifacts/``; refuses anything that would leave it."""
        rel = PurePosixPath(relative.replace("\\", "/"))
        if rel.is_absolute() or relative.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", relative):
            raise PathRefused(f"artifact path {relative!r} is absolute; only paths inside the store are read")
        if any(part in ("..", "") for part in relative.replace("\\", "/").split("/")):
            raise PathRefused(f"artifact path {relative!r} contains '..' or an empty part; refused")
        if not rel.parts or rel.parts[0] != "artifacts":
            raise PathRefused(f"artifact path {relative!r} is not under artifacts/")
        base = self.root.resolve()
        target = (self.root.parent / Path(*rel.parts)).resolve()
        if not target.is_relative_to(base):
            raise PathRefused(f"artifact path {relative!r} resolves outside the store (to {str(target)!r}); refused")
        return target

    def files(self) -> list[Path]:
        """Every committed artifact file (not the staging folder)."""
        if not self.root.is_dir():
            return []
        return [p for p in self.root.glob("??/*") if p.is_file() or p.is_symlink()]

    def stale_staged(self, older_than_s: float) -> list[Path]:
        """Staged files left behind by interrupted writers."""
        if not self.tmp.is_dir():
            return []
        cutoff = time.time() - older_than_s
        return [p for p in self.tmp.iterdir() if p.is_file() and p.stat().st_mtime < cutoff]


def canonicalize_safetensors(path: Path) -> None:
    """Rewrite a safetensors file's JSON header with sorted keys, in place (tensor bytes untouched).

    Writers serialise the header from a hash map whose order changes from process to process, so the same
    result would get a different SHA-256 each time it is saved; sorted, equal content gives equal bytes.
    """
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ValueError(f"{str(path)!r} is not a safetensors file (shorter than its header)")
        (length,) = struct.unpack("<Q", raw)
        header = json.loads(handle.read(length))
        data = handle.read()
    if isinstance(header.get("__metadata__"), dict):
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def parse_name(path: Path) -> tuple[str, str] | None:
    """(sha256, ext) of a committed file's name, or None for a name the store did not write."""
    sha, _, ext = path.name.partition(".")
    if _SHA.fullmatch(sha) and ext in EXTENSIONS and path.parent.name == sha[:2]:
        return sha, ext
    return None


def _check_ext(ext: str) -> None:
    if ext not in EXTENSIONS:
        raise PathRefused(f"artifact extension {ext!r} is not one the store keeps; known: {list(EXTENSIONS)}")


__all__ = ["EXTENSIONS", "ArtifactFolder", "PathRefused", "canonicalize_safetensors", "parse_name", "sha256_file"]
