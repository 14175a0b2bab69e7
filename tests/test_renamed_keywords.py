"""One name per concept: a site kind is ``kind`` everywhere; the old spellings still work, with a warning."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import ConfigError, renamed_keywords
from mechscope.model.hooked import HookedModel
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    hf, tok = tiny_model("gpt2")
    return HookedModel(hf, tok)


def test_the_decorator_passes_old_keywords_on_under_their_new_name():
    @renamed_keywords(old="new")
    def f(*, new: int = 0) -> int:
        return new

    assert f(new=3) == 3
    with pytest.warns(DeprecationWarning, match=r"f: old= is deprecated; call it new="):
        assert f(old=4) == 4
    with pytest.raises(ConfigError, match=r"give new= \(or the deprecated old=\), not both"):
        f(old=1, new=2)


def test_steering_vectors_take_kind_and_still_read_site(model):
    from mechscope.steer.vectors import from_direction, mean_difference, pca_direction

    pos, neg = ["a good day", "a fine day"], ["a bad day", "a poor day"]
    new = mean_difference(model, pos, neg, layers=1, kind="hook_resid_post")
    with pytest.warns(DeprecationWarning, match="mean_difference: site= is deprecated; call it kind="):
        old = mean_difference(model, pos, neg, layers=1, site="hook_resid_post")
    assert new.site == old.site == "hook_resid_post" and torch.equal(new.directions, old.directions)
    with pytest.warns(DeprecationWarning, match="pca_direction: site="):
        old = pca_direction(model, pos, neg, layers=1, site="hook_resid_post")
    assert torch.equal(pca_direction(model, pos, neg, layers=1, kind="hook_resid_post").directions, old.directions)
    vec = torch.ones(model.dims.d_model)
    with pytest.warns(DeprecationWarning, match="from_direction: site="):
        assert from_direction(model, vec, layers=0, site="hook_resid_mid").site == "hook_resid_mid"


def test_patching_and_probes_take_kind_and_still_read_their_old_names(model):
    from mechscope.locate.patching import activation_patch
    from mechscope.locate.probes import collect_features

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1, 0]

    clean = model.to_tokens(["the cat sat on"])
    corrupt = {**clean, "input_ids": clean["input_ids"].flip(-1)}
    new = activation_patch(model, clean, corrupt, kind="resid_pre", metric=metric)
    with pytest.warns(DeprecationWarning, match="activation_patch: sites_kind= is deprecated"):
        old = activation_patch(model, clean, corrupt, sites_kind="resid_pre", metric=metric)
    assert torch.equal(new["metric"], old["metric"]) and new.config["kind"] == "hook_resid_pre"
    texts = ["one two", "three four five"]
    with pytest.warns(DeprecationWarning, match="collect_features: site_kind= is deprecated"):
        old_f = collect_features(model, texts, site_kind="hook_resid_mid", layers=[0])
    assert torch.equal(collect_features(model, texts, kind="hook_resid_mid", layers=[0]), old_f)
