"""`mechscope --record <command>` records any command; `mechscope runs ...` lists, shows, compares, exports,
deletes and collects; the demo records its sections and links them from its report."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from mechscope import records
from mechscope.cli.main import app
from tiny_models import tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    hf, tok = tiny_model("gpt2", n_positions=64)
    path = tmp_path_factory.mktemp("model") / "tiny"
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_record_wraps_any_command_and_runs_commands_read_the_store(tmp_path, folder):
    store = tmp_path / "runs"
    lens = ["locate", "logit-lens", str(folder), "-p", "The cat sat", "-o", str(tmp_path / "lens.safetensors")]
    out = runner.invoke(app, ["--record", "--runs", str(store), "--tag", "first", *lens])
    assert out.exit_code == 0, out.output
    out = runner.invoke(
        app, ["--record", "--runs", str(store), "locate", "logit-lens", str(tmp_path / "absent"), "-p", "x"]
    )
    assert out.exit_code == 2
    out = runner.invoke(app, ["--runs", str(store), *lens])  # without --record: nothing recorded
    assert out.exit_code == 0

    with records.open_store(store) as s:
        failed, ok = s.runs()
    assert (ok.name, ok.method, ok.status, set(ok.tags)) == (
        "locate logit-lens",
        "locate logit-lens",
        "finished",
        {"cli", "first"},
    )
    assert ok.config["model"] == str(folder) and ok.config["prompt"] == ["The cat sat"]
    assert [a.method for a in ok.artifacts] == ["logit_lens"]
    (recorded,) = ok.models  # the loaded model notifies the open run
    assert recorded.source == str(folder) and recorded.model_type == "gpt2" and recorded.weights_sha256
    assert failed.status == "failed" and "ModelNotFoundError" in failed.error and "exit code 2" in failed.error

    listed = runner.invoke(app, ["runs", "list", "--runs", str(store)])
    assert listed.exit_code == 0 and ok.id in listed.output and failed.id in listed.output
    assert failed.id not in runner.invoke(app, ["runs", "list", "--runs", str(store), "--status", "finished"]).output
    shown = runner.invoke(app, ["runs", "show", ok.id, "--runs", str(store)])
    assert shown.exit_code == 0 and "logit_lens (result" in shown.output and "versions" in shown.output
    as_json = json.loads(runner.invoke(app, ["runs", "show", ok.id, "--runs", str(store), "--json"]).output)
    assert as_json["id"] == ok.id and as_json["config"]["model"] == str(folder)
    compared = runner.invoke(app, ["runs", "compare", ok.id, failed.id, "--runs", str(store)])
    assert compared.exit_code == 0 and "| differs |" in compared.output and "config.model" in compared.output
    assert runner.invoke(app, ["runs", "compare", ok.id, "--runs", str(store)]).exit_code == 2
    exported = runner.invoke(app, ["runs", "export", "--runs", str(store), "-o", str(tmp_path / "all.json")])
    assert exported.exit_code == 0
    doc = json.loads((tmp_path / "all.json").read_text())
    assert doc["format"] == "mechscope.runs" and {r["id"] for r in doc["runs"]} == {ok.id, failed.id}

    file = store / ok.artifacts[0].relative_path
    assert "kept 1" in runner.invoke(app, ["runs", "gc", "--runs", str(store)]).output and file.exists()
    assert runner.invoke(app, ["runs", "delete", ok.id, "--runs", str(store)]).exit_code == 0
    dry = runner.invoke(app, ["runs", "gc", "--runs", str(store), "--dry-run"])
    assert "would delete 1 file" in dry.output and file.exists()
    assert "deleted 1 file" in runner.invoke(app, ["runs", "gc", "--runs", str(store)]).output and not file.exists()
    before = records.open_store(store).ids()
    listed = runner.invoke(app, ["--record", "--runs", str(store), "runs", "list", "--runs", str(store)])
    assert listed.exit_code == 0 and "is not recorded itself" in listed.output
    assert records.open_store(store).ids() == before
    missing = runner.invoke(app, ["runs", "show", "nope", "--runs", str(store)])
    assert missing.exit_code == 2 and "no run 'nope'" in missing.output


def test_runs_commands_report_a_bad_store_clearly(tmp_path):
    (tmp_path / "runs.sqlite").write_bytes(b"garbage" * 50)
    out = runner.invoke(app, ["runs", "list", "--runs", str(tmp_path)])
    assert out.exit_code == 2 and "not a readable mechscope run database" in out.output
    assert (tmp_path / "runs.sqlite").read_bytes() == b"garbage" * 50


@pytest.mark.slow
def test_the_demo_records_its_sections_and_its_report_links_them(tmp_path, folder):
    from mechscope.demo import run_demo

    report = run_demo(str(folder), tmp_path / "out", runs=tmp_path / "runs")
    (run,) = records.open_store(tmp_path / "runs").runs()
    assert (run.name, run.status, run.seed, run.tags) == ("demo induction", "finished", 0, ("demo", "induction"))
    assert run.models[0].source == str(folder) and run.models[0].weights_sha256
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["induction"]
    assert run.metric("none/first_half_loss") == pytest.approx(metrics["none"]["first_half_loss"])
    assert [a.name for a in run.artifacts] == ["induction figure 1", "induction figure 2"]
    page = report.read_text()
    assert re.search(rf"Recorded as run <a href='http://127.0.0.1:8765/runs/{run.id}'>{run.id}</a>", page)
