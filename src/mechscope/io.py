"""mechscope's one file envelope: tensors (safetensors) + a JSON body + kind + schema version + model.

Every object that saves -- results, artifacts, activation caches, tuned lenses, edit records, statistics
caches, SAEs, feature cards, circuits -- writes the same header through :func:`write_envelope`:

    format          "mechscope.<family>"  (which reader it belongs to: result, artifact, activation_cache...)
    schema_version  the family's layout version (an integer, as text)
    kind            which class inside the family (a result's method, an artifact's kind)
    body            JSON: everything that is not a tensor
    model           JSON: the :class:`ModelInfo` of the model it was made on, or null

and reads it back through :func:`read_envelope`, which performs the one schema check every family shares:
the right format, a version this mechscope knows (older files are migrated step by step by the family's
registered migrations; newer ones get an error naming both versions). Writes are atomic (temporary file,
then rename), so an interrupted save never leaves a file that looks complete; reads turn every way a file
can be unreadable into one clear :class:`ConfigError`. Never pickle.

Files without tensors (circuits, feature cards) may use the JSON form of the same envelope
(:func:`write_json_envelope` / :func:`read_json_envelope`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from mechscope.errors import ConfigError

#: A migration rewrites a raw header (string -> string) of version k into the layout of version k + 1.
Migration = Callable[[dict[str, str]], dict[str, str]]


@dataclass(frozen=True)
class ModelInfo:
    """Which model an object was made on: one spelling of provenance for every file mechscope writes.

    ``fingerprint`` identifies config and weights (:meth:`HookedModel.fingerprint`); the rest is there
    to make mismatch messages readable and to check sizes without loading the model.
    """

    fingerprint: str
    model_type: str = ""
    d_model: int = 0
    n_layers: int = 0
    dtype: str = ""

    @classmethod
    def of(cls, model: Any) -> ModelInfo:
        """The info of a :class:`~mechscope.model.hooked.HookedModel` (duck-typed: the ground floor
        imports nothing above it)."""
        dims = model.dims
        dtype = getattr(model, "dtype", "")
        return cls(
            fingerprint=str(model.fingerprint()),
            model_type=str(dims.model_type),
            d_model=int(dims.d_model),
            n_layers=int(dims.n_layers),
            dtype=str(dtype).removeprefix("torch."),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "file") -> ModelInfo:
        if not isinstance(data, Mapping) or not isinstance(data.get("fingerprint"), str):
            raise ConfigError(f"{where}: model info must be an object with a 'fingerprint' string; got {data!r}")
        known = {k: data[k] for k in ("model_type", "d_model", "n_layers", "dtype") if k in data}
        try:
            return cls(
                fingerprint=data["fingerprint"],
                model_type=str(known.get("model_type", "")),
                d_model=int(known.get("d_model", 0)),
                n_layers=int(known.get("n_layers", 0)),
                dtype=str(known.get("dtype", "")),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: malformed model info {dict(data)!r} ({exc})") from exc


@dataclass(frozen=True)
class FileSchema:
    """A family of files: its format name, current layout version and the migrations from older ones.

    Attributes:
        family: short name; the header's format is ``mechscope.<family>``.
        version: the layout this mechscope writes.
        what: how error messages name such a file ("activation cache").
        migrations: version k -> function turning a version-k header into a version-(k+1) header.
    """

    family: str
    version: int
    what: str
    migrations: Mapping[int, Migration] = field(default_factory=dict)

    @property
    def format(self) -> str:
        return f"mechscope.{self.family}"


#: family -> schema; :func:`register_schema` refuses a second schema for the same family.
_SCHEMAS: dict[str, FileSchema] = {}


def register_schema(schema: FileSchema) -> FileSchema:
    """Register a family's schema (once); returns it for use as a module constant."""
    existing = _SCHEMAS.get(schema.family)
    if existing is not None and existing is not schema:
        raise ConfigError(f"a file schema for family {schema.family!r} is already registered ({existing.what})")
    _SCHEMAS[schema.family] = schema
    return schema


def registered_schemas() -> dict[str, FileSchema]:
    """Every registered family (for tools such as the records store and the viewer)."""
    return dict(_SCHEMAS)


@dataclass
class Envelope:
    """What one file holds: the family's kind, a JSON body, tensors and the model it was made on."""

    kind: str
    body: dict[str, Any]
    tensors: dict[str, Tensor] = field(default_factory=dict)
    model: ModelInfo | None = None
    schema_version: int = 0


