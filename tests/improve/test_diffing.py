"""Model diffing on tiny models: the definitions (self-diff is zero, identical patching is a no-op, the
weight split is a partition), a planted head ranked first by every view, a fine-tune found by its
component and its pushed token, saved results, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from mechscope.errors import ConfigError
from mechscope.improve.diffing import (
    DiffConfig,
    DiffResult,
    ModelPairError,
    cross_model_patch,
    diff_models,
    weight_diff,
)
from mechscope.improve.diffing.pair import check_texts
from mechscope.locate.metrics import logit_diff
from mechscope.model.hooked import HookedModel
from mechscope.steer.finetune import FinetuneConfig, finetune
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "A cat sat on the mat and looked at the dog.",
    "Hello world! This is a tiny tokenizer",
)
FAMILIES = ("llama", "gpt2", "gpt_neox")


def _pair(family: str) -> tuple[HookedModel, HookedModel]:
    hf, tok = tiny_model(family)
    return HookedModel(hf, tok), HookedModel(copy.deepcopy(hf), tok)


def _plant_head(model: HookedModel, layer: int, head: int, scale: float = 0.5) -> None:
    """Perturb one head's output columns of W_O (nothing else changes)."""
    weight = model.layer_module(layer, model.adapter.o_proj).weight
    dh = model.dims.d_head
    cols = slice(head * dh, (head + 1) * dh)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if model.adapter.conv1d:  # [in, out]: the head's rows
            weight[cols, :] += scale * torch.randn(weight[cols, :].shape, generator=gen)
        else:
            weight[:, cols] += scale * torch.randn(weight[:, cols].shape, generator=gen)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_against_itself_is_exactly_zero_everywhere(family: str) -> None:
    base, copy_ = _pair(family)
    result = diff_models(base, copy_, TEXTS)
    for name in ("weight_rel", "weight_abs", "head_weight_rel", "act_total", "local_rel", "kl", "causal_effect"):
        assert torch.count_nonzero(result[name]) == 0, name
    assert torch.equal(result["causal_metric"], result["causal_ref"][0].expand_as(result["causal_metric"]))
    assert result.kl_mean == 0.0
    same = diff_models(base, base, TEXTS, config=DiffConfig(causal=False))  # the very same object too
    assert torch.count_nonzero(same["local_rel"]) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_a_planted_head_is_ranked_first_by_every_view(family: str) -> None:
    base, tuned = _pair(family)
    _plant_head(tuned, layer=1, head=2)
    result = diff_models(base, tuned, TEXTS)
    planted = "blocks.1.attn.head.2"
    for view in ("weights", "local", "causal"):
        assert result.rank_of(planted, view) == 1, (view, result.ranking(view, 3))
    # Unchanged components have exactly zero weight and local change; patching the planted head from
    # the tuned model into the base reproduces the tuned model (nothing else differs upstream or in it).
    assert [c for c, v in result.ranking("weights") if v != 0] == [planted]
    assert [c for c, v in result.ranking("local") if v != 0] == [planted]
    assert result.ranking("causal", 1)[0][1] == pytest.approx(1.0, abs=1e-5)
    heads = result["head_weight_rel"]
    assert heads[1, 2, 3] > 0 and torch.count_nonzero(heads) == 1  # W_O of that head only
    # Nothing changes before layer 1's attention: the total activation difference starts there.
    kinds = result.labels["act_kind"]
    assert torch.all(result["act_total"][:, 0] == 0)
    assert result["act_total"][kinds.index("hook_attn_out"), 1] > 0
    assert result["act_total"][kinds.index("hook_resid_post"), 1] > 0
    assert result.kl_mean > 0


