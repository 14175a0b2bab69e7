"""``mechscope zoo`` subcommands on tiny inputs."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mechscope.cli.zoo import zoo_app

runner = CliRunner()


def test_list_recipes():
    result = runner.invoke(zoo_app, ["list", "--recipes"])
    assert result.exit_code == 0
    assert "organism-gpt2" in result.output and "organism-llama" in result.output


def test_corpus_from_a_local_text_folder(text_dir, tmp_path):
    out = tmp_path / "corpus"
    result = runner.invoke(zoo_app, ["corpus", "--out", str(out), "--text-dir", str(text_dir)])
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").is_file() and "planted/ioi.jsonl" in result.output


def test_train_refuses_a_missing_corpus(tmp_path):
    result = runner.invoke(zoo_app, ["train", "organism-induction", "--corpus", str(tmp_path / "none")])
    assert result.exit_code != 0
    assert "manifest" in str(result.exception)


def test_eval_of_an_unknown_name_fails_clearly():
    result = runner.invoke(zoo_app, ["eval", "organism-gtp2"])
    assert result.exit_code != 0
    assert "bundled" in str(result.exception)


@pytest.mark.slow
def test_eval_update_records_the_measured_metrics_and_keeps_the_old_ones(tmp_path):
    import json
    import shutil

    from mechscope.model.sources.names import MODELS_DIR
    from mechscope.zoo.loading import write_checksums

    folder = tmp_path / "organism-induction"
    shutil.copytree(MODELS_DIR / "organism-induction", folder)
    record = json.loads((folder / "metrics.json").read_text())
    record["metrics"]["induction_icl_gain"] += 1.0  # a card that no longer matches the weights
    (folder / "metrics.json").write_text(json.dumps(record))
    write_checksums(folder)
    drifted = runner.invoke(zoo_app, ["eval", str(folder)])
    assert drifted.exit_code == 1 and "induction_icl_gain" in drifted.output
    result = runner.invoke(zoo_app, ["eval", str(folder), "--update"])
    assert result.exit_code == 0, result.output
    updated = json.loads((folder / "metrics.json").read_text())
    assert updated["previous_metrics"] == record["metrics"] and updated["training"] == record["training"]
    assert abs(updated["metrics"]["induction_icl_gain"] - record["metrics"]["induction_icl_gain"] + 1.0) <= 0.02
    assert f"{updated['metrics']['induction_icl_gain']:.4f}" in (folder / "MODEL_CARD.md").read_text()
    assert runner.invoke(zoo_app, ["eval", str(folder)]).exit_code == 0
