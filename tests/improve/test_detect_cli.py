"""`mechscope detect train|calibrate|eval` and `mechscope monitor generate` on a tiny model folder."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mechscope.cli.main import app
from mechscope.improve.detect import DetectionReport, Detector
from mechscope.model.loading import load_model
from mechscope.steer import Direction
from tiny_models import tiny_model

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("single_thread")
SITE = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("detect_cli")
    hf, tok = tiny_model("gpt2")
    hf.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "pos.txt").write_text("The cat sat on the mat.\nA cat looked at the dog.\nThe quick brown fox jumps.\n")
    (root / "neg.txt").write_text(
        "One two three four five.\nHello world! This is a test.\nThe capital of Italy\tis Rome.\n"
    )
    words = ["cat", "dog", "mat", "fox", "park", "book", "store", "world"]
    controls = [f"The {a} and the {b} went home." for a in words for b in words]
    (root / "controls.txt").write_text("\n".join(controls) + "\n")
    return root


def test_train_calibrate_eval_and_monitor(folder, tmp_path):
    model, det = str(folder / "model"), tmp_path / "det.safetensors"
    result = runner.invoke(
        app,
        [
            "detect",
            "train",
            model,
            "-s",
            SITE,
            "--positive",
            str(folder / "pos.txt"),
            "--negative",
            str(folder / "neg.txt"),
            "--pooling",
            "max",
            "--out",
            str(det),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "probe detector on blocks.1.hook_resid_post" in result.output
    result = runner.invoke(
        app, ["detect", "calibrate", model, str(det), "--controls", str(folder / "controls.txt"), "--fpr", "0.05"]
    )
    assert result.exit_code == 0, result.output
    hm = load_model(model)
    loaded = Detector.load(det, hm)
    assert loaded.threshold is not None and loaded.calibration["n_controls"] == 64
    assert loaded.calibration["calibration_fpr"] <= 0.05
    report_path, figure = tmp_path / "r.safetensors", tmp_path / "roc.html"
    result = runner.invoke(
        app,
        [
            "detect",
            "eval",
            model,
            str(det),
            "--positive",
            str(folder / "pos.txt"),
            "--negative",
            str(folder / "neg.txt"),
            "--n-boot",
            "20",
            "--figure",
            str(figure),
            "--out",
            str(report_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "| held_out | 3 / 3 |" in result.output and figure.exists()
    assert DetectionReport.load(report_path).value("auroc") == pytest.approx(1.0)  # fitted on these very examples
    trace = tmp_path / "trace.json"
    result = runner.invoke(
        app,
        [
            "monitor",
            "generate",
            model,
            str(det),
            "-p",
            "The cat sat",
            "-p",
            "Hello world",
            "--threshold",
            "-1e9",
            "--policy",
            "stop",
            "--max-new-tokens",
            "4",
            "--trace",
            str(trace),
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("[STOPPED BY MONITOR]") == 2 and "ALERT at generated token" in result.output
    assert len(json.loads(trace.read_text())["rows"]) == 2
    direction = Direction.from_tensor(hm, torch.ones(hm.dims.d_model))
    direction.save(tmp_path / "dir.safetensors")
    result = runner.invoke(
        app,
        [
            "monitor",
            "generate",
            model,
            str(det),
            "-p",
            "The cat sat",
            "--policy",
            "intervene",
            "--direction",
            str(tmp_path / "dir.safetensors"),
            "--threshold",
            "-1e9",
            "--max-new-tokens",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "policy intervene" in result.output


def test_cli_bad_input_fails_cleanly(folder, tmp_path):
    model = str(folder / "model")
    result = runner.invoke(app, ["detect", "train", model, "-s", "blocks.7.hook_resid_post", "--data", "true_false"])
    assert result.exit_code == 2 and "error:" in result.output
    det = tmp_path / "d.safetensors"
    runner.invoke(
        app,
        [
            "detect",
            "train",
            model,
            "-s",
            SITE,
            "--positive",
            str(folder / "pos.txt"),
            "--negative",
            str(folder / "neg.txt"),
            "--out",
            str(det),
        ],
    )
    result = runner.invoke(app, ["detect", "calibrate", model, str(det), "--data", "dangerous", "--fpr", "0.01"])
    assert result.exit_code == 2 and "needs at least 100 control examples" in result.output
    result = runner.invoke(app, ["monitor", "generate", model, str(det), "-p", "Hi"])
    assert result.exit_code == 2 and "no threshold" in result.output
