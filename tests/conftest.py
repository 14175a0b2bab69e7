"""Shared test set-up: offline Hugging Face, tiny models on the import path, one torch thread."""

from __future__ import annotations

import os

# Before transformers is imported anywhere: tests never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# CLI commands run without -o write into $MECHSCOPE_OUT: keep them out of the working tree.
# The process that makes the folder removes it when it exits (subprocesses the tests start inherit it).
if "MECHSCOPE_OUT" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["MECHSCOPE_OUT"] = tempfile.mkdtemp(prefix="mechscope-out-")
    atexit.register(shutil.rmtree, os.environ["MECHSCOPE_OUT"], ignore_errors=True)

import sys
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine threads that
    wait on each other make them 10-100x slower; tests of tiny models run on one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_gpt2_folder(tmp_path_factory):
    """A tiny random GPT-2 and its tokenizer saved as a model folder (what CLI commands load)."""
    from tiny_models import tiny_model

    hf, tok = tiny_model("gpt2")
    path = tmp_path_factory.mktemp("gpt2")
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return path
