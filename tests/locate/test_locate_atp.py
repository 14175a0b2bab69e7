"""Attribution patching: exact when the metric is linear in the patched quantity, AtP* pieces, errors."""

from __future__ import annotations

import pytest
import torch
from patch_pairs import metric, prompts
from torch import nn

from mechscope.errors import ConfigError
from mechscope.locate.attribution_patching import AtPConfig, AtPResult, atp_vs_exact, attribution_patch
from mechscope.locate.patching import MetricError, PromptMismatchError, activation_patch
from mechscope.model.hooked import HookedModel
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def linear_tail(family: str) -> HookedModel:
    """A model whose logits are linear in its last layer's heads, queries-through-pattern and neurons:
    a parallel block (attention and MLP read the same input) and no final norm."""
    model = HookedModel(tiny_model(family, with_tokenizer=False)[0])
    parent, _, attr = model.adapter.final_norm.rpartition(".")
    setattr(model.module(parent), attr, nn.Identity())
    return model


def exact_delta(model, kind, direction="denoising"):
    clean, corrupt = prompts()
    result = activation_patch(model, clean, corrupt, kind, metric, direction=direction)
    base = result["corrupt"] if direction == "denoising" else result["clean"]
    return result["metric"] - base


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_atp_equals_exact_patching_where_the_metric_is_linear_in_the_patched_quantity(direction):
    model = linear_tail("gpt_neox")  # parallel residual: the last layer's heads feed the logits linearly
    clean, corrupt = prompts()
    atp = attribution_patch(model, clean, corrupt, metric, AtPConfig(direction=direction, qk_fix=True))
    last = model.dims.n_layers - 1
    for node, kind in (("heads", "heads"), ("neurons", "neurons"), ("v", "v")):
        torch.testing.assert_close(atp[node][last], exact_delta(model, kind, direction)[last], rtol=1e-4, atol=1e-5)
    # The QK fix recomputes the pattern exactly, and the pattern feeds the logits linearly here.
    for node in ("q", "k"):
        torch.testing.assert_close(atp[node][last], exact_delta(model, node, direction)[last], rtol=1e-4, atol=1e-5)
    # Earlier layers are not linear: AtP is an approximation there, but not a wild one.
    assert not torch.allclose(atp["heads"][0], exact_delta(model, "heads", direction)[0], atol=1e-6)


def test_atp_of_neurons_is_exact_without_final_norm_in_a_sequential_model():
    model = linear_tail("llama")
    clean, corrupt = prompts()
    atp = attribution_patch(model, clean, corrupt, metric, AtPConfig(nodes=("neurons",)))
    torch.testing.assert_close(atp["neurons"][-1], exact_delta(model, "neurons")[-1], rtol=1e-4, atol=1e-5)


def test_atp_with_identical_prompts_is_zero_and_result_round_trips(tmp_path):
    model = HookedModel(tiny_model("llama", with_tokenizer=False)[0])
    clean, _ = prompts()
    atp = attribution_patch(model, clean, clean, metric, AtPConfig(qk_fix=True, grad_drop=True, per_position=True))
    for name in ("heads", "neurons", "resid", "q", "k", "v", "heads_pos", "heads_graddrop", "neurons_graddrop"):
        assert torch.count_nonzero(atp[name]) == 0, name
    assert atp.axes["heads_pos"] == ("layer", "head", "pos") and atp["k"].shape == (2, model.dims.n_kv_heads)
    back = AtPResult.load(atp.save(tmp_path / "atp.safetensors"))
    torch.testing.assert_close(back["heads"], atp["heads"])


