"""Loading real checkpoints as users have them: every family from a saved folder (the default attention
where the family has no SDPA path), sharded checkpoints with an index, and folders that lack a part."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mechscope.errors import ConfigError, ModelNotFoundError
from mechscope.model.loading import load_model
from tiny_models import FAMILIES, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

TOKENS = torch.randint(4, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def _save(family, folder, **save_kwargs):
    hf, tok = tiny_model(family, attn_implementation="eager")
    hf.save_pretrained(folder, **save_kwargs)
    tok.save_pretrained(folder)
    return hf


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_loads_from_a_saved_folder_with_its_default_attention(family, tmp_path):
    hf = _save(family, tmp_path)
    model = load_model(tmp_path)  # no attn_implementation: what a new user types
    with torch.no_grad():
        reference = hf(input_ids=TOKENS).logits
    torch.testing.assert_close(model(TOKENS), reference, atol=1e-5, rtol=1e-5)
    expected = "eager" if family == "gemma2" else "sdpa"
    assert model.attention_base == expected, "the chosen implementation is reported"
    assert model.pattern_available()


def test_gemma2_asked_for_sdpa_falls_back_to_eager_with_attention_sites(tmp_path):
    hf = _save("gemma2", tmp_path)
    model = load_model(tmp_path, attn_implementation="sdpa")
    assert model.attention_base == "eager"
    _, cache = model.run_with_cache(TOKENS, ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_attn_scores"])
    with torch.no_grad():
        out = hf(input_ids=TOKENS, output_attentions=True)
    # The sliding-window layer's pattern is HF's own (eager) attention weights.
    torch.testing.assert_close(cache["blocks.0.attn.hook_pattern"], out.attentions[0], atol=1e-6, rtol=1e-5)
    scores = cache["blocks.1.attn.hook_attn_scores"]
    finite = scores > torch.finfo(scores.dtype).min / 2
    assert scores[finite].abs().max() <= 5.0 + 1e-5, "scores are softcapped at attn_logit_softcapping"


def test_sharded_checkpoint_with_an_index_loads(tmp_path):
    hf = _save("llama", tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "the checkpoint really is sharded"
    model = load_model(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), hf(input_ids=TOKENS).logits, atol=1e-5, rtol=1e-5)


def test_config_only_folder_says_weights_are_missing(tmp_path):
    hf, _ = tiny_model("llama")
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"config\.json but no weights"):
        load_model(tmp_path)


def test_tokenizer_only_folder_says_so(tmp_path):
    _, tok = tiny_model("llama")
    tok.save_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError, match="tokenizer files only"):
        load_model(tmp_path)


def test_weights_without_config_say_so(tmp_path):
    _save("llama", tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        load_model(tmp_path)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.float8_e4m3fn, torch.bool])
def test_a_dtype_the_weights_cannot_take_is_refused(tmp_path, dtype):
    with pytest.raises(ConfigError, match="floating dtype"):
        load_model(tmp_path, dtype=dtype)


def test_unknown_dtype_name_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="bfloat16"):
        load_model(tmp_path, dtype="int8")


@pytest.fixture
def gemma2_claims_sdpa(monkeypatch):
    """Gemma 2 as transformers <= 5.17 declared it: SDPA-capable, although SDPA drops the softcap."""
    from transformers import Gemma2ForCausalLM, Gemma2PreTrainedModel

    for cls in (Gemma2PreTrainedModel, Gemma2ForCausalLM):
        monkeypatch.setattr(cls, "_supports_sdpa", True)


def test_a_softcapping_model_loads_with_eager_even_where_its_class_claims_sdpa(gemma2_claims_sdpa, tmp_path):
    hf = _save("gemma2", tmp_path)
    with torch.no_grad():
        reference = hf(input_ids=TOKENS).logits
    for asked in (None, "sdpa"):
        model = load_model(tmp_path, attn_implementation=asked)
        assert model.attention_base == "eager", asked
        torch.testing.assert_close(model(TOKENS), reference, atol=1e-5, rtol=1e-5)


def test_an_in_memory_softcapping_model_on_sdpa_is_switched_to_eager(gemma2_claims_sdpa):
    eager, tok = tiny_model("gemma2", attn_implementation="eager")
    sdpa = copy.deepcopy(eager)
    sdpa.set_attn_implementation("sdpa")
    with torch.no_grad():
        reference = eager(input_ids=TOKENS).logits
    # Run on sdpa, transformers 5.17 drops the softcap silently and later releases raise: neither is eager's number.
    model = load_model(sdpa, tokenizer=tok)
    assert model.attention_base == "eager"
    torch.testing.assert_close(model(TOKENS), reference, atol=1e-5, rtol=1e-5)
