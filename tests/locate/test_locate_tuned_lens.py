"""Tuned lens: identity translators are the logit lens; training lowers KL; files round-trip."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import ConfigError, ShapeError
from mechscope.locate.lens import logit_lens
from mechscope.locate.results import Result
from mechscope.locate.tuned_lens import (
    LensComparison,
    TunedLens,
    TunedLensConfig,
    TunedLensResult,
    compare_lenses,
    token_windows,
    train_tuned_lens,
    tuned_lens,
)
from mechscope.model.hooked import HookedModel
from tiny_models import BOS, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def tokens(seed: int = 1, n: int = 2) -> torch.Tensor:
    return torch.randint(4, 100, (n, 7), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma2"])
def model(request):
    hf, tok = tiny_model(request.param)
    return HookedModel(hf, tok)


def test_identity_translators_give_the_logit_lens_exactly(model):
    lens = TunedLens.for_model(model)
    tuned = tuned_lens(model, tokens(), lens, keep_logits=True)
    plain = logit_lens(model, tokens(), keep_logits=True)
    torch.testing.assert_close(tuned["logits"], plain["logits"], rtol=0, atol=0)
    torch.testing.assert_close(tuned["kl"], plain["kl"], rtol=0, atol=0)
    assert isinstance(tuned, TunedLensResult) and tuned.method == "tuned_lens"
    comparison = compare_lenses(model, tokens(), lens)
    torch.testing.assert_close(comparison["tuned_lens_kl"], comparison["logit_lens_kl"], rtol=0, atol=0)


def test_the_bos_the_tokenizer_adds_is_neither_trained_on_nor_compared(model):
    # The tiny tokenizer prepends <bos> (as Gemma's does): text windows start with it, and neither the
    # training's sampled positions nor the comparison's means include it (Gemma's BOS residual is an outlier).
    texts = ["The cat sat on the mat and looked at the dog."] * 12
    windows = token_windows(model, texts, seq_len=8, max_windows=6)
    assert bool((windows[:, 0] == BOS).all())
    lens = train_tuned_lens(model, texts, config=TunedLensConfig(steps=2, seq_len=8, max_windows=6, batch_tokens=16))
    log = lens.training_log
    assert log["validation"]["windows"] == 1  # the last window is held out, its BOS not counted either
    assert log["n_tokens"] + log["validation"]["n_tokens"] == windows.numel() - windows.shape[0]
    comparison = compare_lenses(model, windows, lens)
    assert comparison.config["n_tokens"] == windows.numel() - windows.shape[0]
    plain = compare_lenses(model, windows[:, 1:], lens)  # the same text tokens, read without the BOS first
    assert plain.config["n_tokens"] == comparison.config["n_tokens"]


def test_training_lowers_kl_and_step_zero_is_the_logit_lens(model, tmp_path):
    data = tokens(seed=2, n=16)
    lens = train_tuned_lens(model, data, config=TunedLensConfig(steps=40, lr=3e-3, batch_tokens=64))
    log = lens.training_log
    assert log["loss_last"] < log["loss_first"]
    held_out = compare_lenses(model, tokens(seed=3, n=4), lens)
    assert held_out["tuned_lens_kl"][0] < held_out["logit_lens_kl"][0]
    assert held_out["tuned_lens_kl"][-1] == 0  # the final residual is read untranslated
    # step 0 loss is the logit lens's mean KL on the training tokens
    first = logit_lens(model, data)["kl"][:-1].mean()
    assert log["loss_first"] == pytest.approx(float(first), rel=0.2)
    path = lens.save(tmp_path / "lens.safetensors")
    loaded = TunedLens.load(path)
    a = tuned_lens(model, tokens(), lens, keep_logits=True)["logits"]
    b = tuned_lens(model, tokens(), loaded, keep_logits=True)["logits"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert loaded.training_log == log and loaded.model_fingerprint == model.fingerprint()
    saved = Result.load(held_out.save(tmp_path / "cmp.safetensors"))
    assert isinstance(saved, LensComparison) and len(saved.plot().data) == 2


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_held_out_windows_restore_the_translators_training_made_worse(family):
    # Training windows of low token ids, held-out ones of high ids, a large learning rate: some translators
    # fit the training windows and read the held-out ones worse than the logit lens. With validation those
    # layers keep the identity (the logit lens exactly); the others keep what training made of them.
    hf, tok = tiny_model(family)
    model = HookedModel(hf, tok)
    gen = torch.Generator().manual_seed(2)
    data = torch.cat([torch.randint(4, 30, (14, 7), generator=gen), torch.randint(60, 100, (2, 7), generator=gen)])
    settings = {"steps": 20, "lr": 0.05, "batch_tokens": 32}
    unchecked = train_tuned_lens(model, data[:14], config=TunedLensConfig(**settings, validation_fraction=0))
    checked = train_tuned_lens(model, data, config=TunedLensConfig(**settings))  # holds out the last 2 of 16
    assert "validation" not in unchecked.training_log
    log = checked.training_log["validation"]
    worse = compare_lenses(model, data[14:], unchecked)
    delta = worse["tuned_lens_kl"] - worse["logit_lens_kl"]
    made_worse = [layer for layer in range(model.dims.n_layers) if delta[layer] > 0]
    assert made_worse and log["kept_before"] == made_worse and log["windows"] == 2
    kept = compare_lenses(model, data[14:], checked)
    torch.testing.assert_close(kept["tuned_lens_kl"] - kept["logit_lens_kl"], delta.clamp(max=0))
    torch.testing.assert_close(torch.tensor(log["kl_trained"]), worse["tuned_lens_kl"][:-1], atol=1e-5, rtol=1e-5)


def test_text_streams_are_cut_into_windows(model):
    windows = token_windows(model, ["The cat sat on the mat."] * 10, seq_len=5, max_windows=4)
    assert windows.shape == (4, 5) and windows.dtype == torch.long
    with pytest.raises(ConfigError, match="need at least"):
        token_windows(model, ["a"], seq_len=50)


def test_bad_input_is_rejected(model, tmp_path):
    other = TunedLens(model.dims.d_model + 1, model.dims.n_layers)
    with pytest.raises(ShapeError, match="d_model"):
        tuned_lens(model, tokens(), other)
    lens = TunedLens.for_model(model)
    with pytest.raises(ConfigError, match="layer"):
        lens(torch.zeros(1, model.dims.d_model), model.dims.n_layers + 1)
    with pytest.raises(ShapeError):
        lens(torch.zeros(1, model.dims.d_model + 2), 0)
    with pytest.raises(ShapeError, match="integer tensor"):
        train_tuned_lens(model, torch.zeros(2, 3), config=TunedLensConfig(steps=1))
    logit_lens(model, tokens()).save(tmp_path / "not_a_lens.safetensors")
    with pytest.raises(ConfigError, match="tuned_lens"):
        TunedLens.load(tmp_path / "not_a_lens.safetensors")
    with pytest.raises(ConfigError):
        TunedLensConfig(steps=0)
    with pytest.raises(ConfigError):
        TunedLensConfig(lr=0)
    with pytest.raises(ConfigError, match="validation_fraction"):
        TunedLensConfig(validation_fraction=1.0)


def test_cli_logit_lens_train_and_read_a_tuned_lens(tmp_path):
    from typer.testing import CliRunner

    from mechscope.cli.main import app

    hf, tok = tiny_model("gpt2")
    folder = tmp_path / "gpt2"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    runner = CliRunner()
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(["The cat sat on the mat and looked at the dog."] * 40))
    out = runner.invoke(app, ["locate", "logit-lens", str(folder), "-p", "The cat sat", "-o", str(tmp_path / "ll.st")])
    assert out.exit_code == 0, out.output
    assert "final" in out.output and Result.load(tmp_path / "ll.st").method == "logit_lens"
    args = ["locate", "tuned-lens-train", str(folder), "--text-file", str(texts), "--steps", "5", "--seq-len", "8"]
    out = runner.invoke(app, [*args, "--batch-tokens", "32", "-o", str(tmp_path / "lens.st")])
    assert out.exit_code == 0, out.output
    assert "tuned-lens KL" in out.output
    out = runner.invoke(
        app,
        [
            "locate",
            "tuned-lens",
            str(folder),
            "--lens",
            str(tmp_path / "lens.st"),
            "-p",
            "The cat",
            "-o",
            str(tmp_path / "tl.st"),
        ],
    )
    assert out.exit_code == 0, out.output
    assert isinstance(Result.load(tmp_path / "tl.st"), TunedLensResult)
    out = runner.invoke(app, ["locate", "tuned-lens", str(folder), "--lens", str(tmp_path / "ll.st"), "-p", "x"])
    assert out.exit_code == 2 and "tuned_lens" in out.output


def test_cli_tuned_lens_commands_never_overwrite_a_file_the_user_did_not_name(tmp_path, monkeypatch):
    """With default flags, tuned-lens-train and tuned-lens both wrote ./tuned_lens.safetensors: reading
    prompts through a freshly trained lens replaced the lens. Unnamed outputs now never replace a file."""
    from typer.testing import CliRunner

    from mechscope.cli.main import app
    from mechscope.locate.tuned_lens import TunedLens

    hf, tok = tiny_model("gpt2")
    folder = tmp_path / "gpt2"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(["The cat sat on the mat and looked at the dog."] * 40))
    work, out_dir = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MECHSCOPE_OUT", str(out_dir))
    precious = work / "tuned_lens.safetensors"  # the old shared default name, holding the user's file
    precious.write_bytes(b"user data")
    runner = CliRunner()
    train = ["locate", "tuned-lens-train", str(folder), "--text-file", str(texts), "--steps", "3", "--seq-len", "8"]
    for _ in range(2):
        out = runner.invoke(app, [*train, "--batch-tokens", "16"])
        assert out.exit_code == 0, out.output
    lenses = sorted(out_dir.glob("tuned_lens_translators*.safetensors"))
    assert [p.name for p in lenses] == ["tuned_lens_translators-1.safetensors", "tuned_lens_translators.safetensors"]
    before = {p: p.read_bytes() for p in lenses}
    for _ in range(2):
        out = runner.invoke(app, ["locate", "tuned-lens", str(folder), "--lens", str(lenses[1]), "-p", "The cat"])
        assert out.exit_code == 0, out.output
    assert {p: p.read_bytes() for p in lenses} == before  # the trained lenses are intact
    assert len(list(out_dir.glob("tuned_lens_readout*.safetensors"))) == 2
    assert precious.read_bytes() == b"user data" and sorted(p.name for p in work.iterdir()) == [precious.name]
    TunedLens.load(lenses[1])