def test_graddrop_drops_one_layer_at_a_time():
    model = HookedModel(tiny_model("gpt2", with_tokenizer=False)[0])
    clean, corrupt = prompts()
    atp = attribution_patch(model, clean, corrupt, metric, AtPConfig(nodes=("heads",), grad_drop=True))
    # Two layers: dropping layer 1 leaves layer-0 heads their path through the residual only;
    # dropping layer 0 zeroes their gradient. So GradDrop of layer 0 = |AtP without layer 1's path|.
    assert (atp["heads_graddrop"] >= 0).all()
    # Last-layer heads: dropping layer 0 leaves them intact, dropping layer 1 zeroes them.
    torch.testing.assert_close(atp["heads_graddrop"][1], atp["heads"][1].abs(), rtol=1e-5, atol=1e-6)


def test_per_position_heads_sum_to_heads():
    model = HookedModel(tiny_model("qwen2", with_tokenizer=False)[0])
    clean, corrupt = prompts()
    atp = attribution_patch(model, clean, corrupt, metric, AtPConfig(per_position=True))
    torch.testing.assert_close(atp["heads_pos"].sum(-1), atp["heads"], rtol=1e-5, atol=1e-6)


def test_atp_vs_exact_reports_correlation_and_disagreements():
    model = HookedModel(tiny_model("gpt2", with_tokenizer=False)[0])
    clean, corrupt = prompts()
    report = atp_vs_exact(model, clean, corrupt, metric, top=3)
    assert -1 <= report.config["spearman"] <= 1 and len(report.config["top_disagreements"]) == 3
    worst = report.config["top_disagreements"][0]
    assert set(worst) == {"layer", "head", "atp", "exact"}
    gaps = [abs(d["atp"] - d["exact"]) for d in report.config["top_disagreements"]]
    assert gaps == sorted(gaps, reverse=True)


def test_bad_input_fails_clearly():
    model = HookedModel(tiny_model("gpt2", with_tokenizer=False)[0])
    clean, corrupt = prompts()
    with pytest.raises(PromptMismatchError):
        attribution_patch(model, clean, corrupt[:, :5], metric)
    with pytest.raises(MetricError, match="scalar or"):
        attribution_patch(model, clean, corrupt, lambda logits: logits[..., 0])
    with pytest.raises(ConfigError, match="nodes"):
        AtPConfig(nodes=("edges",))
    with pytest.raises(ConfigError, match="direction"):
        AtPConfig(direction="up")


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_graddrop_matches_its_definition(family):
    """GradDrop: mean over dropped layers l of |AtP with the gradient through l's outputs stopped|."""
    model = HookedModel(tiny_model(family, with_tokenizer=False)[0])
    clean, corrupt = prompts()
    atp = attribution_patch(model, clean, corrupt, metric, AtPConfig(nodes=("heads", "neurons"), grad_drop=True))
    n_layers = model.dims.n_layers
    sites = [f"blocks.{layer}.{kind}" for kind in ("attn.hook_z", "mlp.hook_post") for layer in range(n_layers)]
    _, source = model.run_with_cache(clean, sites=sites)
    total = {
        "attn.hook_z": torch.zeros(n_layers, model.dims.n_heads),
        "mlp.hook_post": torch.zeros(n_layers, model.dims.d_mlp),
    }
    for dropped in range(n_layers):
        stop = {f"blocks.{dropped}.{k}": (lambda a, ctx: a.detach()) for k in ("hook_attn_out", "hook_mlp_out")}
        with model.hooks(stop):
            run = model.run_with_grads(corrupt, lambda logits: metric(logits).mean(), sites)
        for kind in total:
            for layer in range(n_layers):
                name = f"blocks.{layer}.{kind}"
                prod = ((source[name] - run.activations[name]) * run.gradients[name]).sum(0)
                per_unit = prod.sum(-1).sum(0) if kind == "attn.hook_z" else prod.sum(0)
                total[kind][layer] += per_unit.abs()
    torch.testing.assert_close(atp["heads_graddrop"], total["attn.hook_z"] / (n_layers - 1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(atp["neurons_graddrop"], total["mlp.hook_post"] / (n_layers - 1), rtol=1e-4, atol=1e-6)
