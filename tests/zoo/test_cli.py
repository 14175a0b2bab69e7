"""``mechscope zoo`` subcommands on tiny inputs."""

from __future__ import annotations

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
