"""Ablation and scaling: definitions (zero/mean/resample/scale), selections, bad input."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import ConfigError, ShapeError, SiteError
from mechscope.model.hooked import HookedModel
from mechscope.steer import (
    Ablation,
    AblationConfig,
    ModelMismatchError,
    mean_ablation,
    resample_ablation,
    scaling,
    zero_ablation,
)
from tiny_models import tiny_model

PROMPTS = ["the cat sat on the mat", "a dog ran in the park", "the sun is hot today", "we read a good book"]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request) -> HookedModel:
    hf, tok = tiny_model(request.param)
    return HookedModel(hf, tok)


def _ids(model: HookedModel, n: int = 6) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(4, 100, (3, n), generator=gen)


def _no_hooks(model: HookedModel) -> bool:
    clean = [
        not m._forward_hooks and not m._forward_pre_hooks and "_mechscope_attention_handlers" not in m.__dict__
        for m in model.hf_model.modules()
    ]
    return not model._sessions and all(clean)


def test_zero_ablation_of_one_head_zeroes_only_that_head(model: HookedModel) -> None:
    ids = _ids(model)
    with zero_ablation(model, "blocks.0.attn.hook_z", heads=1):
        _, cache = model.run_with_cache(ids, "blocks.0.attn.hook_z")
    _, base = model.run_with_cache(ids, "blocks.0.attn.hook_z")
    z, z0 = cache["blocks.0.attn.hook_z"], base["blocks.0.attn.hook_z"]
    assert torch.all(z[:, :, 1] == 0)
    torch.testing.assert_close(z[:, :, [0, 2, 3]], z0[:, :, [0, 2, 3]])
    assert _no_hooks(model)


def test_neuron_and_position_selection(model: HookedModel) -> None:
    ids = _ids(model)
    site = "blocks.1.mlp.hook_post"
    with zero_ablation(model, site, neurons=[3, 5], positions=-1):
        _, cache = model.run_with_cache(ids, site)
    _, base = model.run_with_cache(ids, site)
    got, ref = cache[site], base[site]
    assert torch.all(got[:, -1, [3, 5]] == 0)
    mask = torch.ones_like(got, dtype=torch.bool)
    mask[:, -1, 3] = mask[:, -1, 5] = False
    torch.testing.assert_close(got[mask], ref[mask])


def test_scale_one_is_identity_and_zero_is_zero_ablation(model: HookedModel) -> None:
    ids = _ids(model)
    base = model.forward(ids)
    with scaling(model, "blocks.0.hook_attn_out", 1.0):
        torch.testing.assert_close(model.forward(ids), base, rtol=0, atol=0)
    with scaling(model, "blocks.0.hook_attn_out", 0.0):
        scaled = model.forward(ids)
    with zero_ablation(model, "blocks.0.hook_attn_out"):
        zeroed = model.forward(ids)
    torch.testing.assert_close(scaled, zeroed)
    assert not torch.allclose(scaled, base)
    with scaling(model, "blocks.0.hook_mlp_out", 2.5):
        _, cache = model.run_with_cache(ids, "blocks.0.hook_mlp_out")
    with scaling(model, "blocks.0.hook_attn_out", 1.0):  # other site: mlp_out unchanged
        _, base_cache = model.run_with_cache(ids, "blocks.0.hook_mlp_out")
    torch.testing.assert_close(cache["blocks.0.hook_mlp_out"], 2.5 * base_cache["blocks.0.hook_mlp_out"])


def test_mean_over_the_prompt_itself_changes_nothing(model: HookedModel) -> None:
    sites = ["blocks.0.hook_resid_mid", "blocks.1.attn.hook_z", "blocks.1.mlp.hook_post"]
    for prompt in PROMPTS[:2]:
        base = model.forward(prompt)
        with mean_ablation(model, sites, reference=prompt):
            torch.testing.assert_close(model.forward(prompt), base)
    # ... while the mean over other prompts of the same length does change it (the test can fail).
    ids = _ids(model)
    with mean_ablation(model, "blocks.0.hook_resid_mid", reference=ids):
        out = model.forward(ids)
    assert not torch.allclose(out, model.forward(ids))
    _, cache = model.run_with_cache(ids, "blocks.0.hook_resid_mid")
    mean = cache["blocks.0.hook_resid_mid"].mean(0)
    with mean_ablation(model, "blocks.0.hook_resid_mid", reference=ids):
        _, abl = model.run_with_cache(ids, "blocks.0.hook_resid_mid")
    torch.testing.assert_close(abl["blocks.0.hook_resid_mid"], mean.expand_as(abl["blocks.0.hook_resid_mid"]))


def test_mean_over_tokens_works_in_generation(model: HookedModel) -> None:
    abl = mean_ablation(model, "blocks.1.hook_mlp_out", reference=PROMPTS, over="tokens")
    with abl:
        out = model.generate("the cat", max_new_tokens=3, do_sample=False)
    assert out.shape[1] >= 3
    assert _no_hooks(model)


def _left_padded_bos_batch() -> tuple[HookedModel, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """A tiny llama (its tokenizer adds a BOS) on a left-padded batch: each row's BOS at another position."""
    hf, tok = tiny_model("llama")
    model = HookedModel(hf, tok)
    batch = model.to_tokens(["a b c d e f g h", "a b c", "a b c d e"], padding_side="left")
    real = batch["attention_mask"].bool()
    bos = real & (batch["input_ids"] == tok.bos_token_id)
    assert bos.sum() == 3 and len(set(bos.int().argmax(1).tolist())) == 3
    return model, batch, bos, real & ~bos


