"""The memory knob: logit lens, probes and patching run their prompts `--batch-size` at a time with results that do
not depend on it, and an allocator failure names the knob (exit 2, no traceback)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mechscope.cli.errors import USER_ERROR
from mechscope.cli.main import app
from mechscope.cli.memory import is_out_of_memory, mean_over_batches, memory_knob, row_slices
from mechscope.errors import ConfigError
from mechscope.results import Result

pytestmark = pytest.mark.usefixtures("single_thread")
runner = CliRunner()

CPU_OOM = "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to allocate 8 GB"
PROMPTS = ["The cat sat on the mat today", "A dog", "We read a long book slowly", "the the", "Rome is in"]


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_logit_lens_batches_equal_one_batch(tiny_gpt2_folder, tmp_path):
    args = ["locate", "logit-lens", str(tiny_gpt2_folder)] + [a for p in PROMPTS for a in ("-p", p)]
    for size in ("1", "2", "32"):
        _ok([*args, "--batch-size", size, "-o", str(tmp_path / f"lens{size}.st")])
    whole = Result.load(tmp_path / "lens32.st")
    for size in ("1", "2"):
        part = Result.load(tmp_path / f"lens{size}.st")
        assert part.axes == whole.axes and part.labels == whole.labels
        for name in whole.tensors:
            torch.testing.assert_close(part[name], whole[name], atol=1e-5, rtol=1e-5)


def test_probes_batches_equal_one_batch(tiny_gpt2_folder, tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"text": f"{w} is number {i}", "label": i % 2} for i, w in enumerate(["one", "two", "cat", "dog"] * 3)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    base = ["locate", "probe", str(tiny_gpt2_folder), "--data", str(data), "--folds", "0", "--quiet"]
    for size in ("1", "32"):
        _ok([*base, "--batch-size", size, "-o", str(tmp_path / f"probe{size}.st")])
    one, whole = Result.load(tmp_path / "probe1.st"), Result.load(tmp_path / "probe32.st")
    for name in whole.tensors:
        torch.testing.assert_close(one[name], whole[name], atol=1e-4, rtol=1e-4)


def test_patching_batches_average_to_one_batch(tiny_gpt2_folder, tmp_path):
    # Pairs of equal token length (so positions align); pairs of different lengths, so batches share padding.
    pairs = [("the dog sat on the", "the the sat on the"), ("the cat sat on", "a mat sat on"), ("the dog", "a cat")]
    args = [a for c, x in pairs for a in ("-c", c, "-x", x)] + ["-a", " the", "-a", " a", "-a", " the"]
    args += ["-w", " a"]
    for size in ("1", "2", "32"):
        _ok(
            ["locate", "patch", str(tiny_gpt2_folder), *args, "--batch-size", size, "-o", str(tmp_path / f"p{size}.st")]
        )
    whole = Result.load(tmp_path / "p32.st")
    for size in ("1", "2"):
        part = Result.load(tmp_path / f"p{size}.st")
        assert part["metric"].shape == whole["metric"].shape
        for name in ("metric", "clean", "corrupt"):
            torch.testing.assert_close(part[name], whole[name], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "command,target",
    [
        (["locate", "logit-lens", "{m}", "-p", "a b"], "mechscope.locate.lens.logit_lens"),
        (["locate", "probe", "{m}", "--data", "{d}", "--quiet"], "mechscope.locate.probes.train_probes"),
        (
            ["locate", "patch", "{m}", "-c", "the dog", "-x", "a cat", "-a", " the", "-w", " a"],
            "mechscope.locate.patching.activation_patch",
        ),
        (["cache", "{m}", "-p", "a b", "-o", "{o}"], "mechscope.model.hooked.HookedModel.run_with_cache"),
    ],
    ids=["logit-lens", "probe", "patch", "cache"],
)
def test_an_allocator_failure_names_the_knob(command, target, tiny_gpt2_folder, tmp_path, monkeypatch):
    def out_of_memory(*_args, **_kwargs):
        raise RuntimeError(CPU_OOM)

    monkeypatch.setattr(target, out_of_memory)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"x {i}", "label": i % 2}) for i in range(8)))
    args = [a.format(m=tiny_gpt2_folder, d=data, o=tmp_path / "c.st") for a in command]
    result = runner.invoke(app, [*args, "--batch-size", "8"])
    assert result.exit_code == USER_ERROR, result.output
    assert "Traceback" not in result.output
    assert "out of memory with --batch-size 8" in result.output and "--batch-size 2" in result.output
    assert "DefaultCPUAllocator" in result.output  # what the allocator said


def test_knob_helpers():
    assert is_out_of_memory(RuntimeError(CPU_OOM)) and is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("out of memory"))
    with (
        pytest.raises(ConfigError, match="out of memory with --chunk-size 1: use a smaller model"),
        memory_knob("--chunk-size", 1),
    ):
        raise RuntimeError(CPU_OOM)
    with pytest.raises(RuntimeError, match="shape mismatch"), memory_knob("--batch-size", 4):
        raise RuntimeError("shape mismatch")  # other errors pass through untouched
    assert row_slices(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    parts = {0: 1.0, 2: 4.0, 4: 10.0}  # batch means of 2, 2 and 1 rows

    def run(rows: slice) -> Result:
        return Result(tensors={"m": torch.tensor(parts[rows.start])}, axes={"m": ()}, labels={}, config={})

    assert float(mean_over_batches(run, 5, 2)["m"]) == pytest.approx((2 * 1 + 2 * 4 + 10) / 5)
    with pytest.raises(ConfigError, match="--batch-size must be a positive number of prompts; got 0"):
        mean_over_batches(run, 5, 0)


def test_bad_batch_sizes(tiny_gpt2_folder):
    for command in (["locate", "logit-lens", str(tiny_gpt2_folder), "-p", "a"],):
        result = runner.invoke(app, [*command, "--batch-size", "0"])
        assert result.exit_code == USER_ERROR and "--batch-size must be a positive number of prompts; got 0" in (
            result.output
        )
