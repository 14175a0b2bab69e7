"""Probes: definitions on synthetic features, decoding of a planted token feature, control tasks, errors."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import ConfigError, ShapeError, SiteError
from mechscope.locate.probes import (
    PROBE_KINDS,
    ProbeConfig,
    ProbeResult,
    collect_features,
    control_labels,
    cross_validate,
    fit_probe,
    train_probes,
)
from mechscope.locate.results import Result
from mechscope.model.hooked import HookedModel
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def gaussian(n: int = 200, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    y = torch.arange(n) % 2
    x = torch.randn(n, d, generator=gen) * 0.3 + 3.0 * (2 * y[:, None] - 1) * direction + 5.0
    return x, y, direction


@pytest.mark.parametrize("kind", PROBE_KINDS)
def test_a_separable_task_is_solved_along_the_true_direction(kind):
    x, y, direction = gaussian()
    probe = fit_probe(x, y, ProbeConfig(kind=kind))
    assert probe.accuracy(x, y) == 1.0
    cosine = torch.nn.functional.cosine_similarity(probe.weight, direction, dim=0)
    assert cosine > 0.9
    assert cross_validate(x, y, ProbeConfig(kind=kind, folds=4)) == [1.0] * 4


def test_mass_mean_probe_is_the_difference_of_means_with_a_midpoint_threshold():
    x, y, _ = gaussian()
    probe = fit_probe(x, y, ProbeConfig(kind="mass_mean"))
    mu1, mu0 = x[y == 1].mean(0), x[y == 0].mean(0)
    torch.testing.assert_close(probe.weight, mu1 - mu0)
    assert float(probe.scores(((mu1 + mu0) / 2)[None])) == pytest.approx(0.0, abs=1e-4)


def test_control_labels_are_a_function_of_the_type():
    y = torch.tensor([0, 1] * 50)
    types = [i % 7 for i in range(100)]
    ctrl = control_labels(y, types, seed=3)
    for t in range(7):
        assert len({int(ctrl[i]) for i in range(100) if types[i] == t}) == 1
    assert set(ctrl.tolist()) == {0, 1}
    assert torch.equal(ctrl, control_labels(y, types, seed=3))


@pytest.fixture(scope="module")
def model():
    return HookedModel(tiny_model("llama", with_tokenizer=False)[0])


def planted(n: int = 160, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random sequences whose *first* token is from one of two token sets: the label."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(40, 100, (n, 6), generator=gen)
    y = torch.arange(n) % 2
    x[:, 0] = torch.where(y == 1, torch.randint(4, 12, (n,), generator=gen), torch.randint(20, 28, (n,), generator=gen))
    return x, y


def test_a_planted_token_feature_is_decoded_and_selective(model, tmp_path):
    x, y = planted()
    result = train_probes(model, x, y, position=0, config=ProbeConfig(folds=3))
    d = model.dims
    assert result["test_accuracy"].shape == (d.n_layers,)
    assert result["test_accuracy"].max() >= 0.95 and result["cv_accuracy"].max() >= 0.95
    # the control task (a random label per example) cannot generalise: selectivity is large
    assert result["control_accuracy"].max() < 0.8
    assert (result["selectivity"] > 0.2).all()
    layer = result.best_layer()
    direction = result.direction(layer)
    assert direction.shape == (d.d_model,) and float(direction.norm()) == pytest.approx(1.0)
    meta = result.direction_metadata(layer)
    assert meta["site"] == f"blocks.{layer}.hook_resid_post" and meta["position"] == 0
    loaded = Result.load(result.save(tmp_path / "probe.safetensors"))
    assert isinstance(loaded, ProbeResult)
    torch.testing.assert_close(loaded.direction(layer), direction)
    assert loaded.plot() is not None
    # the direction separates the classes: class 1 projects higher than class 0
    feats = collect_features(model, x, layers=[layer], position=0)[0]
    proj = feats @ direction
    assert proj[y == 1].mean() > proj[y == 0].mean()


def test_explicit_test_set_and_unlearnable_labels(model):
    x, y = planted(seed=1)
    x_test, y_test = planted(n=60, seed=2)
    good = train_probes(model, x, y, position=0, test_inputs=x_test, test_labels=y_test, config=ProbeConfig(folds=0))
    assert good["test_accuracy"].max() >= 0.95 and "cv_accuracy" not in good.tensors
    noise = torch.randint(0, 2, (160,), generator=torch.Generator().manual_seed(9))
    bad = train_probes(model, x, noise, position=-1, config=ProbeConfig(folds=0, control=False))
    assert bad["test_accuracy"].max() < 0.8


def test_positions_count_from_each_rows_end(model):
    x, _ = planted(n=8)
    last = collect_features(model, x, layers=[1])
    minus_one = collect_features(model, x, layers=[1], position=-1)
    explicit = collect_features(model, x, layers=[1], position=[5] * 8)
    torch.testing.assert_close(last, minus_one)
    torch.testing.assert_close(last, explicit)


def test_bad_input_is_rejected(model):
    x, y = planted(n=40)
    with pytest.raises(ShapeError, match="one label per example"):
        train_probes(model, x, y[:-1])
    with pytest.raises(ShapeError):
        train_probes(model, x, y[:, None].expand(40, 2))
    with pytest.raises(ConfigError, match="exactly 2 values"):
        train_probes(model, x, torch.arange(40) % 3)
    with pytest.raises(SiteError):
        train_probes(model, x, y, kind="hook_resid_middle")
    with pytest.raises(ConfigError, match="together"):
        train_probes(model, x, y, test_inputs=x)
    with pytest.raises(ShapeError, match="outside"):
        collect_features(model, x, position=9)
    with pytest.raises(ShapeError, match="labels must be one per example"):
        fit_probe(torch.randn(10, 4), torch.zeros(9))
    with pytest.raises(ConfigError, match="both classes"):
        fit_probe(torch.randn(10, 4), torch.zeros(10))
    with pytest.raises(ConfigError):
        ProbeConfig(kind="svm")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        ProbeConfig(folds=1)
    result = train_probes(model, x, y, position=0, layers=[1], config=ProbeConfig(folds=0, control=False))
    with pytest.raises(ConfigError, match="probed layers"):
        result.direction(0)


def test_cli_probe_on_a_jsonl_file(tmp_path):
    import json

    from typer.testing import CliRunner

    from mechscope.cli.main import app

    hf, tok = tiny_model("gpt2")
    folder = tmp_path / "gpt2"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    rows = [
        {"text": f"The cat sat {i}" if i % 2 else f"A dog ran {i}", "label": "cat" if i % 2 else "dog"}
        for i in range(40)
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out_file = tmp_path / "probe.st"
    runner = CliRunner()
    out = runner.invoke(
        app,
        ["locate", "probe", str(folder), "--data", str(data), "--position", "0", "--folds", "2", "-o", str(out_file)],
    )
    assert out.exit_code == 0, out.output
    assert "selectivity" in out.output and "blocks.1.hook_resid_post" in out.output
    assert isinstance(Result.load(out_file), ProbeResult)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x"}))
    out = runner.invoke(app, ["locate", "probe", str(folder), "--data", str(bad)])
    assert out.exit_code != 0 and "label" in out.output
