"""ACDC meets the damage bound it was given; faithfulness and its curve have the right endpoints;
circuits round-trip through JSON and draw as a self-contained HTML graph."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.errors import ConfigError
from mechscope.locate.circuits import (
    ACDCConfig,
    Circuit,
    Graph,
    GraphError,
    acdc,
    eap,
    faithfulness,
    faithfulness_curve,
    load_circuit_json,
    save_circuit_json,
    write_circuit_html,
)
from mechscope.locate.circuits.faithfulness import CircuitEvaluator
from mechscope.locate.metrics import logit_diff
from mechscope.locate.results import Result
from mechscope.model.hooked import HookedModel
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def pair(batch: int = 3, pos: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(4, 100, (batch, pos), generator=gen)
    corrupt = torch.randint(4, 100, (batch, pos), generator=gen)
    return clean, corrupt


def metric(logits: torch.Tensor) -> torch.Tensor:
    return logit_diff(logits, [5, 6, 9], [7, 8, 10])


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma3_text"])
def model(request):
    return HookedModel(tiny_model(request.param, with_tokenizer=False)[0])


@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
def test_acdc_circuit_meets_the_requested_bound(model, ablation):
    clean, corrupt = pair()
    bound = 0.02
    circuit = acdc(model, clean, corrupt, threshold=0.005, max_damage=bound, ablation=ablation)
    graph = Graph.from_model(model)
    assert 0 < circuit.n_edges < graph.n_edges  # it pruned, and it kept what mattered
    damage = CircuitEvaluator(model, clean, corrupt, None, ablation=ablation).damage(circuit.mask)
    assert damage <= bound + 1e-6
    assert damage == pytest.approx(circuit.config["damage"], abs=1e-6)


def test_acdc_with_a_metric_meets_the_metric_bound(model):
    clean, corrupt = pair()
    circuit = acdc(model, clean, corrupt, metric, threshold=0.01, max_damage=0.05)
    result = faithfulness(model, circuit, clean, corrupt, metric)
    assert abs(float(result["circuit"]) - float(result["full"])) <= 0.05 + 1e-5


def test_acdc_removes_everything_when_ablation_changes_nothing(model):
    clean, _ = pair()
    circuit = acdc(model, clean, clean, threshold=1e-6)
    assert circuit.n_edges == 0


def test_acdc_config_is_validated():
    with pytest.raises(ConfigError, match="threshold must be >= 0"):
        ACDCConfig(threshold=-1.0)
    with pytest.raises(ConfigError, match="ablation must be one of"):
        ACDCConfig(threshold=0.1, ablation="gauss")


def test_faithfulness_endpoints_and_curve(model):
    clean, corrupt = pair()
    graph = Graph.from_model(model)
    full = Circuit.from_mask(graph, torch.ones(graph.n_edges, dtype=torch.bool))
    empty = Circuit.from_mask(graph, torch.zeros(graph.n_edges, dtype=torch.bool))
    assert faithfulness(model, full, clean, corrupt, metric).value == pytest.approx(1.0, abs=1e-5)
    assert faithfulness(model, empty, clean, corrupt, metric).value == pytest.approx(0.0, abs=1e-5)
    scores = eap(model, clean, corrupt, metric)
    curve = faithfulness_curve(model, scores, clean, corrupt, metric, sizes=[0, 3, graph.n_edges])
    assert curve["faithfulness"][0] == pytest.approx(0.0, abs=1e-5)
    assert curve["faithfulness"][-1] == pytest.approx(1.0, abs=1e-5)
    assert len(curve.plot().data) == 1
    with pytest.raises(ConfigError, match="sizes must lie"):
        faithfulness_curve(model, scores, clean, corrupt, metric, sizes=[graph.n_edges + 1])


def test_circuit_json_round_trip_and_figure(model, tmp_path):
    clean, corrupt = pair()
    circuit = eap(model, clean, corrupt, metric).top(6)
    path = save_circuit_json(circuit, tmp_path / "c.json")
    data = json.loads(path.read_text())
    assert data["format"] == "mechscope.circuit" and len(data["edges"]) == 6
    back = load_circuit_json(path)
    assert back.edges == circuit.edges
    torch.testing.assert_close(back["scores"][back.mask], circuit["scores"][circuit.mask])
    loaded = Result.load(circuit.save(tmp_path / "c.safetensors"))
    assert isinstance(loaded, Circuit) and loaded.edges == circuit.edges
    html = write_circuit_html(circuit, tmp_path / "c.html").read_text()
    assert "plotly" in html and circuit.edges[0].split("->")[1] in html
    data["edges"][0]["from"] = "a7.h0"
    path.write_text(json.dumps(data))
    with pytest.raises(GraphError, match="unknown upstream node 'a7"):
        load_circuit_json(path)
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ConfigError, match=r"mechscope\.circuit"):
        load_circuit_json(path)


def test_cli_commands_score_prune_export_and_evaluate(tmp_path):
    from typer.testing import CliRunner

    from mechscope.cli.main import app
    from tiny_models import tiny_model as build

    hf, tok = build("gpt2")
    folder = tmp_path / "model"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    row = {"clean": "the dog sat on the", "corrupt": "the the sat on the", "correct": " dog", "incorrect": " the"}
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(row) for _ in range(2)))
    runner = CliRunner()
    out = runner.invoke(
        app,
        [
            "locate",
            "eap-ig",
            str(folder),
            "-d",
            str(data),
            "--top",
            "5",
            "--batch-size",
            "1",
            "--json",
            str(tmp_path / "c.json"),
        ],
    )
    assert out.exit_code == 0, out.output
    assert "edges scored" in out.output and load_circuit_json(tmp_path / "c.json").n_edges == 5
    out = runner.invoke(
        app, ["locate", "circuit-faithfulness", str(folder), "-d", str(data), "--circuit", str(tmp_path / "c.json")]
    )
    assert out.exit_code == 0, out.output
    assert "faithfulness" in out.output
    out = runner.invoke(
        app, ["locate", "acdc", str(folder), "-d", str(data), "--threshold", "0.01", "--html", str(tmp_path / "c.html")]
    )
    assert out.exit_code == 0, out.output
    assert (tmp_path / "c.html").is_file()
    data.write_text(json.dumps({"clean": "the dog"}))
    out = runner.invoke(app, ["locate", "eap", str(folder), "-d", str(data)])
    assert out.exit_code == 2 and "expected an object with string fields" in out.output
