"""GGUF files as ordinary Hugging Face model folders, converted once and cached safely.

transformers can read a ``.gguf`` file (llama.cpp's format) and dequantise it, but that is slow (15 s to
minutes) and the result refuses ``save_pretrained``. :func:`gguf_to_folder` converts a GGUF file once into a
clean folder (``config.json``, ``model.safetensors``, tokenizer files) in a user cache, and later calls
reuse it in about a second.

Cache layout (``<root>`` is, in order: the ``cache_dir`` argument, ``$MECHSCOPE_CACHE/gguf``,
``$XDG_CACHE_HOME/mechscope/gguf``, ``~/.cache/mechscope/gguf``)::

    <root>/index.json                      (path, size, mtime_ns) -> sha256 of each GGUF file seen
    <root>/<sha256[:20]>-<dtype>/          one converted model
        config.json, model.safetensors, tokenizer.json, ...
        manifest.json                      source sha256, dtype, size and sha256 of every file

The folder is keyed by the *content* hash of the GGUF file; the index only lets an unchanged file (same
path, size and mtime) skip re-hashing. A conversion is written into a temporary folder next to the final
one, every file fsynced, the manifest written last, then renamed into place, so an interrupted conversion
never leaves a folder under the final name. Before use, a cached folder is checked against its manifest:
presence and size always (catches truncation), plus by default (``verify="sample"``) the hash of 64
evenly spaced 64 KiB blocks of each file, or with ``verify="full"`` the sha256 of every byte (~0.5 s
per GB). A folder that fails is moved aside, deleted and rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mechscope.errors import ConfigError, MechscopeError, ModelNotFoundError
from mechscope.io import give_default_mode, write_text_atomic

logger = logging.getLogger(__name__)

CACHE_ENV = "MECHSCOPE_CACHE"
MANIFEST = "manifest.json"
INDEX = "index.json"
SCHEMA_VERSION = 1
#: Files a converted folder must hold besides the manifest.
REQUIRED_FILES = ("config.json", "model.safetensors")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

Verify = Literal["full", "sample", "size"]
#: The sampled check reads this many evenly spaced blocks of this size (4 MiB of any file).
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 64, 1 << 16


class GGUFError(MechscopeError, ValueError):
    """A GGUF file that cannot be converted (unreadable, unsupported architecture, missing libraries)."""


class CorruptCacheError(MechscopeError, ValueError):
    """A cached conversion that does not match its manifest (truncated, altered or half-written)."""


@dataclass(frozen=True)
class GGUFConversion:
    """Where a GGUF file's converted folder is, and whether this call reused or (re)built it."""

    folder: Path
    source: Path
    sha256: str
    dtype: str
    reused: bool
    rebuilt_corrupt: bool  # a cached folder existed but failed verification and was rebuilt
    seconds: float


# Cache location -------------------------------------------------------------------------------------------
def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding converted GGUF models (argument, then ``$MECHSCOPE_CACHE/gguf``, then XDG)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser() / "gguf"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mechscope" / "gguf"


