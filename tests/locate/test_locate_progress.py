"""Progress bars: off in library calls unless asked, on in the CLI, off with --quiet; ACDC refuses up
front (with an estimate) when one forward per edge would take too long."""

from __future__ import annotations

import pytest
import torch

from mechscope.model.hooked import HookedModel
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    return HookedModel(*tiny_model("llama"))


def _pair() -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.randint(4, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    corrupt = clean.clone()
    corrupt[:, 2] = (corrupt[:, 2] + 7) % 96 + 4
    return clean, corrupt


def _metric(logits: torch.Tensor) -> torch.Tensor:
    from mechscope.metrics import logit_diff

    return logit_diff(logits, 5, 7)


def test_library_calls_are_silent_unless_asked(model, capsys):
    from mechscope.locate.attribution import IGConfig, integrated_gradients, logit_metric
    from mechscope.locate.attribution_patching import AtPConfig, attribution_patch
    from mechscope.locate.causal_tracing import TracingConfig, causal_trace
    from mechscope.locate.heads import HeadDetectorConfig, detect_heads
    from mechscope.locate.patching import activation_patch
    from mechscope.locate.path_patching import path_patch
    from mechscope.locate.tuned_lens import TunedLens, compare_lenses

    clean, corrupt = _pair()
    calls = {
        "patching": lambda **kw: activation_patch(model, clean, corrupt, "heads", _metric, **kw),
        "path patching": lambda **kw: path_patch(model, clean, corrupt, _metric, **kw),
        "GradDrop": lambda **kw: attribution_patch(model, clean, corrupt, _metric, AtPConfig(grad_drop=True), **kw),
        "IG": lambda **kw: integrated_gradients(model, clean, logit_metric(5, 7), config=IGConfig(steps=4), **kw),
        "copying": lambda **kw: detect_heads(model, config=HeadDetectorConfig(n_sequences=2, half_len=4), **kw),
        "lens comparison": lambda **kw: compare_lenses(model, clean, TunedLens.for_model(model), **kw),
        "causal": lambda **kw: causal_trace(model, clean[0], [1, 2], config=TracingConfig(samples=2), **kw),
    }
    for name, call in calls.items():
        call()
        assert capsys.readouterr().err == "", name
        call(progress=True)
        assert name.lower() in capsys.readouterr().err.lower(), name


def test_cli_shows_bars_unless_quiet(tmp_path):
    from typer.testing import CliRunner

    from mechscope.cli.main import app

    hf, tok = tiny_model("llama")
    folder = tmp_path / "model"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    pair = ["-c", "the dog sat on the", "-x", "the Mary sat on the", "-a", " the", "-w", " a"]
    commands = {
        "patching": ["locate", "patch", str(folder), *pair, "--kind", "heads"],
        "path patching": ["locate", "path-patch", str(folder), *pair],
        "copying scores": ["locate", "heads", str(folder)],
        "causal tracing": ["locate", "trace", str(folder), "-p", "the dog sat on the", "-s", "dog", "--samples", "2"],
    }
    runner = CliRunner()
    for bar, args in commands.items():
        loud = runner.invoke(app, args)
        assert loud.exit_code == 0, loud.output
        assert bar in loud.stderr, (bar, loud.stderr)
        quiet = runner.invoke(app, [*args, "--quiet"])
        assert quiet.exit_code == 0, quiet.output
        assert bar not in quiet.stderr, (bar, quiet.stderr)


def test_acdc_refuses_up_front_with_an_estimate(model):
    from mechscope.locate.circuits import acdc
    from mechscope.locate.circuits.acdc import TooSlowError
    from mechscope.locate.circuits.graph import Graph

    clean, corrupt = _pair()
    n_edges = Graph.from_model(model).n_edges
    with pytest.raises(TooSlowError, match=rf"up to {n_edges} edges.*about .* \(limit max_seconds=1e-09\).*EAP"):
        acdc(model, clean, corrupt, threshold=0.01, max_seconds=1e-9)
    circuit = acdc(model, clean, corrupt, threshold=0.01)  # the default limit (an hour) lets a tiny model run
    assert 0 < circuit.config["estimated_seconds"] < 3600
