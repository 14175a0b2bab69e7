"""One CLI convention (issue 21, item 8): answer/wrong flags everywhere (old names deprecated), results in one
output folder unless named, raw and normalised effects printed alike, token text in cell labels, logit-lens
top tokens, figures sharing one plotly.js."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from mechscope.cli.cells import cell_label
from mechscope.cli.common import output_path
from mechscope.cli.main import app
from mechscope.report.html import write_figure
from mechscope.results import Result
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")
runner = CliRunner()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    hf, tok = tiny_model("gpt2")
    path = tmp_path_factory.mktemp("model") / "gpt2"
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _ok(args: list[str]) -> str:
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    return out.output


def test_answer_and_wrong_in_dla_and_ig_with_the_old_names_deprecated(folder, tmp_path) -> None:
    base = ["locate", "dla", str(folder), "-p", "the dog sat on the", "--by", "layer"]
    new = _ok([*base, "--answer", " dog", "--wrong", " the", "-o", str(tmp_path / "new.st")])
    old = runner.invoke(app, [*base, "--target", " dog", "--baseline", " the", "-o", str(tmp_path / "old.st")])
    assert old.exit_code == 0 and "--target is deprecated; use --answer" in old.output
    assert "deprecated" not in new
    torch.testing.assert_close(Result.load(tmp_path / "new.st")["logit"], Result.load(tmp_path / "old.st")["logit"])
    ig = ["locate", "ig", str(folder), "-p", "the dog sat on the", "--steps", "4"]
    assert "f(x) - f(baseline)" in _ok([*ig, "--answer", " dog", "--wrong", " the", "-o", str(tmp_path / "i.st")])
    both = runner.invoke(app, [*ig, "--answer", " dog", "--target", " dog"])
    assert both.exit_code != 0 and "not both" in both.output


def test_patch_family_prints_raw_and_normalised_effects_with_token_labels(folder, tmp_path) -> None:
    pair = ["-c", "the dog sat on the", "-x", "the the sat on the", "-a", " dog", "-w", " the"]
    outputs = {
        cmd: _ok(["locate", cmd, str(folder), *pair, *extra, "-o", str(tmp_path / f"{cmd}.st")])
        for cmd, extra in (("patch", ["--kind", "heads", "--per-position"]), ("path-patch", []), ("atp", []))
    }
    for text in outputs.values():
        assert "raw change" in text and "normalised = raw / (clean - corrupt)" in text
    assert '@ " dog"' in outputs["patch"]  # the token at the cell's position
    result = Result.load(tmp_path / "patch.st")
    gap = float(result["clean"]) - float(result["corrupt"])
    raw = result["metric"] - result["corrupt"]
    top = raw.flatten().abs().argmax()
    line = next(ln for ln in outputs["patch"].splitlines() if ln.startswith("L") and "@" in ln)
    value, norm = (float(x) for x in line.split()[-2:])
    assert value == pytest.approx(float(raw.flatten()[top]), abs=1e-4)
    assert norm == pytest.approx(float(raw.flatten()[top]) / gap, abs=1e-3)


def test_cell_labels() -> None:
    tokens = ["<s>", "When", " Mary", " and"]
    assert cell_label(("layer", "head", "pos"), ("3", "H1", "2"), tokens) == 'L3 H1 @ " Mary"'
    assert cell_label(("layer", "pos"), ("0", "9"), tokens) == "L0 @ pos 9"
    assert cell_label(("sender",), ("L0H1+L0H2",)) == "L0H1+L0H2"


def test_logit_lens_prints_the_top_tokens_at_each_prompts_last_token(folder, tmp_path) -> None:
    prompts = ["the dog sat on the", "a cat"]  # different lengths: padded
    out = _ok(["locate", "logit-lens", str(folder), "-p", prompts[0], "-p", prompts[1], "-o", str(tmp_path / "l.st")])
    result = Result.load(tmp_path / "l.st")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    for b, prompt in enumerate(prompts):
        last = int(torch.nonzero(result["attention_mask"][b]).max())
        block = out.split(f"at the last token of {prompt!r}:")[1].splitlines()
        final = next(ln for ln in block if ln.strip().startswith("final"))
        expected = tok.decode([int(result["top_tokens"][-1, b, last, 0])])
        assert final.split("final", 1)[1].strip().startswith(f'"{expected}"')


def test_results_go_to_one_folder_and_are_never_replaced(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MECHSCOPE_OUT", str(tmp_path / "out"))
    first = output_path(None, "patch.safetensors")
    first.write_text("x")
    second = output_path(None, "patch.safetensors")
    assert first == tmp_path / "out" / "patch.safetensors" and second == tmp_path / "out" / "patch-1.safetensors"
    named = tmp_path / "mine.safetensors"
    assert output_path(named, "patch.safetensors") == named


def test_figures_share_one_plotly_bundle(tmp_path) -> None:
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=["a"], y=[1]))
    a = write_figure(fig, tmp_path / "figs" / "a.html")
    bundle = tmp_path / "figs" / "plotly.min.js"
    stamp = bundle.stat().st_mtime_ns
    b = write_figure(fig, tmp_path / "figs" / "b.html")
    assert bundle.stat().st_mtime_ns == stamp  # written once per folder
    for page in (a, b):
        text = page.read_text()
        assert 'src="plotly.min.js"' in text and len(text) < 50_000
    inline = write_figure(fig, tmp_path / "inline.html", plotlyjs="inline")
    assert inline.stat().st_size > 1_000_000 and not (tmp_path / "plotly.min.js").exists()
