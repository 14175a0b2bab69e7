"""Activation patching scored on a site's activation (SiteMetric): batched = loop = a hand-built patched
run, cells after the site keep the base value, the runs stop at the site, and logit verbs refuse it."""

from __future__ import annotations

import pytest
import torch
from patch_pairs import prompts

from mechscope.errors import ConfigError, SiteError
from mechscope.locate.attribution_patching import attribution_patch
from mechscope.locate.patching import activation_patch
from mechscope.locate.path_patching import path_patch
from mechscope.metrics import MetricError, SiteMetric
from mechscope.model.hooked import HookedModel
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    overrides = {"n_layer": 4} if request.param == "gpt2" else {"num_hidden_layers": 4}
    return HookedModel(tiny_model(request.param, with_tokenizer=False, **overrides)[0])


def _probe(model: HookedModel, site: str = "blocks.2.hook_resid_post") -> SiteMetric:
    """A linear probe's score at the last position of `site` (one value per row)."""
    direction = torch.randn(model.dims.d_model, generator=torch.Generator().manual_seed(1))
    return SiteMetric(site, lambda act: act[:, -1] @ direction)


def _by_hand(model, base_tokens, source_tokens, patch_site, pos, metric, head=None):
    """The metric of one patched forward built from hooks (no engine): the base run with `patch_site`
    taken from the source run at `pos` (and `head`), read at the metric's site."""
    _, source = model.run_with_cache(source_tokens, sites=[patch_site])
    got = {}

    def patch(act, _ctx):
        out = act.clone()
        index = (slice(None), pos) if head is None else (slice(None), pos, head)
        out[index] = source[patch_site][index]
        return out

    def read(act, _ctx):
        got["act"] = act.detach()

    with torch.no_grad(), model.hooks({patch_site: patch}), model.hooks({metric.site.name: read}):
        model(base_tokens)
    return metric.rows(got["act"]).mean()


@pytest.mark.parametrize("kind", ["resid_pre", "mlp_out", "heads"])
def test_batched_equals_loop_equals_a_hand_built_run(model, kind):
    clean, corrupt = prompts()
    metric = _probe(model)
    per = {"per_position": True} if kind == "heads" else {}
    batched = activation_patch(model, clean, corrupt, kind, metric, chunk_size=5, **per)
    loop = activation_patch(model, clean, corrupt, kind, metric, method="loop", **per)
    torch.testing.assert_close(batched["metric"], loop["metric"], rtol=1e-5, atol=1e-5)
    assert batched.config["metric_site"] == "blocks.2.hook_resid_post"
    site = {
        "resid_pre": "blocks.1.hook_resid_pre",
        "mlp_out": "blocks.1.hook_mlp_out",
        "heads": "blocks.1.attn.hook_z",
    }[kind]
    head = 2 if kind == "heads" else None
    expected = _by_hand(model, corrupt, clean, site, 4, metric, head)
    got = batched["metric"][1, 2, 4] if kind == "heads" else batched["metric"][1, 4]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the unpatched values: the probe on each run's own activation
    _, runs = model.run_with_cache(clean, sites=[metric.site.name])
    torch.testing.assert_close(batched["clean"], metric.rows(runs[metric.site.name]).mean())


def test_cells_after_the_site_keep_the_base_value_and_the_site_itself_counts(model):
    clean, corrupt = prompts()
    metric = _probe(model, "blocks.1.hook_resid_post")
    result = activation_patch(model, clean, corrupt, "resid_post", metric)
    base = result["corrupt"]  # denoising: the corrupted run is the base
    assert torch.equal(result["metric"][2:], base.expand_as(result["metric"][2:])), "layers after the site"
    # patching the site itself at the last position sets the probe to its clean value exactly
    torch.testing.assert_close(result["metric"][1, -1], result["clean"], rtol=0, atol=1e-6)
    assert not torch.allclose(result["metric"][0, 2], base, atol=1e-6), "an earlier cell that matters"


def test_patched_runs_stop_at_the_site(model):
    """No layer after the metric's site runs: a hook on a later layer never fires."""
    clean, corrupt = prompts()
    fired = []
    late = {"blocks.3.hook_resid_pre": lambda act, ctx: fired.append(ctx.name)}
    metric = _probe(model, "blocks.1.hook_resid_post")
    with model.hooks(late):
        fired.clear()
        activation_patch(model, clean, corrupt, "resid_pre", metric)
        during_base_runs = len(fired)  # the two unpatched runs are full forwards
        activation_patch(model, clean, corrupt, "resid_pre", metric, method="loop")
    assert during_base_runs == 2 and len(fired) == 4


def test_logit_verbs_refuse_a_site_metric_and_bad_site_metrics_fail_clearly(model):
    clean, corrupt = prompts()
    metric = _probe(model)
    with pytest.raises(MetricError, match=r"reads the activation of blocks\.2\.hook_resid_post, not logits"):
        path_patch(model, clean, corrupt, metric)
    with pytest.raises(MetricError, match="not logits"):
        attribution_patch(model, clean, corrupt, metric)
    with pytest.raises(SiteError):
        activation_patch(model, clean, corrupt, "resid_pre", SiteMetric("blocks.9.hook_resid_post", lambda a: a.sum()))
    with pytest.raises(ConfigError, match="inside the blocks"):
        SiteMetric("logits", lambda a: a.sum())
    with pytest.raises(ConfigError, match="callable"):
        SiteMetric("blocks.0.hook_resid_post", 3)
    wrong = SiteMetric("blocks.1.hook_resid_post", lambda a: a[:, -1])  # [batch, d_model], not [batch]
    with pytest.raises(MetricError, match=r"must return a scalar or \[batch\]=\(2,\); got shape \(2, "):
        activation_patch(model, clean, corrupt, "resid_pre", wrong)
