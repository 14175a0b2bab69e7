"""Natural-English sources that any machine of ours can fetch from Debian, and their text extractors.

Each source is a Debian package fetched with ``apt-get download`` and unpacked with ``dpkg -x`` (no
installation, no root needed beyond apt's cache), plus a function that turns the unpacked files into
plain-text documents. Licences were checked against each package's ``copyright`` file (see
docs/zoo.md); GPL-licensed text (the GCIDE dictionary) is deliberately excluded so that the trained
weights stay free of copyleft questions.
"""

from __future__ import annotations

import gzip
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mechscope.errors import ConfigError, ModelNotFoundError
from mechscope.io import read_text


@dataclass(frozen=True)
class Source:
    """A Debian package of text, its licence, and how to read documents out of it."""

    name: str
    package: str
    licence: str
    extract: Callable[[Path], Iterator[str]]


def _wordnet(root: Path) -> Iterator[str]:
    """One document per synset: ``"lemma, lemma: gloss"`` from WordNet's data files."""
    for pos in ("noun", "verb", "adj", "adv"):
        path = root / "usr/share/wordnet" / f"data.{pos}"
        for line in path.read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or " | " not in line:
                continue  # licence header lines start with two spaces
            head, gloss = line.split(" | ", 1)
            fields = head.split()
            n_words = int(fields[3], 16)
            lemmas = [fields[4 + 2 * i].replace("_", " ") for i in range(n_words)]
            lemmas = [re.sub(r"\(.*\)$", "", w) for w in lemmas]
            yield f"{', '.join(lemmas)}: {gloss.strip()}"


def _fortunes(root: Path) -> Iterator[str]:
    """One document per fortune cookie."""
    folder = root / "usr/share/games/fortunes"
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix == "":  # skip the .dat indexes and .u8 duplicates
            yield from path.read_text(encoding="latin-1").split("\n%\n")


def _jargon(root: Path) -> Iterator[str]:
    """One document per paragraph of the Jargon File."""
    with gzip.open(root / "usr/share/doc/jargon-text/jargon.txt.gz", "rt", encoding="utf-8", errors="replace") as f:
        yield from f.read().split("\n\n")


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source("wordnet", "wordnet-base", "WordNet 3.0 licence (permissive, BSD-like)", _wordnet),
        Source("fortunes", "fortunes-min", "BSD-3-Clause", _fortunes),
        Source("jargon", "jargon-text", "public domain", _jargon),
    )
}


def local_documents(folder: Path) -> Iterator[str]:
    """Paragraphs (blank-line separated) of every ``*.txt`` file under `folder`, in sorted order."""
    if not folder.is_dir():
        raise ModelNotFoundError(f"expected a folder of *.txt files; got {str(folder)!r}, which is not a folder")
    files = sorted(folder.rglob("*.txt"))
    if not files:
        raise ModelNotFoundError(f"expected *.txt files under {folder}, found none")
    for path in files:
        yield from read_text(path, "UTF-8 text").split("\n\n")  # a non-UTF-8 file is an error, not mojibake


def fetch_debian(packages: list[str], dest: Path) -> dict[str, str]:
    """Download and unpack `packages` into ``dest/root``; returns {package: version}.

    Runs ``apt-get update`` once if a download fails (fresh containers have no package lists).
    """
    debs = dest / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        cmd = ["apt-get", "download", *missing]
        if subprocess.run(cmd, cwd=debs, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True, check=False)
            done = subprocess.run(cmd, cwd=debs, capture_output=True, text=True)
            if done.returncode != 0:
                raise ConfigError(
                    f"expected `apt-get download {' '.join(missing)}` to succeed, got: "
                    f"{done.stderr.strip()[-500:]} (offline? pass --text-dir with local .txt files instead)"
                )
    versions: dict[str, str] = {}
    for package in packages:
        deb = sorted(debs.glob(f"{package}_*.deb"))[-1]
        subprocess.run(["dpkg", "-x", str(deb), str(dest / "root")], check=True)
        versions[package] = subprocess.run(
            ["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True
        ).stdout.strip()
    return versions