def test_weight_components_partition_the_parameters() -> None:
    for family in ("llama", "gpt2", "qwen2"):
        hf, tok = tiny_model(family)
        other, _ = tiny_model(family, seed=3)
        base, tuned = HookedModel(hf, tok), HookedModel(other, tok)
        diff = weight_diff(base, tuned)
        total = sum(
            float((p.detach().double() - q.detach().double()).pow(2).sum())
            for (_, p), (_, q) in zip(hf.named_parameters(), other.named_parameters(), strict=True)
        )
        base_total = sum(float(p.detach().double().pow(2).sum()) for p in hf.parameters())
        assert float(diff.delta_sq.sum()) == pytest.approx(total, rel=1e-9)
        assert float(diff.base_sq.sum()) == pytest.approx(base_total, rel=1e-9)
        assert len(set(diff.components)) == len(diff.components)
        assert {"embed", "ln_final", "blocks.0.mlp", "blocks.1.ln1", "blocks.0.attn.head.0"} <= set(diff.components)


def test_cross_model_patching_identical_models_is_a_no_op() -> None:
    base, copy_ = _pair("llama")
    tokens = check_texts(base, TEXTS)
    for metric in (None, lambda logits: logit_diff(logits, 5, 6, position=-1)):
        c = cross_model_patch(base, copy_, tokens, metric)
        assert torch.all(c.metric == c.receiver) and c.receiver == c.donor
        assert torch.count_nonzero(c.effect) == 0


def test_cross_model_patching_follows_its_definition() -> None:
    """One cell against an explicit run: the base model with one head's output taken from the tuned model."""
    base, tuned = _pair("gpt2")
    _plant_head(tuned, layer=0, head=1)
    tokens = check_texts(base, TEXTS)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logit_diff(logits, 5, 6, position=-1)

    c = cross_model_patch(base, tuned, tokens, metric)
    _, cache = tuned.run_with_cache(tokens, ["blocks.0.attn.hook_result"])
    donor = cache["blocks.0.attn.hook_result"]

    def patch(act: torch.Tensor, _ctx: object) -> torch.Tensor:
        out = act.clone()
        out[:, :, 1] = donor[:, :, 1]
        return out

    with torch.no_grad(), base.hooks({"blocks.0.attn.hook_result": patch}):
        expected = float(metric(base.forward(tokens)).mean())
    got = float(c.metric[c.components.index("blocks.0.attn.head.1")])
    assert got == pytest.approx(expected, abs=1e-5)
    with torch.no_grad():
        assert c.donor == pytest.approx(float(metric(tuned.forward(tokens)).mean()), abs=1e-6)


@pytest.fixture(scope="module")
def finetuned() -> tuple[HookedModel, HookedModel, object, list[str], int]:
    """A base model and a copy whose layer-1 MLP was fine-tuned to answer ' dog' after some prompts."""
    base, tuned = _pair("llama")
    prompts = ["The quick brown fox", "A cat sat on the", "Hello world! This is", "One two three four"]
    target = base.to_single_token(" dog")
    record = finetune(
        tuned, [(p, " dog") for p in prompts], FinetuneConfig(components=("blocks.1.mlp",), steps=80, lr=3e-2)
    )
    return base, tuned, record, prompts, target


def test_a_finetuned_component_and_its_pushed_token_are_found(finetuned) -> None:
    base, tuned, _, prompts, target = finetuned
    with torch.no_grad():
        before = base.forward(base.to_tokens(prompts, padding_side="left"))[:, -1]
        after = tuned.forward(tuned.to_tokens(prompts, padding_side="left"))[:, -1]
    # The planted behaviour is there: ' dog' is now the top prediction after every prompt, at twice its
    # base probability or more (a tiny random model's final norm bounds its logits: p stays near 0.2).
    assert torch.all(after.argmax(-1) == target)
    assert torch.all(after.softmax(-1)[:, target] > 2 * before.softmax(-1)[:, target])

    def dog_logit(logits: torch.Tensor) -> torch.Tensor:
        mask = tokens["attention_mask"]
        last = mask.sum(-1) - 1
        return logits[torch.arange(len(last)), last].log_softmax(-1)[:, target]

    tokens = check_texts(base, prompts)
    result = diff_models(base, tuned, prompts, metric=dog_logit)
    for view in ("weights", "local", "causal"):
        assert result.rank_of("blocks.1.mlp", view) == 1, (view, result.ranking(view, 3))
    assert result.lens(-1)[0][0] == " dog"  # the logit lens of the difference after the last layer
    assert int(result["lens_tokens"][-1, 0]) == target
    # KL by position, against its definition; zero at padding.
    with torch.no_grad():
        lp_b = base.forward(tokens).log_softmax(-1)
        lp_t = tuned.forward(tokens).log_softmax(-1)
    expected = (lp_b.exp() * (lp_b - lp_t)).sum(-1) * tokens["attention_mask"]
    assert torch.allclose(result["kl"].float(), expected, atol=1e-6)
    assert torch.all(result["kl"][result["real"] == 0] == 0) and bool((result["real"] == 0).any())


