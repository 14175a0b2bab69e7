"""Organism folders: save, verified load, and clear errors for damaged or missing files."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import CorruptWeightsError, MechscopeError, ModelNotFoundError
from mechscope.zoo import loading
from mechscope.zoo.loading import load_organism, save_organism, verify_folder
from mechscope.zoo.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = load_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=16, n_positions=32))
    out = tmp_path_factory.mktemp("organism") / "tiny"
    save_organism(model, tok, out, {"metrics.json": {"metrics": {}}})
    return out


def test_saved_folder_loads_with_plain_transformers_and_verified_loader(folder):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(folder))
    model, tok = load_organism(folder)
    ids = torch.tensor([tok("hello world")["input_ids"]])
    assert torch.equal(plain(ids).logits, model(ids).logits)
    assert not model.training


def _copy(folder, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def test_truncated_weights_raise_a_clear_error(folder, tmp_path):
    damaged = _copy(folder, tmp_path)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CorruptWeightsError, match=r"model\.safetensors") as info:
        load_organism(damaged)
    assert isinstance(info.value, MechscopeError)
    assert loading.CorruptWeightsError is CorruptWeightsError  # old import path still works


def test_corrupted_tensor_bytes_raise_a_clear_error(folder, tmp_path):
    damaged = _copy(folder, tmp_path)
    weights = damaged / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # inside tensor data: the header still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptWeightsError, match="expected sha256"):
        verify_folder(damaged)


def test_garbage_header_raises_a_clear_error(folder, tmp_path):
    damaged = _copy(folder, tmp_path)
    (damaged / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CorruptWeightsError, match="unreadable"):
        verify_folder(damaged)


def test_missing_files_and_unknown_names(folder, tmp_path):
    damaged = _copy(folder, tmp_path)
    (damaged / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=r"model\.safetensors"):
        load_organism(damaged)
    with pytest.raises(ModelNotFoundError, match="bundled"):
        load_organism("no-such-organism")
