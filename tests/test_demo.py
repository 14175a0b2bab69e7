"""`mechscope demo` end to end: it writes a self-contained report with the Locate/Steer/Improve figures."""

from __future__ import annotations

import json

import pytest

from mechscope.demo import run_demo
from mechscope.errors import ConfigError
from tiny_models import tiny_model


@pytest.fixture
def tiny_folder(tmp_path):
    hf, tok = tiny_model("gpt2", n_positions=64)
    folder = tmp_path / "model"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_demo_on_a_model_without_planted_tasks_runs_the_induction_loop(tmp_path, tiny_folder):
    lines: list[str] = []
    report = run_demo(str(tiny_folder), tmp_path / "out", echo=lines.append)
    page = report.read_text()
    assert page.startswith("<!doctype html>") and "Induction score per head" in page
    assert "cdn.plot.ly" not in page.split("<script")[0]  # plotly.js is inlined: the page opens offline
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["induction"]
    assert set(metrics) >= {"none", "top induction heads", "control heads"}
    assert metrics["none"]["first_half_kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert any(line.startswith("Locate:") for line in lines) and any(line.startswith("Improve:") for line in lines)


def test_demo_refuses_organism_loops_on_other_models_and_unknown_sections(tmp_path, tiny_folder):
    with pytest.raises(ConfigError, match="planted tasks"):
        run_demo(str(tiny_folder), tmp_path / "out", sections=("refusal",))
    with pytest.raises(ConfigError, match="unknown demo sections"):
        run_demo(str(tiny_folder), tmp_path / "out", sections=("nonsense",))
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
def test_demo_on_the_default_organism_closes_the_refusal_and_fact_loops(tmp_path):
    lines: list[str] = []
    report = run_demo(None, tmp_path / "out", echo=lines.append, sections=("refusal", "facts"))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["model"] == "organism-gpt2"
    refusal = metrics["refusal"]
    assert refusal["refusal_forbidden"]["before"] >= 0.95
    assert refusal["refusal_forbidden"]["after"] <= 0.10  # issue 5: <= 10 % after removing the direction
    assert refusal["orthogonalised_max_logit_gap"] < 1e-3
    facts = metrics["facts"]
    assert facts["mean_after"]["efficacy"] >= 0.8 and facts["reverted_exactly"] is True
    # organism-facts: tracing locates the subject's last token, and ROME edits the layer it found
    built = facts["organism_facts"]
    assert built["subject_mlp_peak"]["position_class"] == "last_subject"
    assert built["attn_peak"]["position_class"] == "last" and built["attn_peak"]["layer"] >= 3
    assert built["mean_after"]["efficacy"] >= 0.8 and built["reverted_exactly"] is True
    page = report.read_text()
    assert "Refusal" in page and "ROME" in page


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
def test_demo_features_loop_trains_an_sae_and_ablates_a_feature_locally(tmp_path):
    report = run_demo(None, tmp_path / "out", sections=("features",))
    features = json.loads((tmp_path / "out" / "metrics.json").read_text())["features"]
    assert features["reconstruction"]["explained_variance"] > 0.85  # measured 0.883
    assert features["downstream"]["loss_recovered"] > 0.9  # measured 0.977
    # ablating one feature moves predictions where it fires, far less elsewhere (measured 0.030 vs 0.0005)
    assert features["ablation_kl_where_active"] > 10 * features["ablation_kl_elsewhere"]
    assert "feature cards" in report.read_text()
