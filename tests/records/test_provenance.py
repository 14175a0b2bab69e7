"""A record names the torch build that computed its numbers, not only the release: PyPI's CUDA wheels
install as ``2.11.0`` while torch reports ``2.11.0+cu130`` (seen with the GPU image's torch)."""

from __future__ import annotations

import torch

from mechscope.records.provenance import versions


def test_versions_name_the_torch_build_and_its_cuda_release(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    found = versions()
    assert found["torch"] == "2.11.0+cu130" and found["cuda"] == "13.0"
    assert {"python", "mechscope", "transformers", "safetensors"} <= set(found)


def test_a_cpu_build_records_no_cuda_release(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    found = versions()
    assert found["torch"] == torch.__version__ and "cuda" not in found