def _dtype_name(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise ConfigError(f"dtype must be one of {sorted(_DTYPE_NAMES.values())}; got {dtype}")
        return _DTYPE_NAMES[dtype]
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
    name = aliases.get(dtype, dtype)
    if name not in _DTYPE_NAMES.values():
        raise ConfigError(f"dtype must be one of {sorted(_DTYPE_NAMES.values())}; got {dtype!r}")
    return name


# Hashing --------------------------------------------------------------------------------------------------
def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sample_digest(path: Path, blocks: int = SAMPLE_BLOCKS, block_bytes: int = SAMPLE_BLOCK_BYTES) -> str:
    """sha256 of a file's size and of `blocks` evenly spaced blocks (first and last included)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        if size <= blocks * block_bytes:
            digest.update(handle.read())
        else:
            for i in range(blocks):
                handle.seek(i * (size - block_bytes) // (blocks - 1))
                digest.update(handle.read(block_bytes))
    return digest.hexdigest()


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def file_digest(path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> str:
    """sha256 of a GGUF file, reusing the value recorded for the same (path, size, mtime) in the index."""
    path = Path(path)
    root = cache_root(cache_dir)
    index_path = root / INDEX
    key = _stat_key(path)
    index: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(index_path.read_text())
        if isinstance(loaded, dict):
            index = {str(k): str(v) for k, v in loaded.items()}
    if key in index and len(index[key]) == 64:
        return index[key]
    digest = sha256_file(path)
    index[key] = digest
    with contextlib.suppress(OSError):  # a read-only cache still works, only slower
        write_text_atomic(index_path, json.dumps(index, indent=1, sort_keys=True) + "\n")
    return digest


# Atomic file-system helpers -------------------------------------------------------------------------------
def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some file systems refuse fsync on directories
            os.fsync(fd)
    finally:
        os.close(fd)


def _discard(folder: Path) -> None:
    """Move `folder` out of the way (atomic) and delete it."""
    if not folder.exists():
        return
    trash = folder.with_name(f".{folder.name}.discard-{os.getpid()}-{time.monotonic_ns()}")
    try:
        folder.rename(trash)
    except OSError:
        trash = folder
    shutil.rmtree(trash, ignore_errors=True)


# Manifest -------------------------------------------------------------------------------------------------
def write_manifest(folder: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Record size and sha256 of every file in `folder`, then the manifest itself (fsynced)."""
    files = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST):
        _fsync_path(path)
        files[path.name] = {"size": path.stat().st_size, "sha256": sha256_file(path), "sample": sample_digest(path)}
    manifest = {"schema_version": SCHEMA_VERSION, **extra, "files": files}
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def verify_cached(folder: str | os.PathLike[str], verify: Verify = "sample") -> dict[str, Any]:
    """The manifest of a converted folder after checking every file against it.

    ``"size"`` checks presence and sizes (catches truncation; microseconds); ``"sample"`` also hashes
    64 evenly spaced 64 KiB blocks per file (catches damage touching any of them; milliseconds);
    ``"full"`` re-hashes every byte (catches any alteration; ~0.5 s per GB). Raises
    :class:`CorruptCacheError`.
    """
    folder = Path(folder)
    if verify not in ("full", "sample", "size"):
        raise ConfigError(f"verify must be 'full', 'sample' or 'size'; got {verify!r}")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptCacheError(f"{folder}: no readable {MANIFEST} (interrupted or foreign folder): {exc}") from exc
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise CorruptCacheError(
            f"{folder}: manifest schema {manifest.get('schema_version')!r}, expected {SCHEMA_VERSION}"
        )
    for name in REQUIRED_FILES:
        if name not in files:
            raise CorruptCacheError(f"{folder}: manifest lists no {name}")
    for name, info in files.items():
        path = folder / name
        if not path.is_file():
            raise CorruptCacheError(f"{folder}: {name} is listed in the manifest but missing")
        size = path.stat().st_size
        if size != info["size"]:
            raise CorruptCacheError(f"{path}: expected {info['size']} bytes (manifest), found {size}: truncated")
        level = verify if verify != "sample" or "sample" in info else "full"  # older manifests: full hash
        if level == "sample" and sample_digest(path) != info["sample"]:
            raise CorruptCacheError(f"{path}: sampled blocks differ from the manifest's hash: altered")
        if level == "full":
            actual = sha256_file(path)
            if actual != info["sha256"]:
                raise CorruptCacheError(f"{path}: sha256 {actual[:16]}... differs from the manifest's")
    return dict(manifest)


# Conversion -----------------------------------------------------------------------------------------------
def _require_gguf_libraries() -> None:
    import importlib.util

    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise GGUFError(
            f"loading a .gguf file needs the packages {missing}; install them with "
            "`pip install 'mechscope[gguf]'` (or `pip install gguf accelerate`)"
        )


