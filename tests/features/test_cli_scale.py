"""The command line at scale: collect a store, train from it with a checkpoint, write a dashboard, export
to SAELens's format and evaluate the exported folder."""

from __future__ import annotations

import pytest
from store_cases import TEXTS
from typer.testing import CliRunner

from mechscope.cli.main import app
from mechscope.features import ActivationStore, SparseAutoencoder, load_sae
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")
SITE = "blocks.0.hook_resid_post"


def test_collect_train_dashboard_export_and_eval_from_the_command_line(tmp_path):
    hf, tok = tiny_model("llama")
    model = tmp_path / "model"
    hf.save_pretrained(model)
    tok.save_pretrained(model)
    text = tmp_path / "texts.txt"
    text.write_text("\n".join(TEXTS))
    run = CliRunner().invoke
    store = tmp_path / "store"
    args = ["features", "collect", str(model), "-s", SITE, "-o", str(store), "--text", str(text)]
    result = run(app, [*args, "--seq-len", "16", "--rows-per-shard", "8", "--max-tokens", "0", "--dtype", "fp16"])
    assert result.exit_code == 0 and "bytes/token" in result.output, result.output
    assert ActivationStore(store).complete and ActivationStore(store).dtype == "fp16"
    sae = tmp_path / "sae.safetensors"
    train = ["features", "train-store", str(store), "-s", SITE, "-o", str(sae), "--d-sae", "64", "--k", "4"]
    result = run(app, [*train, "--steps", "40", "--batch-size", "64", "--checkpoint", str(tmp_path / "ck")])
    assert result.exit_code == 0 and "explained_variance" in result.output, result.output
    loaded = SparseAutoencoder.load(sae)
    assert loaded.config.site == SITE and loaded.model_info == ActivationStore(store).manifest.model
    page = tmp_path / "d.html"
    dash = ["features", "dashboard", str(model), str(sae), "-o", str(page), "-f", "0", "-f", "5"]
    result = run(app, [*dash, "--text-file", str(text), "--seq-len", "16"])
    assert result.exit_code == 0 and page.is_file() and "fires on" in page.read_text(), result.output
    folder = tmp_path / "saelens"
    result = run(app, ["features", "export-saelens", str(sae), "-o", str(folder)])
    assert result.exit_code == 0 and (folder / "cfg.json").is_file(), result.output
    assert load_sae(folder).config.site == SITE
    result = run(app, ["features", "eval", str(model), str(folder), "--text-file", str(text), "--seq-len", "16"])
    assert result.exit_code == 0 and "loss_recovered" in result.output, result.output
    result = run(app, ["features", "train-store", str(store), "-s", "blocks.1.hook_resid_post", "-o", str(sae)])
    assert result.exit_code != 0 and "holds sites" in result.output, result.output
