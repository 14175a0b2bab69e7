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
    logodds_bar,
    orthogonalize,
    select_direction,
    token_logodds,
)
from mechscope.steer.directional import RESID_KINDS, orthonormal_basis
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


def _plane(model: HookedModel, seed: int = 5) -> torch.Tensor:
    """Two random, non-orthogonal directions [2, d_model]."""
    return torch.randn(2, model.dims.d_model, generator=torch.Generator().manual_seed(seed))


def test_orthonormal_basis_spans_the_inputs_and_refuses_dependent_ones() -> None:
    vectors = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    basis = orthonormal_basis(vectors, 16)
    torch.testing.assert_close(basis @ basis.T, torch.eye(3), atol=1e-5, rtol=0)
    residual = vectors - (vectors @ basis.T) @ basis  # every input lies in the span
    assert float(residual.abs().max()) < 1e-5
    assert float(basis[0] @ vectors[0]) > 0  # the first basis vector is the first input, normalised
    with pytest.raises(ConfigError, match="linearly dependent"):
        orthonormal_basis(torch.stack([vectors[0], 2 * vectors[0]]), 16)
    with pytest.raises(ShapeError, match=r"\[k, d_model\]"):
        orthonormal_basis(torch.ones(2, 15), 16)
    with pytest.raises(ConfigError, match="NaN"):
        orthonormal_basis(torch.full((2, 16), float("nan")), 16)
    assert logodds_bar(0.5) == 0.0 and logodds_bar(0.1) == pytest.approx(-2.1972, abs=1e-4)
    with pytest.raises(ConfigError, match="probability"):
        logodds_bar(1.0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_subspace_ablation_removes_every_direction_of_the_span_and_orthogonalises(family: str) -> None:
    hf, tok = tiny_model(family)
    model = HookedModel(hf, tok)
    plane = _plane(model)
    sites = [s.name for s in model.sites(list(RESID_KINDS))]
    with directional_ablation(model, plane):
        hooked, cache = model.run_with_cache(TEXTS, sites)
    for name in sites:
        assert float((cache[name] @ plane.T).abs().max()) < 1e-4, name  # both directions, and so the span
    with directional_ablation(model, plane[0]):  # one direction of the two is a different intervention
        assert not torch.allclose(model.forward(TEXTS), hooked, atol=1e-3)
    # the same as ablating the orthonormalised directions one after the other (the projections commute)
    basis = orthonormal_basis(plane, model.dims.d_model)
    with directional_ablation(model, basis[0]), directional_ablation(model, basis[1]):
        torch.testing.assert_close(model.forward(TEXTS), hooked, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(orthogonalize(model, plane).forward(TEXTS), hooked, rtol=1e-4, atol=1e-4)


def test_a_subspace_direction_file_round_trips_and_old_rank_one_files_load(tmp_path) -> None:
    from mechscope.io import read_safetensors, write_safetensors

    hf, tok = tiny_model("gpt2")
    model = HookedModel(hf, tok)
    d = Direction.from_tensor(model, _plane(model), subspace=[[0, -1], [1, -1]])
    assert d.rank == 2 and "rank=2" in repr(d)
    with pytest.raises(ConfigError, match="no single vector"):
        _ = d.vector
    loaded = Direction.load(d.save(tmp_path / "plane.safetensors"), model)
    torch.testing.assert_close(loaded.basis, d.basis)
    one = Direction.from_tensor(model, _direction(model))
    path = one.save(tmp_path / "one.safetensors")
    tensors, meta = read_safetensors(path, "direction")
    write_safetensors(tmp_path / "old.safetensors", {"vector": tensors["basis"][0]}, meta)  # the pre-subspace layout
    torch.testing.assert_close(Direction.load(tmp_path / "old.safetensors", model).vector, one.vector)


def test_select_direction_falls_back_to_the_smallest_span_that_reaches_the_bar() -> None:
    hf, tok = tiny_model("llama")
    model = HookedModel(hf, tok)
    positive = ["the cat sat on the mat", "the dog sat on the rug", "a cat ran to the mat"]
    negative = ["we read a book today", "they walk in the park", "a sun is hot today"]
    score = token_logodds(int(model.to_tokens(" mat", add_special_tokens=False)["input_ids"][0, 0]))
    loose = DirectionSelectionConfig(positions=(-1, -2), max_kl=10.0, require_induction=False)
    candidates = select_direction(model, positive, negative, score, loose)
    flat = candidates["ablation_score"].flatten()
    order = flat.argsort()
    dirs = candidates["directions"].flatten(0, 1)
    # a bar between the best single score and the score of the best two ablated together
    with torch.no_grad(), directional_ablation(model, dirs[order[:2]]):
        pair = float(score(model.forward(model.to_tokens(positive, padding_side="left"))[:, -1]).mean())
    assert pair < float(flat[order[0]])  # the construction: on this model two directions beat the best one
    bar = (pair + float(flat[order[0]])) / 2
    cfg = DirectionSelectionConfig(
        positions=(-1, -2), max_kl=10.0, require_induction=False, max_ablation_score=bar, max_rank=3
    )
    sel = select_direction(model, positive, negative, score, cfg)
    # grown greedily from the best single candidate: its best partner does at least as well as the next-best
    assert len(sel.members) == 2 and sel.config["subspace_scores"][1] <= pair + 1e-4
    first = candidates.labels["layer"].index(str(sel.members[0][0])) * 2
    first += candidates.labels["position"].index(str(sel.members[0][1]))
    assert first == int(order[0])
    direction = sel.direction(model)
    assert direction.rank == 2 and direction.info["subspace"] == [list(m) for m in sel.members]
    single_only = DirectionSelectionConfig(
        positions=(-1, -2), max_kl=10.0, require_induction=False, max_ablation_score=bar
    )
    with pytest.raises(Exception, match="max_rank"):
        select_direction(model, positive, negative, score, single_only)
    with pytest.raises(ConfigError, match="max_ablation_score"):
        DirectionSelectionConfig(max_rank=2)
    with pytest.raises(ConfigError, match="max_rank"):
        DirectionSelectionConfig(max_rank=0, max_ablation_score=0.0)


def test_the_retain_subspace_is_read_from_text_tokens_not_the_bos() -> None:
    # The tiny tokenizer prepends <bos> as Gemma's does; whose residual there is an outlier (14x a text token's
    # on Gemma-3-270M) would take the top components of an uncentred PCA. The subspace spans the text tokens'.
    from mechscope.sites import Site
    from mechscope.steer.selection import retain_subspace

    hf, tok = tiny_model("gemma2")
    model = HookedModel(hf, tok)
    texts = ["The cat sat on the mat.", "A dog ran", "Birds sing at dawn in the old tree."]
    site = Site("hook_resid_pre", 1)
    batch = model.to_tokens(texts)
    _, cache = model.run_with_cache(batch, site)
    mask = batch["attention_mask"].bool()
    mask[:, 0] = False  # every row starts with <bos>
    expected = torch.linalg.svd(cache[site.name][mask].float(), full_matrices=False)[2][:3]
    got = retain_subspace(model, texts, site, 3)
    torch.testing.assert_close((got @ expected.T).abs(), torch.eye(3), atol=1e-4, rtol=0)  # the same axes
