"""Fixtures of the zoo tests: offline environment, a tiny text folder, a tiny corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the hill.",
    "A small boat drifted down the river past the old mill and the quiet village green.",
    "Every evening the baker closes the shop, counts the coins and walks home in the rain.",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the hill.",  # duplicate
    "ok",  # too short
    "Libraries keep books, maps and letters so that people can read about the past.",
]


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("text")
    (folder / "a.txt").write_text("\n\n".join(PARAGRAPHS[:3]) * 1)
    (folder / "b.txt").write_text("\n\n".join(PARAGRAPHS[3:] * 40))
    return folder


@pytest.fixture(scope="session")
def tiny_corpus(text_dir, tmp_path_factory) -> Path:
    from mechscope.zoo.corpus import CorpusOptions, build_corpus

    out = tmp_path_factory.mktemp("corpus") / "corpus"
    build_corpus(CorpusOptions(out=out, text_dir=text_dir, val_fraction=0.2))
    return out
