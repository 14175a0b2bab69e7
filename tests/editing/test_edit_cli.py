"""``mechscope edit``: stats, rome and revert on a saved tiny model, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from edit_helpers import tiny
from typer.testing import CliRunner

from mechscope.cli.edit import edit_app

pytestmark = pytest.mark.usefixtures("single_thread")


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_cli_rome_then_revert_restores_the_model_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    model = tiny("gpt2")
    original = tmp_path / "original"
    model.hf_model.save_pretrained(original)
    model.tokenizer.save_pretrained(original)
    runner = CliRunner()
    text = tmp_path / "text.txt"
    text.write_text("The capital of France is Paris.\nA cat sat on the mat.\n" * 40)
    out = runner.invoke(
        edit_app, ["stats", str(original), "-l", "0", "--n-tokens", "300", "--seq-len", "16", "--text-file", str(text)]
    )
    assert out.exit_code == 0, out.output
    assert "layer 0: E[kk^T] (128, 128)" in out.output
    args = [
        "rome",
        str(original),
        "--prompt",
        "The capital of {}",
        "--subject",
        "France",
        "--target",
        " Rome",
        "--layer",
        "0",
        "--stats-tokens",
        "400",
        "--record",
        str(tmp_path / "edit.safetensors"),
        "--save-model",
        str(tmp_path / "edited"),
    ]
    out = runner.invoke(edit_app, args)
    assert out.exit_code == 0, out.output
    assert "efficacy" in out.output and "ROME edit of layer 0" in out.output
    edited = _weights(tmp_path / "edited")
    assert not torch.equal(
        edited["transformer.h.0.mlp.c_proj.weight"], _weights(original)["transformer.h.0.mlp.c_proj.weight"]
    )
    out = runner.invoke(
        edit_app,
        ["revert", str(tmp_path / "edited"), str(tmp_path / "edit.safetensors"), "--out", str(tmp_path / "restored")],
    )
    assert out.exit_code == 0, out.output
    assert "restored 1 parameter(s) bit for bit" in out.output
    restored, before = _weights(tmp_path / "restored"), _weights(original)
    assert restored.keys() == before.keys() and all(torch.equal(restored[k], before[k]) for k in before)


def test_cli_errors_are_clear(tmp_path):
    model = tiny("gpt2")
    folder = tmp_path / "m"
    model.hf_model.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    runner = CliRunner()
    out = runner.invoke(
        edit_app, ["rome", str(folder), "--prompt", "The capital of France", "--subject", "Spain", "--target", " Rome"]
    )
    assert out.exit_code == 2 and "'Spain' is not in the prompt" in out.output
    bad = tmp_path / "requests.json"
    bad.write_text(json.dumps({"prompt": "x"}))
    out = runner.invoke(edit_app, ["memit", str(folder), "--requests", str(bad)])
    assert out.exit_code == 2 and "JSON list" in out.output