@pytest.mark.parametrize("over", ["batch", "tokens"])
def test_mean_ablation_leaves_each_rows_bos_out_of_the_mean_and_as_it_is(over: str) -> None:
    # Gemma-3's BOS residual is 14x a text token's: a mean that counts it, or a text mean written over it,
    # swamps the rest. The mean is over text tokens (per position: over the rows with text there); a row's
    # BOS keeps its own activation.
    model, batch, bos, text = _left_padded_bos_batch()
    site = "blocks.0.hook_resid_post"
    _, base = model.run_with_cache(batch, site)
    act = base[site]
    with mean_ablation(model, site, reference=batch, over=over):  # type: ignore[arg-type]
        _, cache = model.run_with_cache(batch, site)
    got = cache[site]
    torch.testing.assert_close(got[bos], act[bos], rtol=0, atol=0)
    for row, pos in text.nonzero().tolist():
        rows = text[:, pos] if over == "batch" else text
        expected = act[rows, pos].mean(0) if over == "batch" else act[rows].mean(0)
        torch.testing.assert_close(got[row, pos], expected, rtol=1e-5, atol=1e-6)
    # the old rule (BOS counted in the mean) gives other values: the test can fail
    counted = act[batch["attention_mask"].bool()].mean(0)
    assert not torch.allclose(got[text], counted.expand_as(got[text]), atol=1e-3)


def test_per_position_mean_of_unpadded_prompts_keeps_the_bos_column() -> None:
    # Equal-length prompts each start with the BOS: position 0 holds no text, so its mean is the BOS's
    # own (and mean-ablating over the prompt itself still changes nothing).
    model, _, _, _ = _left_padded_bos_batch()
    batch = model.to_tokens(["a b c", "c b a"])
    assert torch.all(batch["input_ids"][:, 0] == model.tokenizer.bos_token_id)
    abl = mean_ablation(model, "blocks.0.hook_mlp_out", reference=batch)
    _, cache = model.run_with_cache(batch, "blocks.0.hook_mlp_out")
    torch.testing.assert_close(abl.values[model.site("blocks.0.hook_mlp_out")][0], cache["blocks.0.hook_mlp_out"][0, 0])
    for row in range(2):
        one = {k: v[row : row + 1] for k, v in batch.items()}
        plain = model.forward(one)
        with mean_ablation(model, "blocks.0.hook_mlp_out", reference=one):
            torch.testing.assert_close(model.forward(one), plain)


