"""The `mechscope` command: info, cache and their errors (run in-process with typer's runner)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from mechscope.cli.main import app
from mechscope.model.cache import ActivationCache

runner = CliRunner()


@pytest.fixture(scope="module")
def folder(tiny_gpt2_folder):
    return tiny_gpt2_folder


def test_info_lists_sizes_and_sites(folder):
    result = runner.invoke(app, ["info", str(folder)])
    assert result.exit_code == 0, result.output
    assert "family       gpt2" in result.output
    assert "blocks.1.attn.hook_pattern" in result.output and "hook_pos_embed" in result.output


def test_cache_writes_requested_sites(folder, tmp_path):
    out = tmp_path / "acts.safetensors"
    result = runner.invoke(
        app,
        [
            "cache",
            str(folder),
            "-p",
            "The cat sat",
            "-p",
            "A dog ran far",
            "-s",
            "blocks.0.hook_resid_post",
            "-s",
            "blocks.1.attn.hook_pattern",
            "--positions",
            "-1",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    cache = ActivationCache.load(out)
    assert sorted(cache) == ["blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern"]
    assert cache["blocks.0.hook_resid_post"].shape[:2] == (2, 1)
    assert cache.meta["prompts"] == ["The cat sat", "A dog ran far"]


def test_cli_errors_are_clear_and_nonzero(folder, tmp_path):
    result = runner.invoke(app, ["cache", str(folder), "-p", "x", "-s", "blocks.0.hook_resid_pots"])
    assert result.exit_code == 2
    assert "hook_resid_post" in result.output  # did-you-mean
    result = runner.invoke(app, ["info", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "no model folder" in result.output


def test_dtype_and_device_apply_to_every_model_a_command_loads(folder, tmp_path):
    out = tmp_path / "half.safetensors"
    args = ["cache", str(folder), "-p", "The cat sat", "-p", "A dog ran far", "-s", "blocks.0.hook_resid_post"]
    result = runner.invoke(app, ["--dtype", "bf16", "--device", "cpu", *args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert ActivationCache.load(out)["blocks.0.hook_resid_post"].dtype == torch.bfloat16
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "full.safetensors")])  # the next invocation: defaults
    assert ActivationCache.load(tmp_path / "full.safetensors")["blocks.0.hook_resid_post"].dtype == torch.float32
    for option, value, says in [
        ("--dtype", "int8", "dtype must be"),
        ("--device", "gpu0", "device must be a torch device"),
    ]:
        result = runner.invoke(app, [option, value, "info", str(folder)])
        assert result.exit_code == 2 and says in result.output, result.output
        assert "bug in mechscope" not in result.output


def test_the_demo_refuses_dtype_and_device_rather_than_ignoring_them(tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(app, ["--dtype", "bf16", "--device", "cpu", "demo", "--no-record", "--out", str(out)])
    assert result.exit_code == 2
    assert "does not take --dtype bf16 --device cpu" in result.output
    assert not out.exists()
