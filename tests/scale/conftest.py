"""Fixtures shared by the scale tests."""

from __future__ import annotations

import pytest

from tiny_models import tiny_model


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny random Llama saved as a folder, as the torchrun jobs load it (one per test module)."""
    hf, tok = tiny_model("llama")
    folder = tmp_path_factory.mktemp("model")
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