def _convert(source: Path, target: Path, dtype: str) -> None:
    """Dequantise `source` with transformers and save a clean model folder into `target` (not atomic)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": source.name, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), **kwargs)
        loaded: Any = AutoModelForCausalLM.from_pretrained(str(source.parent), dtype=torch.float32, **kwargs)
    except Exception as exc:  # transformers raises many types for unreadable or unsupported files
        raise GGUFError(
            f"transformers could not read {str(source)!r} as a GGUF model: {type(exc).__name__}: {exc}"
        ) from exc
    state = loaded.state_dict()
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config and weights.
    config_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config = AutoConfig.for_model(**config_dict)
    config.dtype = getattr(torch, dtype)
    del loaded
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = clean.load_state_dict({k: v.to(getattr(torch, dtype)) for k, v in state.items()}, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise GGUFError(
            f"{source.name}: weights do not match the {config.model_type} layout "
            f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    if tied:
        clean.tie_weights()
    clean.save_pretrained(str(target), safe_serialization=True)
    tokenizer.save_pretrained(str(target))


def gguf_to_folder(
    path: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "float32",
    cache_dir: str | os.PathLike[str] | None = None,
    verify: Verify = "sample",
    rebuild: bool = False,
) -> GGUFConversion:
    """A verified HF model folder converted from the GGUF file at `path` (built once, then reused).

    Args:
        path: a ``.gguf`` file.
        dtype: the dtype the dequantised weights are stored in (part of the cache key).
        cache_dir: cache root (default: ``$MECHSCOPE_CACHE/gguf`` or ``~/.cache/mechscope/gguf``).
        verify: how a cached folder is checked before reuse (``"sample"``, ``"full"`` or ``"size"``;
            see :func:`verify_cached`).
        rebuild: convert again even when a valid cached folder exists.
    """
    start = time.perf_counter()
    dtype_name = _dtype_name(dtype)
    source = Path(path).expanduser()
    if not source.is_file():
        raise ModelNotFoundError(f"expected a .gguf file at {str(source)!r}; nothing is there")
    with open(source, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{str(source)!r} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    digest = file_digest(source, root)
    folder = _entry_folder(root, digest, dtype_name)
    with _conversion_lock(root, folder.name):  # one converter per entry; the others wait, then reuse its folder
        return _convert_or_reuse(source, folder, root, digest, dtype_name, verify, rebuild, start)


def _entry_folder(root: Path, digest: str, dtype_name: str) -> Path:
    """The cache folder of one GGUF file (by its sha256) converted to one dtype."""
    return root / f"{digest[:20]}-{dtype_name}"


def find_cached(
    path: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "float32",
    cache_dir: str | os.PathLike[str] | None = None,
    verify: Verify = "sample",
) -> Path | None:
    """The verified cache folder of the GGUF file at `path` in `dtype`, or None; converts nothing."""
    source = Path(path).expanduser()
    root = cache_root(cache_dir)
    if not source.is_file() or not root.is_dir():
        return None
    folder = _entry_folder(root, file_digest(source, root), _dtype_name(dtype))
    if not folder.exists():
        return None
    try:
        verify_cached(folder, verify)
    except CorruptCacheError:
        return None  # gguf_to_folder rebuilds it, saying so
    return folder


@contextlib.contextmanager
def _conversion_lock(root: Path, name: str) -> Iterator[None]:
    """An exclusive advisory lock (``flock``) per cache entry, across processes. Without it, a second process
    finishing the same conversion could delete the folder the first had just made (and others were reading)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): conversions still write-then-rename, unlocked
        yield
        return
    with open(root / f"{name}.lock", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _convert_or_reuse(
    source: Path,
    folder: Path,
    root: Path,
    digest: str,
    dtype_name: str,
    verify: Verify,
    rebuild: bool,
    start: float,
) -> GGUFConversion:
    corrupt = False
    if folder.exists() and not rebuild:
        try:
            verify_cached(folder, verify)
            return GGUFConversion(folder, source, digest, dtype_name, True, False, time.perf_counter() - start)
        except CorruptCacheError as exc:
            logger.warning("discarding a damaged GGUF cache entry and rebuilding it: %s", exc)
            corrupt = True
    _require_gguf_libraries()
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=root))
    try:
        _convert(source, tmp, dtype_name)
        import transformers

        write_manifest(
            tmp,
            {
                "source_sha256": digest,
                "source_name": source.name,
                "source_size": source.stat().st_size,
                "dtype": dtype_name,
                "transformers_version": transformers.__version__,
            },
        )
        give_default_mode(tmp)
        _fsync_path(tmp)
        if folder.exists():
            _discard(folder)
        try:
            tmp.rename(folder)
        except OSError:
            # Another process finished the same conversion first: use theirs if it verifies.
            verify_cached(folder, verify)
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return GGUFConversion(folder, source, digest, dtype_name, False, corrupt, time.perf_counter() - start)


def clear_cache(cache_dir: str | os.PathLike[str] | None = None) -> int:
    """Delete every converted model (and the hash index) under the cache root; returns how many."""
    root = cache_root(cache_dir)
    if not root.is_dir():
        return 0
    count = 0
    for child in root.iterdir():
        if child.is_dir():
            _discard(child)
            count += 1
    (root / INDEX).unlink(missing_ok=True)
    for lock in root.glob("*.lock"):
        lock.unlink(missing_ok=True)
    return count


__all__ = [
    "CACHE_ENV",
    "CorruptCacheError",
    "GGUFConversion",
    "GGUFError",
    "cache_root",
    "clear_cache",
    "file_digest",
    "find_cached",
    "gguf_to_folder",
    "sample_digest",
    "verify_cached",
]
