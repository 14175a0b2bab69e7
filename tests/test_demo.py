"""`mechscope demo` end to end: it writes a self-contained report with the Locate/Steer/Improve figures."""

from __future__ import annotations

import json

import pytest

from mechscope.demo import run_demo
from tiny_models import tiny_model


@pytest.mark.slow
def test_demo_writes_report_and_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    hf, tok = tiny_model("gpt2", n_positions=64)
    folder = tmp_path / "model"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    lines: list[str] = []
    report = run_demo(str(folder), tmp_path / "out", echo=lines.append)
    page = report.read_text()
    assert page.startswith("<!doctype html>") and "Induction score per head" in page
    assert "cdn.plot.ly" not in page.split("<script")[0]  # plotly.js is inlined: the page opens offline
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics) >= {"none", "top induction heads", "control heads"}
    assert metrics["none"]["first_half_kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert any(line.startswith("Locate:") for line in lines) and any(line.startswith("Improve:") for line in lines)
