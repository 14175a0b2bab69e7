"""`mechscope diff BASE TUNED` on tiny model folders: a planted head is reported first; bad input fails cleanly."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from mechscope.cli.main import app
from mechscope.improve.diffing import DiffResult
from mechscope.model.hooked import HookedModel
from mechscope.steer.finetune import FinetuneConfig, finetune
from tiny_models import tiny_model

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("diff_cli")
    hf, tok = tiny_model("gpt2")
    hf.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    tuned = HookedModel(hf, tok)
    record = finetune(tuned, [("A cat sat on the", " dog")], FinetuneConfig(components=("blocks.1.mlp",), steps=5))
    hf.save_pretrained(root / "tuned")
    tok.save_pretrained(root / "tuned")
    record.revert(tuned)
    record.save(root / "edit.safetensors")
    return root


def test_diff_command_reports_the_changed_component(folders, tmp_path) -> None:
    out_file, figure = tmp_path / "d.safetensors", tmp_path / "d.html"
    args = ["diff", str(folders / "base"), str(folders / "tuned"), "-t", "A cat sat on the mat", "-t", "The quick fox"]
    result = runner.invoke(app, [*args, "-o", str(out_file), "--figure", str(figure), "--top", "3"])
    assert result.exit_code == 0, result.output
    assert "- weights: `blocks.1.mlp`" in result.output and "- causal: `blocks.1.mlp`" in result.output
    assert "lens of the difference" in result.output
    loaded = DiffResult.load(out_file)
    assert loaded.rank_of("blocks.1.mlp", "local") == 1
    assert figure.read_text().count("<html") == 1
    via_edit = runner.invoke(
        app,
        [
            "diff",
            str(folders / "base"),
            "--edit",
            str(folders / "edit.safetensors"),
            "--no-causal",
            "-o",
            str(tmp_path / "e.safetensors"),
        ],
    )
    assert via_edit.exit_code == 0, via_edit.output
    assert "- weights: `blocks.1.mlp`" in via_edit.output and "causal" not in via_edit.output.split("lens")[0]
    assert torch.allclose(DiffResult.load(tmp_path / "e.safetensors")["weight_rel"], loaded["weight_rel"])


def test_diff_command_bad_input(folders, tmp_path) -> None:
    both = runner.invoke(app, ["diff", str(folders / "base"), str(folders / "tuned"), "--edit", "x.safetensors"])
    assert both.exit_code == 2 and "not both" in both.output
    other = tmp_path / "llama"
    hf, tok = tiny_model("llama")
    hf.save_pretrained(other)
    tok.save_pretrained(other)
    mismatch = runner.invoke(app, ["diff", str(folders / "base"), str(other)])
    assert mismatch.exit_code == 2 and "model_type: 'gpt2' vs 'llama'" in mismatch.output
    short = runner.invoke(app, ["diff", str(folders / "base"), str(folders / "tuned"), "-t", "a"])
    assert short.exit_code == 2 and "too short" in short.output
    lens = runner.invoke(app, ["diff", str(folders / "base"), str(folders / "tuned"), "--lens-read", "first"])
    assert lens.exit_code == 2 and "lens_read must be 'all' or 'last'" in lens.output
