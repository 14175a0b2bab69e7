"""Path patching: no-op on identical prompts, its definition through the residual stream, receivers."""

from __future__ import annotations

import pytest
import torch
from patch_pairs import metric, prompts

from mechscope.errors import ConfigError, SiteError
from mechscope.locate.patching import PromptMismatchError, activation_patch
from mechscope.locate.path_patching import PathPatchResult, Receiver, path_patch
from mechscope.model.hooked import HookedModel
from mechscope.sites import Site
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module", params=["gpt2", "llama", "gpt_neox"])
def model(request):
    return HookedModel(tiny_model(request.param, with_tokenizer=False)[0])


def test_identical_prompts_change_nothing(model):
    clean, _ = prompts()
    for receivers in ("logits", [(1, 0, "q"), (1, 1, "k"), (1, 0, "v")]):
        result = path_patch(model, clean, clean, metric, receivers=receivers)
        torch.testing.assert_close(result["metric"], result["clean"].expand_as(result["metric"]), rtol=0, atol=1e-6)


def test_path_to_logits_is_the_senders_change_alone_in_an_otherwise_frozen_run(model):
    """Definition: every head but the sender and every MLP keep their base values, so the run equals
    one whose attention outputs are the base ones except the sender's layer, recomputed with the sender patched."""
    clean, corrupt = prompts()
    result = path_patch(model, clean, corrupt, metric, chunk_size=3)
    _, base = model.run_with_cache(clean, sites=["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"])
    _, source = model.run_with_cache(corrupt, sites=["blocks.0.attn.hook_z"])
    mlps = [Site("hook_mlp_out", layer) for layer in range(model.dims.n_layers)]
    _, base_mlp = model.run_with_cache(clean, sites=mlps)
    for head in (0, 3):

        def sender(z, ctx, head=head):
            out = z.clone()
            out[:, :, head] = source["blocks.0.attn.hook_z"][:, :, head]
            return out

        hooks = {"blocks.0.attn.hook_z": sender, "blocks.1.attn.hook_z": lambda z, ctx: base["blocks.1.attn.hook_z"]}
        hooks.update({site: (lambda a, ctx, s=site: base_mlp[s.name]) for site in mlps})
        with torch.no_grad(), model.hooks(hooks):
            expected = metric(model(clean)).mean()
        torch.testing.assert_close(result["metric"][0, head], expected, rtol=1e-5, atol=1e-5)


def test_last_layer_senders_equal_activation_patching_when_nothing_follows(model):
    clean, corrupt = prompts()
    result = path_patch(model, clean, corrupt, metric, freeze_mlps=False)
    patched = activation_patch(model, clean, corrupt, "heads", metric, direction="noising")
    torch.testing.assert_close(result["metric"][-1], patched["metric"][-1], rtol=1e-5, atol=1e-5)
    if model.dims.parallel:  # the last MLP does not read the attention output: freezing it changes nothing
        frozen = path_patch(model, clean, corrupt, metric)
        torch.testing.assert_close(frozen["metric"][-1], patched["metric"][-1], rtol=1e-5, atol=1e-5)


def test_receivers_only_hear_earlier_senders(model, tmp_path):
    clean, corrupt = prompts()
    result = path_patch(model, clean, corrupt, metric, receivers=[Receiver(1, 0, "q"), Receiver(1, 1, "v")])
    torch.testing.assert_close(result["metric"][1], result["clean"].expand(model.dims.n_heads), rtol=0, atol=1e-6)
    assert not torch.allclose(result["metric"][0], result["clean"].expand(model.dims.n_heads), atol=1e-6)
    back = PathPatchResult.load(result.save(tmp_path / "pp.safetensors"))
    assert back.config["receivers"] == [[1, 0, "q"], [1, 1, "v"]]
    torch.testing.assert_close(back.effect(), result["metric"] - result["clean"])


def test_bad_input_fails_clearly(model):
    clean, corrupt = prompts()
    with pytest.raises(PromptMismatchError):
        path_patch(model, clean, corrupt[:, :4], metric)
    with pytest.raises(ConfigError, match="receiver input"):
        path_patch(model, clean, corrupt, metric, receivers=[(1, 0, "o")])
    with pytest.raises(ConfigError, match="heads of this model"):
        path_patch(model, clean, corrupt, metric, receivers=[(1, 40, "q")])
    with pytest.raises(SiteError):
        path_patch(model, clean, corrupt, metric, receivers=[(7, 0, "q")])
    with pytest.raises(ConfigError, match="'logits'"):
        path_patch(model, clean, corrupt, metric, receivers="mlp")


