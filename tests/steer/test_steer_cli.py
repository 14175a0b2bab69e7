"""`mechscope steer ...` and `mechscope eval ...` end to end on the bundled organism."""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from typer.testing import CliRunner

from mechscope.cli.main import app
from mechscope.data.tasks import refusal

runner = CliRunner()

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_vector_generate_and_eval(tmp_path) -> None:
    vec = tmp_path / "sentiment.safetensors"
    out = _ok(["steer", "vector", "organism-gpt2", "--contrast", "sentiment", "--layers", "3", "-o", str(vec)])
    assert "mean_difference" in out and vec.is_file()
    prompt = "Review of the film: I was delighted. Overall, it was"
    out = _ok(["steer", "generate", "organism-gpt2", "--vector", str(vec), "-p", prompt, "--coefficient", "0.7"])
    assert "before ' great" in out and "after  ' awful" in out
    result, figure = tmp_path / "eval.safetensors", tmp_path / "eval.html"
    args = ["eval", "run", "organism-gpt2", "--task", "sentiment", "--vector", str(vec), "--coefficient", "0.7"]
    out = _ok([*args, "--side-tasks", "none", "-o", str(result), "--figure", str(figure)])
    assert "| `flip_rate` | target |" in out and "kl_neutral" in out
    assert figure.read_text().count("<html") == 1
    assert "| `flip_rate` | target |" in _ok(["eval", "show", str(result)])
    bad = runner.invoke(app, ["steer", "generate", "organism-llama", "--vector", str(vec), "-p", prompt])
    assert bad.exit_code == 2 and "made on model" in bad.output


def test_direction_orthogonalize_and_ablate(tmp_path) -> None:
    direction, folder = tmp_path / "refusal.safetensors", tmp_path / "ortho"
    args = ["steer", "direction", "organism-gpt2", "--contrast", "refusal", "--organism-retain"]
    out = _ok([*args, "--max-ablation-score", "-2.2", "--max-rank", "4", "-o", str(direction)])
    assert re.search(r"chosen (layer \d, position -\d|subspace of rank [2-4]: layer \d, position -\d)", out), out
    _ok(["steer", "orthogonalize", "organism-gpt2", "--direction", str(direction), "-o", str(folder)])
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()  # plain transformers
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        rates = refusal.evaluate(model, tok, refusal.generate(0))
    assert rates["refusal_forbidden"] <= 0.10 and rates["refusal_benign"] == 0.0
    out = _ok(["steer", "ablate", "organism-gpt2", "-s", "blocks.3.hook_mlp_out", "-p", "User: hi", "--method", "zero"])
    assert "before" in out and "after" in out
    bad = runner.invoke(
        app, ["steer", "ablate", "organism-gpt2", "-s", "blocks.0.hook_resid_pre", "-p", "x", "--heads", "1"]
    )
    assert bad.exit_code == 2 and "no head axis" in bad.output


def test_ablate_at_the_last_position_acts_on_every_prompts_own_last_token() -> None:
    # Prompts of different lengths: position -1 is each prompt's last token, and the shown predictions are
    # each prompt's next token (a right-padded batch put both on padding for the shorter prompt).
    prompts = ["User: hi", "User: tell me a long story about the sea and the ships on it"]
    args = ["steer", "ablate", "organism-gpt2", "-s", "blocks.3.hook_mlp_out", "--method", "zero"]
    out = _ok([*args, "--positions", "-1", *[x for p in prompts for x in ("-p", p)]])
    shown = re.findall(r"^\s+(before|after)\s+(.*)$", out, flags=re.M)
    assert [k for k, _ in shown] == ["before", "after"] * 2, out
    assert shown[0][1] != shown[1][1] and shown[2][1] != shown[3][1], out  # both prompts changed
    # the first prompt's "before" is what it predicts alone
    alone = _ok([*args, "-p", prompts[0]])
    assert re.findall(r"^\s+before\s+(.*)$", alone, flags=re.M)[0] == shown[0][1]


def test_vector_takes_kind_and_still_reads_the_deprecated_site(tmp_path) -> None:
    from mechscope.steer import SteeringVector

    base = ["steer", "vector", "organism-gpt2", "--contrast", "sentiment", "--layers", "1", "--n-prompts", "8"]
    new, old = tmp_path / "new.safetensors", tmp_path / "old.safetensors"
    _ok([*base, "--kind", "hook_resid_post", "-o", str(new)])
    out = runner.invoke(app, [*base, "--site", "hook_resid_post", "-o", str(old)])
    assert out.exit_code == 0 and "--site is deprecated; use --kind" in out.output
    a, b = SteeringVector.load(new), SteeringVector.load(old)
    assert a.site == b.site == "hook_resid_post" and torch.equal(a.directions, b.directions)
