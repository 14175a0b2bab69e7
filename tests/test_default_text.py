"""Default text per model (issue 21, item 4): the organisms' own text on an organism, English on every other
model, for key statistics, SAE training and the tuned lens when the user gives no text."""

from __future__ import annotations

import pytest

from mechscope.data.corpus import default_stream, default_texts, english_texts, has_organism_vocabulary, zoo_texts
from mechscope.model.hooked import HookedModel
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def test_real_and_tiny_models_get_english_organisms_get_their_text() -> None:
    from mechscope.model.loading import load_model

    tiny = HookedModel(*tiny_model("llama"))
    assert not has_organism_vocabulary(tiny) and default_stream(tiny) == "english"
    assert default_texts(tiny) == english_texts("train", 0)
    train, held = english_texts("train"), english_texts("eval")
    assert len(train) > 200 and len(held) > 30 and not set(train) & set(held)  # held out by module
    assert all(len(t) >= 200 for t in train[:50])
    organism = load_model("organism-gpt2")
    assert has_organism_vocabulary(organism) and default_texts(organism, "eval") == zoo_texts("eval", 0)


def test_sae_and_tuned_lens_commands_default_to_the_models_text(tmp_path) -> None:
    from typer.testing import CliRunner

    from mechscope.cli.features import _texts
    from mechscope.cli.main import app

    hf, tok = tiny_model("llama")
    tiny = HookedModel(hf, tok)
    assert _texts(None, tiny) == english_texts("train", 0)
    folder = tmp_path / "m"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    args = ["locate", "tuned-lens-train", str(folder), "--steps", "1", "--seq-len", "8", "--max-windows", "2"]
    out = CliRunner().invoke(app, [*args, "--batch-tokens", "8", "-o", str(tmp_path / "lens.safetensors")])
    assert out.exit_code == 0, out.output  # trained on English docstrings: no organism vocabulary needed
