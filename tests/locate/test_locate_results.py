"""Result base: labelled axes are validated, files round-trip through safetensors and are checked on load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mechscope.errors import ConfigError, ShapeError
from mechscope.locate.lens import LensResult
from mechscope.locate.patching import PatchResult
from mechscope.locate.results import Result


def make() -> PatchResult:
    return PatchResult(
        tensors={"metric": torch.randn(2, 3), "clean": torch.tensor(1.0), "corrupt": torch.tensor(0.0)},
        axes={"metric": ("layer", "pos"), "clean": (), "corrupt": ()},
        labels={"layer": [0, 1], "pos": ["a", "b", "c"]},
        config={"direction": "denoising"},
    )


def test_round_trip_keeps_type_tensors_labels_and_config(tmp_path):
    result = make()
    path = result.save(tmp_path / "r.safetensors")
    for cls in (Result, PatchResult):
        back = cls.load(path)
        assert type(back) is PatchResult
        assert back.labels == {"layer": ["0", "1"], "pos": ["a", "b", "c"]}
        assert back.axes == result.axes and back.config == result.config
        for name, tensor in result.tensors.items():
            torch.testing.assert_close(back[name], tensor, rtol=0, atol=0)


def test_loading_as_the_wrong_result_type_fails(tmp_path):
    path = make().save(tmp_path / "r.safetensors")
    with pytest.raises(ConfigError, match="expected LensResult"):
        LensResult.load(path)


def test_axes_must_match_dimensions_and_labels_their_sizes():
    with pytest.raises(ShapeError, match="2 dimensions"):
        Result(tensors={"x": torch.zeros(2, 3)}, axes={"x": ("layer",)})
    with pytest.raises(ShapeError, match="got 2 labels"):
        Result(tensors={"x": torch.zeros(2, 3)}, axes={"x": ("layer", "pos")}, labels={"pos": ["a", "b"]})
    with pytest.raises(ConfigError, match="same tensors"):
        Result(tensors={"x": torch.zeros(2)}, axes={"y": ("layer",)})


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"format": "other"}, "expected format"),
        ({"format": "mechscope.result", "schema_version": "99"}, "schema_version"),
        ({"format": "mechscope.result", "schema_version": "1", "method": "nope"}, "unknown method"),
        ({"format": "mechscope.result", "schema_version": "1", "method": "result", "description": "{"}, "malformed"),
    ],
)
def test_invalid_files_fail_with_clear_messages(tmp_path, meta, message):
    path = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(2)}, str(path), metadata=meta)
    with pytest.raises(ConfigError, match=message):
        Result.load(path)


def test_missing_or_non_safetensors_file(tmp_path):
    with pytest.raises(ConfigError, match="no result file"):
        Result.load(tmp_path / "absent.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="not a readable"):
        Result.load(junk)


def test_labels_disagreeing_with_tensors_in_a_file_fail_on_load(tmp_path):
    description = json.dumps({"axes": {"x": ["layer"]}, "labels": {"layer": ["0", "1", "2"]}})
    meta = {"format": "mechscope.result", "schema_version": "1", "method": "result", "description": description}
    path = tmp_path / "r.safetensors"
    save_file({"x": torch.zeros(2)}, str(path), metadata=meta)
    with pytest.raises(ShapeError, match="3 labels"):
        Result.load(path)


def test_plot_draws_heatmap_for_2d_and_bar_for_1d():
    result = make()
    heat = result.plot()
    assert heat.data[0].type == "heatmap" and list(heat.data[0].x) == ["a", "b", "c"]
    bar = Result(tensors={"x": torch.arange(3.0)}, axes={"x": ("layer",)}).plot()
    assert bar.data[0].type == "bar" and list(bar.data[0].y) == [0.0, 1.0, 2.0]
    batched = Result(tensors={"x": torch.ones(4, 2, 3)}, axes={"x": ("layer", "batch", "pos")}).plot()
    assert len(batched.data[0].z) == 4
    with pytest.raises(ShapeError, match="1-D or 2-D"):
        Result(tensors={"x": torch.ones(2, 2, 2)}, axes={"x": ("a", "b", "c")}).plot()
