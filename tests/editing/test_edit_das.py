"""DAS: interchange interventions by definition, an orthonormal learned basis, the model untouched."""

from __future__ import annotations

import pytest
import torch
from edit_helpers import tiny

from mechscope.errors import ConfigError, ShapeError, SiteError
from mechscope.locate.results import Result
from mechscope.steer.das import DASConfig, DASResult, Pairs, das, interchange_logits
from mechscope.steer.editing import snapshot
from mechscope.steer.editing.records import equal_to_snapshot

pytestmark = pytest.mark.usefixtures("single_thread")

SITE = "blocks.0.hook_resid_post"
BASE = ["The capital of France is", "A cat sat on the mat", "One two three four"]
SOURCE = ["The capital of Italy is", "The quick brown fox", "Hello world! This is"]


def _pairs(model, base, source) -> Pairs:
    pos = [1] * len(base)
    labels = [model.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]] * len(base)
    return Pairs(list(base), list(source), pos, pos, labels)


def _last_logits(model, texts):
    batch = model.to_tokens(texts, padding_side="right")
    logits = model.forward(batch)
    return logits[torch.arange(len(texts)), batch["attention_mask"].sum(-1) - 1]


def test_interchange_with_itself_is_the_identity():
    model = tiny("llama")
    basis = torch.linalg.qr(torch.randn(model.dims.d_model, 4))[0]
    with torch.no_grad():
        torch.testing.assert_close(
            interchange_logits(model, basis, SITE, _pairs(model, BASE, BASE)), _last_logits(model, BASE)
        )


def test_full_rank_interchange_is_activation_patching():
    model = tiny("gpt2")
    d = model.dims.d_model
    q = torch.linalg.qr(torch.randn(d, d))[0]  # any orthonormal basis of the whole space
    pairs = _pairs(model, BASE, SOURCE)
    _, cache = model.run_with_cache(model.to_tokens(SOURCE, padding_side="right"), [SITE])
    source_act = cache[SITE][:, 1]

    def patch(act, _ctx):
        act = act.clone()
        act[:, 1] = source_act
        return act

    with torch.no_grad():
        got = interchange_logits(model, q, SITE, pairs)
        with model.hooks({SITE: patch}):
            want = _last_logits(model, BASE)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_das_learns_an_orthonormal_basis_without_touching_the_model(tmp_path):
    model = tiny("gpt2")
    before = snapshot(model)
    pairs = _pairs(model, BASE * 2, SOURCE * 2)
    result = das(model, pairs, DASConfig(site=SITE, rank=3, steps=5, batch_size=4, variable="toy"))
    q = result.basis
    torch.testing.assert_close(q.T @ q, torch.eye(3), atol=1e-5, rtol=0)
    assert equal_to_snapshot(model, before) == []
    assert all(p.grad is None for p in model.hf_model.parameters())
    assert 0.0 <= result.iia("test") <= 1.0 and result["losses"].shape == (5,)
    loaded = Result.load(result.save(tmp_path / "das.safetensors"))
    assert isinstance(loaded, DASResult) and torch.equal(loaded.basis, q) and loaded.config["variable"] == "toy"
    result.plot()


def test_das_bad_input():
    model = tiny("gpt2")
    with pytest.raises(ShapeError, match="labels"):
        Pairs(BASE, SOURCE, [1, 1, 1], [1, 1, 1], [0])
    with pytest.raises(ConfigError, match="exceeds"):
        das(model, _pairs(model, BASE, SOURCE), DASConfig(site=SITE, rank=10_000))
    with pytest.raises(SiteError):
        das(model, _pairs(model, BASE, SOURCE), DASConfig(site="blocks.9.hook_resid_post"))
    with pytest.raises(ConfigError, match="rank"):
        DASConfig(site=SITE, rank=0)