# Writing -------------------------------------------------------------------------------------------------
def _header(envelope: Envelope, schema: FileSchema) -> dict[str, str]:
    try:
        body = json.dumps(envelope.body, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the body of a {schema.what} must be JSON-serialisable: {exc}") from exc
    return {
        "format": schema.format,
        "schema_version": str(schema.version),
        "kind": envelope.kind,
        "body": body,
        "model": json.dumps(envelope.model.to_dict() if envelope.model is not None else None),
    }


def write_envelope(path: str | Path, envelope: Envelope, schema: FileSchema) -> Path:
    """Write `envelope` as one safetensors file with the shared header, atomically. Returns the path."""
    return write_safetensors(path, envelope.tensors, _header(envelope, schema))


def write_json_envelope(path: str | Path, envelope: Envelope, schema: FileSchema) -> Path:
    """Write a tensor-free `envelope` as a JSON file with the same header fields, atomically."""
    if envelope.tensors:
        raise ConfigError(f"a JSON {schema.what} holds no tensors; got {sorted(envelope.tensors)}")
    header = _header(envelope, schema)
    data = {
        "format": header["format"],
        "schema_version": schema.version,
        "kind": envelope.kind,
        "model": envelope.model.to_dict() if envelope.model is not None else None,
        "body": envelope.body,
    }
    return write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically (see :func:`write_bytes_atomic`)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


#: torch dtype -> safetensors dtype tag.
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors encoding of `tensors` and `metadata` with every key in sorted order, so the same content
    always gives the same bytes (safetensors' own writer orders metadata differently in every process)."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        if tensor.dtype not in _ST_DTYPES:
            raise ConfigError(f"tensor {name!r} has dtype {tensor.dtype}, which mechscope files cannot store")
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {
            "dtype": _ST_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary handle whose bytes become `path` when the block ends: written to a temporary file in the same
    folder, fsync'd, then renamed, so an interrupted write leaves the old file or the new one, never a mix (an
    exception in the block leaves the old file). One temporary name per writer. The file keeps the mode of the
    one it replaces, else gets the one ``open()`` would give (not mkstemp's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as fh:
        fh.write(data)
    return Path(path)


def give_default_mode(path: str | Path) -> None:
    """Give a file or folder made by ``tempfile`` (mode 0600 / 0700, private) the mode ``open()`` or
    ``mkdir()`` would have: a staged save renamed into place should be as readable as any other file."""
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def _umask() -> int:
    """This process's umask: from /proc on Linux, else by setting it and back (the only portable read)."""
    try:
        found = re.search(r"^Umask:\s*([0-7]+)", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        found = None
    if found:
        return int(found.group(1), 8)
    mask = os.umask(0o077)  # restrictive meanwhile, should another thread create a file in this instant
    os.umask(mask)
    return mask


def write_safetensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> Path:
    """Write `tensors` (moved to CPU, made contiguous) with `metadata` to `path`, atomically and reproducibly."""
    return write_bytes_atomic(path, safetensors_bytes(tensors, metadata))


# Reading -------------------------------------------------------------------------------------------------
#: Rereads of a file that a writer replaced while it was being read (a checkpoint or result being rewritten).
_REREADS = 5


def read_safetensors(path: str | Path, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; `what` names the expected content in errors.

    Writers replace files whole (:func:`write_bytes_atomic`), yet a read racing a replacement can mix the two
    files (seen: safetensors refusing a 27,000-byte checkpoint for the 27,016 bytes its header asked for, while
    a training rewrote it). So metadata and tensors come from one handle, and a file replaced during the read
    is read again.
    """
    path = Path(path)
    for _ in range(_REREADS):
        before = _identity(path, what)
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                tensors = dict(handle.get_tensors())
        except (SafetensorError, OSError, RuntimeError) as exc:
            if _identity(path, what) != before:
                continue
            if isinstance(exc, RuntimeError):
                raise
            raise ConfigError(f"{str(path)!r} is not a readable safetensors file (expected a {what}): {exc}") from exc
        if _identity(path, what) == before:
            return tensors, metadata
    raise ConfigError(f"{str(path)!r} was replaced {_REREADS} times while being read (expected a {what}); try again")


def _identity(path: Path, what: str) -> tuple[int, ...]:
    """What changes when a writer replaces `path`: its inode, size and modification time."""
    try:
        found = path.stat()
    except OSError:
        found = None
    if found is None or not stat.S_ISREG(found.st_mode):
        raise ConfigError(f"no {what} file at {str(path)!r}")
    return found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns


def check_header(header: dict[str, str], schema: FileSchema, where: str) -> dict[str, str]:
    """The one schema check: right format, known version; returns the header migrated to the current version."""
    if header.get("format") != schema.format:
        raise ConfigError(
            f"{where}: not a mechscope {schema.what}: expected format {schema.format!r}; got {header.get('format')!r}"
        )
    raw = header.get("schema_version", "")
    try:
        version = int(raw)
    except ValueError:
        raise ConfigError(f"{where}: schema_version must be an integer; got {raw!r}") from None
    if version > schema.version:
        raise ConfigError(
            f"{where}: schema_version {version} is newer than this mechscope reads ({schema.what} schema version "
            f"{version} > {schema.version}); upgrade mechscope to read it"
        )
    header = dict(header)
    while version < schema.version:
        step = schema.migrations.get(version)
        if step is None:
            raise ConfigError(
                f"{where}: this {schema.what} has schema version {version}; this mechscope reads versions "
                f"{min([schema.version, *schema.migrations])}..{schema.version}"
            )
        try:
            header = step(header)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"{where}: malformed {schema.what} header; cannot upgrade it from schema {version} ({exc})"
            ) from exc
        version += 1
        header["schema_version"] = str(version)
    return header


def _envelope_from_header(header: dict[str, str], tensors: dict[str, Tensor], where: str) -> Envelope:
    try:
        body = json.loads(header.get("body", "{}"))
        model = json.loads(header.get("model", "null"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: malformed JSON in the file header ({exc})") from exc
    if not isinstance(body, dict):
        raise ConfigError(f"{where}: the header's body must be a JSON object; got {type(body).__name__}")
    return Envelope(
        kind=header.get("kind", ""),
        body=body,
        tensors=tensors,
        model=None if model is None else ModelInfo.from_dict(model, where),
        schema_version=int(header["schema_version"]),
    )


def read_envelope(path: str | Path, schema: FileSchema) -> Envelope:
    """Read a file written by :func:`write_envelope` (or an older layout the schema migrates)."""
    tensors, header = read_safetensors(path, schema.what)
    where = str(path)
    return _envelope_from_header(check_header(header, schema, where), tensors, where)


def read_json_envelope(path: str | Path, schema: FileSchema) -> Envelope:
    """Read a file written by :func:`write_json_envelope`."""
    path = Path(path)
    where = str(path)
    data = read_json(path, schema.what)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object ({schema.what}); got {type(data).__name__}")
    header = {
        "format": str(data.get("format")),
        "schema_version": str(data.get("schema_version")),
        "kind": str(data.get("kind", "")),
        "body": json.dumps(data.get("body", {})),
        "model": json.dumps(data.get("model")),
    }
    return _envelope_from_header(check_header(header, schema, where), {}, where)


def read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of `path`, or a :class:`ConfigError` saying what is wrong with which file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{str(path)!r} is a folder; expected a {what} file")
    if not path.is_file():
        raise ConfigError(f"no {what} file at {str(path)!r}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); expected a {what} file"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {str(path)!r} (expected a {what} file): {exc.strerror or exc}") from exc


def read_jsonl(path: str | Path, what: str, *, allow_empty: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSON-lines file; errors name the file and line."""
    rows: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(read_text(path, what).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{str(path)!r}, line {number}: malformed JSON ({exc.msg}); expected a {what}") from exc
        if not isinstance(row, dict):
            raise ConfigError(f"{str(path)!r}, line {number}: expected a JSON object; got {type(row).__name__}")
        rows.append((number, row))
    if not rows and not allow_empty:
        raise ConfigError(f"{str(path)!r} holds no lines; expected a {what} (one JSON object per line)")
    return rows


def read_json(path: str | Path, what: str) -> Any:
    """Parsed JSON of `path`, or a :class:`ConfigError` naming the file (and line) when it is unreadable."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{str(path)!r}, line {exc.lineno}: malformed JSON ({exc.msg}); expected a {what}") from exc


__all__ = [
    "Envelope",
    "FileSchema",
    "Migration",
    "ModelInfo",
    "atomic_file",
    "check_header",
    "give_default_mode",
    "read_envelope",
    "read_json",
    "read_json_envelope",
    "read_jsonl",
    "read_safetensors",
    "read_text",
    "register_schema",
    "registered_schemas",
    "safetensors_bytes",
    "write_bytes_atomic",
    "write_envelope",
    "write_json_envelope",
    "write_safetensors",
    "write_text_atomic",
]