def test_sender_sets(model):
    clean, corrupt = prompts()
    single = path_patch(model, clean, corrupt, metric)
    sets = path_patch(model, clean, corrupt, metric, senders=[[(0, 1)], [(1, 2)], [(1, 0), (1, 3)]])
    assert sets.axes["metric"] == ("sender",) and sets.labels["sender"][2] == "L1H0+L1H3"
    torch.testing.assert_close(sets["metric"][:2], torch.stack([single["metric"][0, 1], single["metric"][1, 2]]))
    # The last layer's heads as one set, MLPs recomputing: nothing follows, so it is the patch of
    # that layer's hook_z from the corrupted run.
    last = model.dims.n_layers - 1
    every = [(last, h) for h in range(model.dims.n_heads)]
    result = path_patch(model, clean, corrupt, metric, senders=[every], freeze_mlps=False)
    _, source = model.run_with_cache(corrupt, sites=[f"blocks.{last}.attn.hook_z"])
    with torch.no_grad(), model.hooks({f"blocks.{last}.attn.hook_z": lambda z, ctx: source[ctx.name]}):
        expected = metric(model(clean)).mean()
    torch.testing.assert_close(result["metric"][0], expected, rtol=1e-5, atol=1e-5)


def test_effects_of_sender_sets_add_up_when_the_logits_are_linear_in_them():
    from torch import nn

    model = HookedModel(tiny_model("gpt_neox", with_tokenizer=False)[0])  # parallel blocks
    parent, _, attr = model.adapter.final_norm.rpartition(".")
    setattr(model.module(parent), attr, nn.Identity())  # logits linear in the last layer's heads
    clean, corrupt = prompts()
    result = path_patch(model, clean, corrupt, metric, senders=[[(1, 0)], [(1, 2)], [(1, 0), (1, 2)]])
    effect = result.effect()
    torch.testing.assert_close(effect[2], effect[0] + effect[1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="sender set"):
        path_patch(model, clean, corrupt, metric, senders=[[(5, 0)]])


def _frozen_reference(model, clean, corrupt, metric_fn, group, freeze_mlps):
    """The definition as one full forward: every head's output fixed at its clean value except the
    senders' (from the corrupted run), and every MLP's output fixed too when `freeze_mlps`."""
    layers = range(model.dims.n_layers)
    z = [f"blocks.{layer}.attn.hook_z" for layer in layers]
    mlps = [f"blocks.{layer}.hook_mlp_out" for layer in layers]
    _, base = model.run_with_cache(clean, sites=z + mlps)
    _, source = model.run_with_cache(corrupt, sites=z)
    hooks = {}
    for layer in layers:
        heads = [h for sl, h in group if sl == layer]

        def fixed(_a, _ctx, name=z[layer], heads=heads):
            out = base[name].clone()
            out[:, :, heads] = source[name][:, :, heads]
            return out

        hooks[z[layer]] = fixed
        if freeze_mlps:
            hooks[mlps[layer]] = lambda _a, _ctx, name=mlps[layer]: base[name]
    with torch.no_grad(), model.hooks(hooks):
        return metric_fn(model(clean)).mean()


def _two_positions(logits):
    """Reads two positions of each row: runs to the logits take the full-logits route."""
    return logits[:, -2:, 5].sum(-1) - logits[:, -1, 7]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3_text", "gpt_neox"])
@pytest.mark.parametrize("freeze_mlps", [True, False])
def test_short_runs_to_the_logits_equal_the_frozen_forward_at_every_depth(family, freeze_mlps):
    """Runs to the logits start at the first position read, and with frozen MLPs stop after the last
    sender's layer: on a 4-layer model, senders in every layer (and a set spanning two) against the
    definition run in full, for a metric reading one position per row and one reading two."""
    overrides = {"n_layer": 4} if family == "gpt2" else {"num_hidden_layers": 4}
    if family == "gemma3_text":
        overrides["layer_types"] = ["sliding_attention", "full_attention"] * 2
    model = HookedModel(tiny_model(family, with_tokenizer=False, **overrides)[0])
    clean, corrupt = prompts()
    groups = [[(0, 1)], [(1, 0), (3, 2)], [(2, 3)], [(3, 1)]]
    for metric_fn in (metric, _two_positions):
        result = path_patch(model, clean, corrupt, metric_fn, senders=groups, freeze_mlps=freeze_mlps, chunk_size=2)
        expected = torch.stack(
            [_frozen_reference(model, clean, corrupt, metric_fn, group, freeze_mlps) for group in groups]
        )
        torch.testing.assert_close(result["metric"], expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(result["metric"], result["clean"].expand(len(groups)), atol=1e-4)
