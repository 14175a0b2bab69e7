"""The training corpus: cleaned, deduplicated natural English plus the planted-task text, with a manifest.

Layout of a corpus folder (a build output, never committed)::

    natural/train.jsonl  natural/val.jsonl      {"text": ..., "source": ...} per line
    planted/<task>.jsonl                        training split of each planted text task
    manifest.json                               sources, licences, sizes, sha256 of every file

The natural text is capped (default 4 MB) because CPU training time, not data, is the constraint.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mechscope.errors import ConfigError, ModelNotFoundError
from mechscope.model.sources.checksums import sha256_file

SCHEMA_VERSION = 2  # 2: planted records may carry an "unscored" character span
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class CorpusOptions:
    """How to build a corpus. ``text_dir`` replaces the Debian sources (offline builds, tests)."""

    out: Path
    seed: int = 0
    max_chars_per_source: int = 2_000_000
    val_fraction: float = 0.02
    min_chars: int = 20
    text_dir: Path | None = None
    sources: tuple[str, ...] = ("wordnet", "fortunes", "jargon")

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"expected 0 < val_fraction < 0.5, got {self.val_fraction}")


_SPACE = re.compile(r"\s+")
_TYPOGRAPHY = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-"})


def clean(text: str, min_chars: int = 20) -> str | None:
    """`text` normalised to one line of mostly-ASCII prose, or None when it is not worth keeping."""
    text = unicodedata.normalize("NFKC", text).translate(_TYPOGRAPHY)
    text = _SPACE.sub(" ", text).strip()
    if len(text) < min_chars:
        return None
    letters = sum(c.isalpha() for c in text)
    ascii_chars = sum(c.isascii() for c in text)
    if letters < 0.6 * len(text) or ascii_chars < 0.98 * len(text):
        return None
    return text


def dedupe_key(text: str) -> str:
    """Documents equal up to case, punctuation and spacing share a key."""
    return hashlib.sha1(re.sub(r"[^a-z0-9]+", "", text.lower()).encode()).hexdigest()


def clean_documents(docs: Iterable[str], min_chars: int, seen: set[str]) -> list[str]:
    """Cleaned documents not already in `seen` (which is updated)."""
    out: list[str] = []
    for doc in docs:
        text = clean(doc, min_chars)
        if text is None:
            continue
        key = dedupe_key(text)
        if key not in seen:
            seen.add(key)
            out.append(text)
    return out


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl_texts(path: Path) -> list[str]:
    """The ``text`` field of every line of a corpus JSONL file."""
    return [record["text"] for record in read_jsonl_records(path)]


def read_jsonl_records(path: Path) -> list[dict]:
    """Every line of a corpus JSONL file as a dict (``text``, ``source``, optional ``unscored``)."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _cap(docs: list[str], max_chars: int) -> list[str]:
    out, total = [], 0
    for doc in docs:
        if total + len(doc) > max_chars:
            break
        out.append(doc)
        total += len(doc)
    return out


def _natural(opts: CorpusOptions) -> tuple[list[dict], list[dict]]:
    """(document rows, source records) of the natural text."""
    from mechscope.zoo import sources

    seen: set[str] = set()
    rng = random.Random(f"corpus:{opts.seed}")
    rows: list[dict] = []
    records: list[dict] = []
    if opts.text_dir is not None:
        docs = clean_documents(sources.local_documents(Path(opts.text_dir)), opts.min_chars, seen)
        rng.shuffle(docs)
        docs = _cap(docs, opts.max_chars_per_source)
        rows += [{"text": d, "source": "local"} for d in docs]
        records.append({"name": "local", "path": str(opts.text_dir), "documents": len(docs)})
        return rows, records
    unknown = [s for s in opts.sources if s not in sources.SOURCES]
    if unknown:
        raise ConfigError(f"unknown corpus sources {unknown}; valid: {sorted(sources.SOURCES)}")
    chosen = [sources.SOURCES[s] for s in opts.sources]
    fetch_dir = opts.out.parent / "debian"
    versions = sources.fetch_debian([s.package for s in chosen], fetch_dir)
    for src in chosen:
        docs = clean_documents(src.extract(fetch_dir / "root"), opts.min_chars, seen)
        rng.shuffle(docs)
        kept = _cap(docs, opts.max_chars_per_source)
        rows += [{"text": d, "source": src.name} for d in kept]
        records.append(
            {
                "name": src.name,
                "package": src.package,
                "version": versions[src.package],
                "licence": src.licence,
                "documents_available": len(docs),
                "documents": len(kept),
                "chars": sum(len(d) for d in kept),
            }
        )
    return rows, records


def build_corpus(opts: CorpusOptions) -> dict:
    """Build the corpus folder described by `opts` and return its manifest."""
    from mechscope.data.tasks import DEDICATED_TEXT_TASKS, TEXT_TASKS, generate_all

    out = Path(opts.out)
    rows, records = _natural(opts)
    if not rows:
        raise ConfigError("expected some natural text after cleaning, got none")
    rng = random.Random(f"split:{opts.seed}")
    rng.shuffle(rows)
    n_val = max(1, int(len(rows) * opts.val_fraction))
    _write_jsonl(out / "natural/val.jsonl", rows[:n_val])
    _write_jsonl(out / "natural/train.jsonl", rows[n_val:])
    for name, data in generate_all(opts.seed, (*TEXT_TASKS, *DEDICATED_TEXT_TASKS)).items():
        _write_jsonl(out / f"planted/{name}.jsonl", data.train_records())
    files = {}
    for path in sorted(out.rglob("*.jsonl")):
        texts = read_jsonl_texts(path)
        files[str(path.relative_to(out))] = {
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
            "documents": len(texts),
            "chars": sum(len(t) for t in texts),
        }
    manifest = {"schema_version": SCHEMA_VERSION, "seed": opts.seed, "sources": records, "files": files}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify_corpus(folder: Path) -> dict:
    """The manifest of `folder` after checking every file's sha256 against it."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ModelNotFoundError(f"expected a corpus manifest at {path}; build one with `mechscope zoo corpus`")
    manifest = json.loads(path.read_text())
    for name, info in manifest["files"].items():
        actual = sha256_file(Path(folder) / name)
        if actual != info["sha256"]:
            raise ConfigError(f"corpus file {name}: expected sha256 {info['sha256']}, got {actual}")
    return manifest
