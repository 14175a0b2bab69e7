"""Logit lens: its last row is the model's own logits (every family, soft-capping included)."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import ConfigError
from mechscope.locate.lens import LensResult, logit_lens
from mechscope.model.hooked import HookedModel
from tiny_models import FAMILIES, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return HookedModel(tiny_model(request.param, with_tokenizer=False)[0])


def tokens() -> torch.Tensor:
    return torch.randint(4, 100, (2, 7), generator=torch.Generator().manual_seed(1))


def test_last_row_is_the_models_logits_and_its_kl_is_zero(model):
    result = logit_lens(model, tokens(), keep_logits=True, k=3)
    logits = model(tokens())
    n = model.dims.n_layers + 1
    assert result["logits"].shape == (n, 2, 7, model.dims.d_vocab)
    torch.testing.assert_close(result["logits"][-1], logits.float(), rtol=0, atol=0)
    assert result["kl"][-1].abs().max().item() == 0.0
    assert (result["kl"] >= 0).all() and result["kl"][:-1].sum() > 0
    torch.testing.assert_close(result["top_tokens"][-1], logits.topk(3, dim=-1).indices)
    assert result.labels["layer"][-1] == "final" and len(result.labels["layer"]) == n


def test_positions_select_columns_of_the_full_lens(model):
    full = logit_lens(model, tokens())
    some = logit_lens(model, tokens(), positions=[1, -1])
    torch.testing.assert_close(some["kl"], full["kl"][:, :, [1, 6]])
    assert some.labels["pos"] == ["1", "-1"]


def test_round_trip_and_plot(tmp_path):
    model = HookedModel(tiny_model("gpt2")[0], tiny_model("gpt2")[1])
    result = logit_lens(model, "The quick brown fox")
    back = LensResult.load(result.save(tmp_path / "lens.safetensors"))
    torch.testing.assert_close(back["kl"], result["kl"])
    assert back.labels["pos"][0].endswith("<bos>")
    assert result.plot().data[0].type == "heatmap"
    with pytest.raises(ConfigError, match="k must be"):
        logit_lens(model, "The", k=0)


def test_mean_kl_leaves_out_the_bos_the_tokenizer_adds():
    # The tiny tokenizer prepends <bos> as Gemma's does; the lens still reads it (column 0) but the per-layer
    # mean is over the text's own tokens, so it equals the mean over columns 1: (pads left out too).
    hf, tok = tiny_model("gemma2")
    model = HookedModel(hf, tok)
    result = logit_lens(model, ["The quick brown fox jumps", "A dog"])
    assert bool((result["text_mask"][:, 0] == 0).all()) and bool(result["attention_mask"][:, 0].all())
    mask = result["attention_mask"][:, 1:].float()
    expected = (result["kl"][:, :, 1:] * mask).sum((1, 2)) / mask.sum()
    torch.testing.assert_close(result.mean_kl(), expected)
    with_bos = (result["kl"] * result["attention_mask"].float()).sum((1, 2)) / result["attention_mask"].sum()
    assert not torch.allclose(result.mean_kl(), with_bos)  # the BOS column does count otherwise
    some = logit_lens(model, ["The quick brown fox jumps", "A dog"], positions=[0, 1])
    assert some["text_mask"].tolist() == [[0, 1], [0, 1]]
    torch.testing.assert_close(some.mean_kl(), result["kl"][:, :, 1].mean(1))
    last = logit_lens(model, ["The quick brown fox jumps", "A dog"], positions="last")
    torch.testing.assert_close(last.mean_kl(), last["kl"][:, :, 0].mean(1))
