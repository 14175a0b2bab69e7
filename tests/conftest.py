"""Shared test set-up: offline Hugging Face, deterministic torch, tiny models on the import path."""

from __future__ import annotations

import os

# Before transformers is imported anywhere: tests never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

_TESTS = Path(__file__).resolve().parent
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))



@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tiny_models import tiny_tokenizer as make

    return make()
