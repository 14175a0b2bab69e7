"""Directional ablation, weight orthogonalisation and direction selection on tiny models."""

from __future__ import annotations

import pytest
import torch
import transformers

from mechscope.errors import ConfigError, ShapeError
from mechscope.model.hooked import HookedModel
from mechscope.steer import (
    Direction,
    DirectionSelection,
    DirectionSelectionConfig,
    ModelMismatchError,
    directional_ablation,
    orthogonalize,
    select_direction,
    token_logodds,
)
from mechscope.steer.directional import RESID_KINDS
from tiny_models import tiny_model

TEXTS = ["the cat sat on the mat", "a dog ran in the park today", "we read"]
ORTHO_FAMILIES = ["gpt2", "gpt_neox", "gpt_neox_sequential", "llama", "llama_tied", "mistral", "qwen2", "qwen3", "phi3"]

pytestmark = pytest.mark.usefixtures("single_thread")


def _direction(model: HookedModel, seed: int = 0) -> torch.Tensor:
    return torch.randn(model.dims.d_model, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "gemma2"])
def test_projection_is_zero_at_every_residual_site(family: str) -> None:
    hf, tok = tiny_model(family)
    model = HookedModel(hf, tok)
    r = _direction(model)
    unit = r / r.norm()
    sites = [s.name for s in model.sites(list(RESID_KINDS))]
    _, base = model.run_with_cache(TEXTS, sites)
    with directional_ablation(model, r):
        _, cache = model.run_with_cache(TEXTS, sites)
    for name in sites:
        assert float((cache[name] @ unit).abs().max()) < 1e-4, name
    assert max(float((base[n] @ unit).abs().max()) for n in sites) > 1e-2  # it was there before


@pytest.mark.parametrize("family", ORTHO_FAMILIES)
def test_orthogonalised_model_equals_hooked_ablation_and_round_trips(family: str, tmp_path) -> None:
    hf, tok = tiny_model(family)
    model = HookedModel(hf, tok)
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    r = _direction(model, 1)
    with directional_ablation(model, r):
        hooked = model.forward(TEXTS)
    ortho = orthogonalize(model, r)
    torch.testing.assert_close(ortho.forward(TEXTS), hooked, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(model.forward(TEXTS), hooked, atol=1e-3)  # the ablation does something
    for k, v in hf.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k
    ortho.hf_model.save_pretrained(tmp_path)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    batch = model.to_tokens(TEXTS, padding_side="right")
    with torch.no_grad():
        plain_logits = plain(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(plain_logits[mask], hooked[mask], rtol=1e-4, atol=1e-4)


def test_orthogonalize_refuses_post_norm_families_and_bad_directions() -> None:
    hf, tok = tiny_model("gemma2")
    with pytest.raises(ConfigError, match="norm"):
        orthogonalize(HookedModel(hf, tok), torch.ones(32))
    hf, tok = tiny_model("llama")
    model = HookedModel(hf, tok)
    with pytest.raises(ShapeError, match="d_model"):
        orthogonalize(model, torch.ones(31))
    with pytest.raises(ConfigError, match="NaN"):
        directional_ablation(model, torch.full((32,), float("nan")))
    with pytest.raises(ConfigError, match="zero"):
        directional_ablation(model, torch.zeros(32))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in hf.modules())


def test_direction_file_is_tied_to_its_model(tmp_path) -> None:
    hf, tok = tiny_model("gpt2")
    model = HookedModel(hf, tok)
    d = Direction.from_tensor(model, _direction(model), layer=1)
    path = d.save(tmp_path / "dir.safetensors")
    loaded = Direction.load(path, model)
    torch.testing.assert_close(loaded.vector, d.vector)
    assert loaded.info == {"layer": 1}
    other_hf, other_tok = tiny_model("gpt2", seed=3)
    other = HookedModel(other_hf, other_tok)
    with pytest.raises(ModelMismatchError):
        Direction.load(path, other)
    with pytest.raises(ModelMismatchError):
        directional_ablation(other, loaded)


def test_select_direction_scores_every_candidate_and_picks_the_best(tmp_path) -> None:
    hf, tok = tiny_model("llama")
    model = HookedModel(hf, tok)
    positive = ["the cat sat on the mat", "the dog sat on the rug", "a cat ran to the mat"]
    negative = ["we read a book today", "they walk in the park", "a sun is hot today"]
    target = model.to_tokens(" mat", add_special_tokens=False)["input_ids"][0, 0].item()
    score = token_logodds(int(target))
    cfg = DirectionSelectionConfig(positions=(-1, -2), max_kl=10.0, require_induction=False)
    sel = select_direction(model, positive, negative, score, cfg)
    assert sel["ablation_score"].shape == (2, 2) and sel["directions"].shape == (2, 2, model.dims.d_model)
    layer, position = sel.chosen
    li, pi = sel.labels["layer"].index(str(layer)), sel.labels["position"].index(str(position))
    assert float(sel["ablation_score"][li, pi]) == float(sel["ablation_score"].min())
    with directional_ablation(model, sel["directions"][li, pi]):  # the recorded score is the ablated score
        recomputed = score(model.forward(model.to_tokens(positive, padding_side="left"))[:, -1]).mean()
    torch.testing.assert_close(recomputed, sel["ablation_score"][li, pi], rtol=1e-4, atol=1e-4)
    d = sel.direction(model)
    assert d.info["layer"] == layer
    loaded = DirectionSelection.load(sel.save(tmp_path / "sel.safetensors"))
    assert loaded.chosen == sel.chosen
    prefer = select_direction(
        model,
        positive,
        negative,
        score,
        DirectionSelectionConfig(**{"positions": (-1, -2), "max_kl": 10.0, "require_induction": "prefer"}),
    )
    inducing = prefer["induction_score"] > 0
    pl, pp = prefer.chosen
    pli, ppi = prefer.labels["layer"].index(str(pl)), prefer.labels["position"].index(str(pp))
    if bool(inducing.any()):  # the best inducing candidate
        assert bool(inducing[pli, ppi])
        best = prefer["ablation_score"].masked_fill(~inducing, float("inf")).min()
        assert float(prefer["ablation_score"][pli, ppi]) == float(best)
    else:  # nothing induces: the same choice as without the filter
        assert prefer.chosen == sel.chosen
    strict = DirectionSelectionConfig(positions=(-1,), max_kl=1e-12)
    with pytest.raises(Exception, match="no candidate"):
        select_direction(model, positive, negative, score, strict)
    with pytest.raises(ConfigError, match="negative"):
        DirectionSelectionConfig(positions=(0,))
    with pytest.raises(ConfigError, match="require_induction"):
        DirectionSelectionConfig(require_induction="maybe")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="finite"):
        DirectionSelectionConfig(max_ablation_score=float("nan"))