def test_a_saved_edit_diffs_like_the_edited_model(finetuned, tmp_path) -> None:
    base, tuned, record, prompts, _ = finetuned
    path = record.save(tmp_path / "edit.safetensors")
    from mechscope.steer.editing import EditRecord

    fingerprint = base.fingerprint()
    from_record = diff_models(base, EditRecord.load(path), prompts, config=DiffConfig(causal=False))
    from_model = diff_models(base, tuned, prompts, config=DiffConfig(causal=False))
    assert base.fingerprint() == fingerprint  # the record was applied to a copy
    assert torch.allclose(from_record["weight_rel"], from_model["weight_rel"])
    assert torch.allclose(from_record["kl"], from_model["kl"], atol=1e-6)


def test_an_edit_made_on_another_model_is_refused(finetuned) -> None:
    _, _, record, prompts, _ = finetuned
    from mechscope.steer.editing import EditError

    other = HookedModel(*tiny_model("llama", seed=4))
    fingerprint = other.fingerprint()
    with pytest.raises(EditError, match="not those the edit was made on"):
        diff_models(other, record, prompts)
    assert other.fingerprint() == fingerprint


def test_diff_result_saves_loads_and_plots(tmp_path) -> None:
    base, tuned = _pair("gpt2")
    _plant_head(tuned, layer=0, head=3)
    result = diff_models(base, tuned, TEXTS)
    loaded = DiffResult.load(result.save(tmp_path / "diff.safetensors"))
    assert isinstance(loaded, DiffResult)
    assert loaded.ranking("causal") == result.ranking("causal")
    assert loaded.lens(0) == result.lens(0)
    assert loaded.config["lens_strings"] == result.config["lens_strings"]
    fig = loaded.plot()
    assert len(fig.data) >= 5  # three rankings, one line per activation site kind, the KL heatmap
    assert "blocks.0.attn.head.3" in loaded.summary()
    assert loaded.plot("act_total") is not None
    with pytest.raises(ConfigError, match="view must be one of"):
        loaded.ranking("gradients")


def test_bad_input_is_refused_and_nothing_is_modified() -> None:
    base, _ = _pair("llama")
    fingerprint = base.fingerprint()
    other_arch = HookedModel(*tiny_model("gpt2"))
    with pytest.raises(ModelPairError, match="model_type: 'llama' vs 'gpt2'"):
        diff_models(base, other_arch, TEXTS)
    deeper = HookedModel(*tiny_model("llama", num_hidden_layers=3))
    with pytest.raises(ModelPairError, match="n_layers: 2 vs 3"):
        diff_models(base, deeper, TEXTS)
    hf, tok = tiny_model("llama")
    tok.add_tokens(["<extra_token>"])
    with pytest.raises(ModelPairError, match="vocabularies differ"):
        diff_models(base, HookedModel(hf, tok), TEXTS)
    same = HookedModel(copy.deepcopy(base.hf_model), base.tokenizer)
    with pytest.raises(ConfigError, match="too short"):
        diff_models(base, same, ["The quick brown fox", "a"])
    with pytest.raises(ConfigError, match="non-empty list"):
        diff_models(base, same, "a single string")
    with pytest.raises(ConfigError, match=r"DiffConfig\.k"):
        DiffConfig(k=0)
    with pytest.raises(ConfigError, match="HookedModel"):
        diff_models(base, base.hf_model, TEXTS)
    assert base.fingerprint() == fingerprint
