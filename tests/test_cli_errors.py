"""One error path for every command: foreseeable errors are one paragraph and exit code 2; bugs say so."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mechscope.cli.errors import BUG, USER_ERROR
from mechscope.cli.main import app
from tiny_models import tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def folder(tiny_gpt2_folder):
    return tiny_gpt2_folder


def _clean_failure(result, *needles: str) -> None:
    assert result.exit_code == USER_ERROR, result.output
    assert "Traceback" not in result.output
    assert result.output.count("\n") <= 3, result.output  # one paragraph, not a stack
    for needle in needles:
        assert needle in result.output, result.output


def test_the_zoo_group_reports_its_own_errors_without_a_traceback(tmp_path):
    _clean_failure(runner.invoke(app, ["zoo", "eval", str(tmp_path / "absent")]), "error:", "absent")


def test_bad_input_files_name_the_file_and_line(folder, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a", "label": 0}) + "\n{not json}\n")
    _clean_failure(runner.invoke(app, ["locate", "probe", str(folder), "--data", str(bad)]), "bad.jsonl", "line 2")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9", "label": 1}\n')
    _clean_failure(runner.invoke(app, ["locate", "probe", str(folder), "--data", str(latin)]), "not UTF-8")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    _clean_failure(runner.invoke(app, ["locate", "probe", str(folder), "--data", str(empty)]), "holds no lines")
    _clean_failure(runner.invoke(app, ["locate", "probe", str(folder), "--data", str(tmp_path)]), "is a folder")


def test_an_unexpected_error_shows_its_traceback_and_says_it_is_a_bug(folder, monkeypatch):
    import mechscope.model.loading as loading

    def broken(*_args, **_kwargs):
        raise RuntimeError("internal failure")

    monkeypatch.setattr(loading, "load_model", broken)
    result = runner.invoke(app, ["info", str(folder)])
    assert result.exit_code == BUG
    assert "Traceback" in result.output and "This is a bug in mechscope" in result.output


def test_help_and_usage_errors_are_click_s_own():
    assert runner.invoke(app, ["--help"]).exit_code == 0
    result = runner.invoke(app, ["info"])  # missing argument
    assert result.exit_code == 2 and "Missing argument" in result.output


def test_zoo_train_never_writes_into_the_package_by_default_and_checks_its_numbers(tmp_path):
    from mechscope.errors import ConfigError
    from mechscope.zoo.train import TrainOptions

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for steps in ("0", "-1"):
        result = runner.invoke(app, ["zoo", "train", "organism-induction", "--steps", steps, "--out", str(tmp_path)])
        assert result.exit_code == USER_ERROR and "Traceback" not in result.output
        assert "steps must be a positive integer" in result.output
    with pytest.raises(ConfigError, match="steps must be a positive integer"):
        TrainOptions(corpus=corpus, run_dir=tmp_path, tokenizer_dir=tmp_path, steps=0)
    with pytest.raises(ConfigError, match="threads must be a positive integer"):
        TrainOptions(corpus=corpus, run_dir=tmp_path, tokenizer_dir=tmp_path, threads=-2)


def test_zoo_corpus_downloads_only_when_asked(tmp_path):
    result = runner.invoke(app, ["zoo", "corpus", "--out", str(tmp_path / "c")])
    assert result.exit_code == USER_ERROR and "--fetch-debian" in result.output
    assert not (tmp_path / "c").exists()


def test_cache_runs_in_batches_and_reads_each_prompt_s_own_last_token(folder, tmp_path):
    import torch

    from mechscope.model.cache import ActivationCache
    from mechscope.model.hooked import HookedModel

    prompts = tmp_path / "prompts.txt"
    texts = ["The cat sat on the mat today", "A dog", "We read a long book slowly"]
    prompts.write_text("\n".join(texts) + "\n\n")
    site = "blocks.1.hook_resid_post"
    outs = []
    for batch in ("1", "32"):
        out = tmp_path / f"b{batch}.safetensors"
        args = ["cache", str(folder), "--prompts-file", str(prompts), "-s", site, "--positions", "-1"]
        result = runner.invoke(app, [*args, "--batch-size", batch, "-o", str(out)])
        assert result.exit_code == 0, result.output
        outs.append(ActivationCache.load(out)[site])
    torch.testing.assert_close(outs[0], outs[1])
    model = HookedModel(*tiny_model("gpt2"))
    for row, text in enumerate(texts):
        _, alone = model.run_with_cache(text, site)
        torch.testing.assert_close(outs[0][row, 0], alone[site][0, -1], atol=1e-5, rtol=1e-5)
    result = runner.invoke(app, ["cache", str(folder), "--batch-size", "0", "-p", "x"])
    assert result.exit_code == USER_ERROR and "--batch-size" in result.output


def test_a_closed_pipe_is_not_reported_as_a_bug():
    """``mechscope ... | head`` may close stdout while a command writes: exit 141 quietly, no 'bug' line."""
    import typer

    from mechscope.cli.errors import ErrorHandlingGroup

    piped = typer.Typer(cls=ErrorHandlingGroup)

    @piped.command()
    def talk() -> None:
        raise BrokenPipeError(32, "Broken pipe")

    @piped.command()
    def other() -> None: ...

    result = runner.invoke(piped, ["talk"])
    assert result.exit_code == 141 and "Traceback" not in result.output and "bug" not in result.output