def test_a_wrapped_mean_ablation_still_knows_each_rows_bos() -> None:
    # Interventions made of others (conditional, profiles, head sets) pass every forward on to their parts.
    from mechscope.steer.conditional import Condition, conditional

    model, batch, bos, text = _left_padded_bos_batch()
    site = "blocks.1.hook_resid_pre"
    _, base = model.run_with_cache(batch, site)
    always = Condition("blocks.0.hook_resid_pre", torch.ones(model.dims.d_model), threshold=-1e9)
    with conditional(mean_ablation(model, site, reference=batch, over="tokens"), always):
        _, cache = model.run_with_cache(batch, site)
    torch.testing.assert_close(cache[site][bos], base[site][bos], rtol=0, atol=0)
    assert not torch.allclose(cache[site][text], base[site][text])


def test_resample_from_a_copy_changes_nothing(model: HookedModel) -> None:
    ids = _ids(model)
    sites = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_result"]
    base = model.forward(ids)
    with resample_ablation(model, sites, source=ids.clone(), pairing="aligned"):
        torch.testing.assert_close(model.forward(ids), base)
    same = ids[:1].repeat(3, 1)  # deranged rows of identical prompts are the same prompt
    base_same = model.forward(same)
    with resample_ablation(model, sites, source=same.clone()):
        torch.testing.assert_close(model.forward(same), base_same)
    with resample_ablation(model, sites, source=ids.clone()):  # other prompts: it does change
        assert not torch.allclose(model.forward(ids), base)


def test_resample_reads_another_row(model: HookedModel) -> None:
    ids = _ids(model)
    site = "blocks.0.hook_resid_post"
    abl = resample_ablation(model, site, source=ids, seed=3)
    assert abl.rows is not None and not bool((abl.rows == torch.arange(3)).any())
    _, base = model.run_with_cache(ids, site)
    with abl:
        _, cache = model.run_with_cache(ids, site)
    torch.testing.assert_close(cache[site], base[site][abl.rows])


def test_bad_input_is_refused_and_leaves_no_hooks(model: HookedModel) -> None:
    ids = _ids(model)
    weights = {k: v.clone() for k, v in model.hf_model.state_dict().items()}
    with pytest.raises(ConfigError, match="no head axis"):
        zero_ablation(model, "blocks.0.hook_resid_pre", heads=0)
    with pytest.raises(ConfigError, match="out of range"):
        zero_ablation(model, "blocks.0.mlp.hook_post", neurons=[10_000])
    with pytest.raises(ConfigError, match="finite"):
        scaling(model, "blocks.0.hook_attn_out", float("nan"))
    with pytest.raises(ConfigError, match="reference"):
        Ablation(model, "blocks.0.hook_attn_out", AblationConfig(method="mean"))
    with pytest.raises(SiteError):
        zero_ablation(model, "blocks.9.hook_attn_out")
    with pytest.raises(ConfigError, match="method"):
        AblationConfig(method="erase")  # type: ignore[arg-type]
    abl = mean_ablation(model, "blocks.0.hook_attn_out", reference=ids)
    with pytest.raises(ShapeError, match="reference mean"), abl:
        model.forward(ids[:, :4])
    assert _no_hooks(model)
    for k, v in model.hf_model.state_dict().items():
        assert torch.equal(v, weights[k])


def test_saved_ablation_reloads_on_its_model_only(model: HookedModel, tmp_path) -> None:
    ids = _ids(model)
    abl = mean_ablation(model, ["blocks.0.hook_attn_out", "blocks.1.hook_mlp_out"], reference=ids, neurons=[1, 2])
    path = abl.save(tmp_path / "abl.safetensors")
    loaded = Ablation.load(path, model)
    assert loaded.config == abl.config and loaded.sites == abl.sites
    with abl:
        expected = model.forward(ids[:, :6])
    with loaded:
        torch.testing.assert_close(model.forward(ids[:, :6]), expected, rtol=0, atol=0)
    res = resample_ablation(model, "blocks.0.hook_resid_post", source=ids, seed=2)
    again = Ablation.load(res.save(tmp_path / "res.safetensors"), model)
    assert again.rows is not None and torch.equal(again.rows, res.rows)
    other_hf, other_tok = tiny_model(model.dims.model_type, seed=9)
    with pytest.raises(ModelMismatchError):
        Ablation.load(path, HookedModel(other_hf, other_tok))
