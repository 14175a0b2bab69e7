"""load_model: folders, in-memory models, names; clear errors for what cannot be loaded."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import AdapterError, ConfigError, MechscopeError, ModelNotFoundError
from mechscope.model.hooked import HookedModel
from mechscope.model.loading import load_model
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    hf, tok = tiny_model("llama")
    folder = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    tokens = torch.randint(4, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = hf(input_ids=tokens).logits
    return folder, tokens, reference


def test_load_folder_matches_the_saved_model(saved_llama):
    folder, tokens, reference = saved_llama
    model = load_model(folder)
    assert isinstance(model, HookedModel) and model.tokenizer is not None
    torch.testing.assert_close(model(tokens), reference, atol=1e-5, rtol=1e-5)
    assert model.attention_base == "sdpa" and not model.hf_model.training


def test_load_folder_with_eager_base_and_dtype(saved_llama):
    folder, tokens, reference = saved_llama
    model = load_model(folder, attn_implementation="eager", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.attention_base == "eager"
    torch.testing.assert_close(model(tokens).float(), reference, atol=0.1, rtol=0.05)


def test_load_in_memory_model_keeps_its_tokenizer():
    hf, tok = tiny_model("gpt2")
    model = load_model(hf, tokenizer=tok)
    assert model.hf_model is hf and model.tokenizer is tok


def test_missing_folder_says_how_to_provide_a_model(tmp_path):
    with pytest.raises(ModelNotFoundError) as info:
        load_model(tmp_path / "nope")
    message = str(info.value)
    assert "nope" in message and "save_pretrained" in message and "allow_download=True" in message


def test_a_file_instead_of_a_folder_is_rejected(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="is a file; expected a folder"):
        load_model(path)


def test_truncated_weights_give_an_error_not_a_half_loaded_model(saved_llama, tmp_path):
    folder, _, _ = saved_llama
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in folder.iterdir():
        data = item.read_bytes()
        (broken / item.name).write_bytes(data[: len(data) // 2] if item.suffix == ".safetensors" else data)
    with pytest.raises(MechscopeError, match="could not load the weights"):
        load_model(broken)


def test_weights_missing_tensors_are_refused(saved_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _, _ = saved_llama
    partial = tmp_path / "partial"
    partial.mkdir()
    for item in folder.iterdir():
        if item.suffix != ".safetensors":
            (partial / item.name).write_bytes(item.read_bytes())
    state = load_file(str(folder / "model.safetensors"))
    dropped = sorted(k for k in state if "layers.1.mlp" in k)
    save_file(
        {k: v for k, v in state.items() if k not in dropped},
        str(partial / "model.safetensors"),
        metadata={"format": "pt"},
    )
    with pytest.raises(MechscopeError, match="lack"):
        load_model(partial)


def test_unsupported_architecture_in_memory():
    import transformers

    config = transformers.BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=50)
    with pytest.raises(AdapterError, match=r"docs/adapters\.md"):
        load_model(transformers.BloomForCausalLM(config))


def test_bad_options_are_reported():
    hf, _ = tiny_model("gpt2", with_tokenizer=False)
    with pytest.raises(ConfigError, match="dtype must be"):
        load_model(hf, dtype="float8")
    with pytest.raises(ConfigError, match="source must be"):
        load_model(42)  # type: ignore[arg-type]


def test_bad_devices_are_refused_before_anything_loads(saved_llama):
    folder = saved_llama[0]
    with pytest.raises(ConfigError, match=r"device must be a torch device .* got 'gpu0'"):
        load_model(folder, device="gpu0")
    if not torch.cuda.is_available():
        for device in ("cuda", "cuda:1", torch.device("cuda:0")):
            with pytest.raises(ConfigError, match="asks for CUDA"):
                load_model(folder, device=device)
    else:
        with pytest.raises(ConfigError, match="CUDA device"):
            load_model(folder, device=f"cuda:{torch.cuda.device_count()}")
    if not torch.backends.mps.is_available():
        with pytest.raises(ConfigError, match="MPS"):
            load_model(folder, device="mps")
    assert load_model(folder, device="cpu").device == torch.device("cpu")


def test_fingerprint_depends_on_weights_not_on_the_folder(tmp_path):
    """Same weights from two folders: same fingerprint; one weight changed: a different one."""
    import torch

    from mechscope.model.loading import load_model
    from tiny_models import tiny_model

    hf, tok = tiny_model("llama")
    for name in ("a", "b"):
        hf.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    first, second = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    assert first.fingerprint() == second.fingerprint()
    with torch.no_grad():
        next(second.hf_model.parameters()).add_(1.0)
    assert first.fingerprint() != second.fingerprint()
