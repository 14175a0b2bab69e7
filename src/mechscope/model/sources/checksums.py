"""``checksums.json`` beside a model's files: written after a save, verified before any weight is loaded.

Only plain files directly in the folder are listed (never temporary files a killed save left behind),
and a listed name that is not a plain file name inside the folder (``../x``, an absolute path, a
sub-path) is refused before anything is read, so a crafted checksum file cannot make the verifier read
files outside the folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mechscope.errors import CorruptWeightsError, ModelNotFoundError
from mechscope.io import read_json, write_text_atomic

CHECKSUMS = "checksums.json"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (streamed)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _listed(path: Path) -> bool:
    """Files that belong in a checksum list: plain, not hidden (temporary files start with '.')."""
    return path.is_file() and not path.is_symlink() and not path.name.startswith(".") and path.name != CHECKSUMS


def write_checksums(folder: Path) -> dict[str, str]:
    """Record the sha256 of every plain file in `folder` (atomically); returns name -> digest."""
    folder = Path(folder)
    sums = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if _listed(p)}
    path = write_text_atomic(folder / CHECKSUMS, json.dumps({"schema_version": 1, "sha256": sums}, indent=1) + "\n")
    path.chmod(0o644)  # package data must be readable by every user (the atomic writer's temporary file is 0600)
    return sums


def verify_checksums(folder: Path) -> bool:
    """Check every file `checksums.json` lists (False when the folder has none).

    Raises :class:`ModelNotFoundError` for a listed file that is missing and :class:`CorruptWeightsError`
    for one whose bytes differ, or for a checksum file that is malformed or names anything but a file
    directly inside `folder`."""
    folder = Path(folder)
    sums_path = folder / CHECKSUMS
    if not sums_path.is_file():
        return False
    try:
        expected = read_json(sums_path, "checksum list")["sha256"]
        if not isinstance(expected, dict):
            raise TypeError(f"'sha256' must map file names to digests; got {type(expected).__name__}")
    except Exception as exc:
        raise CorruptWeightsError(f"{sums_path}: malformed checksum list ({exc})") from exc
    for name, digest in expected.items():
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CorruptWeightsError(
                f"{sums_path}: lists {name!r}; a checksum list may only name files directly inside {folder}"
            )
        path = folder / name
        if not path.is_file():
            raise ModelNotFoundError(f"expected {name} in {folder} (listed in {CHECKSUMS}); it is missing")
        actual = sha256_file(path)
        if actual != digest:
            raise CorruptWeightsError(
                f"{path}: expected sha256 {digest} (from {CHECKSUMS}), got {actual}; the file is truncated or "
                "altered - restore it (or re-save the model)"
            )
    return True


__all__ = ["CHECKSUMS", "sha256_file", "verify_checksums", "write_checksums"]
