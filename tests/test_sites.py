"""Canonical site names: parsing, formatting, helpers, did-you-mean errors, filters."""

from __future__ import annotations

import functools

import pytest

from mechscope import sites as S
from mechscope.errors import MechscopeError, SiteError
from mechscope.model.hooked import HookedModel
from mechscope.sites import (
    ALL_KINDS,
    ATTENTION_INTERNAL_KINDS,
    BLOCK_KINDS,
    PATTERN_KINDS,
    SITE_AXES,
    Site,
    filter_sites,
    parse_sites,
)
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

#: Every canonical name of the design doc, written out by hand.
DESIGN_BLOCK_KINDS = [
    "hook_resid_pre",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "attn.hook_result",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_pre_linear",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
]
DESIGN_GLOBALS = ["hook_embed", "hook_pos_embed", "ln_final.hook_normalized", "logits"]


@functools.cache
def model(family: str) -> HookedModel:
    return HookedModel(tiny_model(family, with_tokenizer=False)[0])


def test_kind_tables_match_the_design():
    assert list(BLOCK_KINDS) == DESIGN_BLOCK_KINDS  # forward order
    assert sorted(ALL_KINDS) == sorted(DESIGN_BLOCK_KINDS + DESIGN_GLOBALS)
    assert set(SITE_AXES) == set(ALL_KINDS)
    assert {f"attn.hook_{k}" for k in ("q", "k", "v", "attn_scores", "pattern", "z")} == ATTENTION_INTERNAL_KINDS
    assert {"attn.hook_attn_scores", "attn.hook_pattern"} == PATTERN_KINDS


@pytest.mark.parametrize("kind", DESIGN_BLOCK_KINDS)
@pytest.mark.parametrize("layer", [0, 3, 11, 120])
def test_block_names_round_trip(kind, layer):
    name = f"blocks.{layer}.{kind}"
    site = Site.parse(name)
    assert (site.kind, site.layer) == (kind, layer)
    assert site.name == str(site) == name
    assert Site.parse(site) is site
    assert Site.parse(site.name) == site
    assert hash(Site.parse(name)) == hash(Site(kind, layer))
    assert site.is_attention_internal == (kind in ATTENTION_INTERNAL_KINDS)


@pytest.mark.parametrize("kind", DESIGN_GLOBALS)
def test_global_names_round_trip(kind):
    site = Site.parse(kind)
    assert (site.kind, site.layer) == (kind, None)
    assert site.name == str(site) == kind
    assert not site.is_attention_internal


def test_axes_and_position_axis():
    assert Site.parse("blocks.0.hook_resid_post").axes == ("batch", "pos", "d_model")
    assert Site.parse("blocks.0.attn.hook_k").axes == ("batch", "pos", "n_kv_heads", "d_head")
    assert Site.parse("blocks.0.attn.hook_result").axes == ("batch", "pos", "n_heads", "d_model")
    assert Site.parse("blocks.0.attn.hook_pattern").axes == ("batch", "n_heads", "query_pos", "key_pos")
    assert Site.parse("blocks.0.mlp.hook_post").axes == ("batch", "pos", "d_mlp")
    assert Site.parse("logits").axes == ("batch", "pos", "d_vocab")
    assert Site.parse("blocks.0.attn.hook_pattern").pos_axis == 2
    assert Site.parse("blocks.0.attn.hook_attn_scores").pos_axis == 2
    assert Site.parse("blocks.0.attn.hook_z").pos_axis == 1
    assert Site.parse("hook_embed").pos_axis == 1


def test_order_is_forward_order():
    names = ["logits", "blocks.1.hook_resid_pre", "blocks.0.hook_resid_post", "hook_embed", "blocks.0.attn.hook_q"]
    names += ["ln_final.hook_normalized", "hook_pos_embed", "blocks.0.hook_resid_pre", "blocks.10.hook_resid_pre"]
    ordered = [s.name for s in sorted((Site.parse(n) for n in names), key=lambda s: s.order)]
    assert ordered == [
        "hook_embed",
        "hook_pos_embed",
        "blocks.0.hook_resid_pre",
        "blocks.0.attn.hook_q",
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_pre",
        "blocks.10.hook_resid_pre",
        "ln_final.hook_normalized",
        "logits",
    ]


HELPERS = {
    "embed": ("hook_embed", False),
    "pos_embed": ("hook_pos_embed", False),
    "final_norm": ("ln_final.hook_normalized", False),
    "logits": ("logits", False),
    "resid_pre": ("hook_resid_pre", True),
    "resid_mid": ("hook_resid_mid", True),
    "resid_post": ("hook_resid_post", True),
    "attn_out": ("hook_attn_out", True),
    "mlp_out": ("hook_mlp_out", True),
    "q": ("attn.hook_q", True),
    "k": ("attn.hook_k", True),
    "v": ("attn.hook_v", True),
    "attn_scores": ("attn.hook_attn_scores", True),
    "pattern": ("attn.hook_pattern", True),
    "z": ("attn.hook_z", True),
    "result": ("attn.hook_result", True),
    "mlp_pre": ("mlp.hook_pre", True),
    "mlp_pre_linear": ("mlp.hook_pre_linear", True),
    "mlp_post": ("mlp.hook_post", True),
    "ln1": ("ln1.hook_normalized", True),
    "ln2": ("ln2.hook_normalized", True),
}


@pytest.mark.parametrize("helper", sorted(HELPERS))
def test_helper_constructors(helper):
    kind, in_block = HELPERS[helper]
    fn = getattr(S, helper)
    if in_block:
        assert fn(4) == Site(kind, 4)
        assert fn(4).name == f"blocks.4.{kind}"
    else:
        assert fn() == Site(kind)
        assert fn().name == kind


def test_every_kind_has_a_helper():
    assert {kind for kind, _ in HELPERS.values()} == set(ALL_KINDS)


@pytest.mark.parametrize(
    "typo,suggestion",
    [
        ("blocks.0.hook_resid_psot", "blocks.0.hook_resid_post"),
        ("blocks.3.attn.hook_patern", "blocks.3.attn.hook_pattern"),
        ("blocks.2.mlp.hook_psot", "blocks.2.mlp.hook_post"),
        ("hook_embd", "hook_embed"),
        ("ln_final.hook_normalised", "ln_final.hook_normalized"),
        ("blocks.0.hook_resid", "blocks.0.hook_resid_pre"),
    ],
)
def test_unknown_names_suggest_the_closest(typo, suggestion):
    with pytest.raises(SiteError) as info:
        Site.parse(typo)
    message = str(info.value)
    assert repr(typo) in message
    assert f"Did you mean {suggestion!r}" in message or repr(suggestion) in message.split("Did you mean", 1)[1]
    assert isinstance(info.value, MechscopeError) and isinstance(info.value, KeyError)


@pytest.mark.parametrize(
    "bad,fragment",
    [
        ("resid_post", "expected 'blocks.<layer>.<kind>'"),
        ("blocks.x.hook_resid_post", "expected 'blocks.<layer>.<kind>'"),
        ("blocks.-1.hook_resid_post", "expected 'blocks.<layer>.<kind>'"),
        ("", "unknown site ''"),
        ("blocks.0.logits", "unknown site 'blocks.0.logits'"),
    ],
)
def test_malformed_names(bad, fragment):
    with pytest.raises(SiteError, match="unknown site") as info:
        Site.parse(bad)
    assert fragment in str(info.value)


def test_site_constructor_validates():
    with pytest.raises(SiteError, match=r"needs a layer index >= 0; got layer=None"):
        Site("hook_resid_post")
    with pytest.raises(SiteError, match=r"got layer=-2"):
        Site("hook_resid_post", -2)
    with pytest.raises(SiteError, match=r"got layer=True"):
        Site("hook_resid_post", True)
    with pytest.raises(SiteError, match=r"outside the blocks; got layer=0"):
        Site("logits", 0)
    with pytest.raises(SiteError, match=r"unknown site kind 'hook_resid_psot'.*'hook_resid_post'"):
        Site("hook_resid_psot", 0)
    with pytest.raises(SiteError, match="got int"):
        Site.parse(3)  # type: ignore[arg-type]


def test_parse_sites_dedupes_in_order():
    parsed = parse_sites(["blocks.1.attn.hook_z", "hook_embed", Site("hook_embed")])
    assert parsed == [Site("attn.hook_z", 1), Site("hook_embed")]
    assert parse_sites("logits") == [Site("logits")]
    assert parse_sites(Site("logits")) == [Site("logits")]
    with pytest.raises(SiteError):
        parse_sites(["hook_embed", "nope"])


def test_filter_sites():
    everything = [Site(k, layer) for layer in range(3) for k in BLOCK_KINDS] + [Site("hook_embed"), Site("logits")]
    resid = filter_sites(everything, kinds="hook_resid_post")
    assert resid == [Site("hook_resid_post", layer) for layer in range(3)]
    both = filter_sites(everything, kinds=["attn.hook_z", "hook_embed"], layers=[2])
    assert both == [Site("attn.hook_z", 2)]  # layers= drops the global sites
    assert filter_sites(everything, layers=[1]) == [Site(k, 1) for k in BLOCK_KINDS]
    assert filter_sites(everything) == everything
    assert filter_sites(everything, kinds=[]) == []


# Sites on a model ----------------------------------------------------------------------------------------
def test_model_site_validates_against_the_model():
    m = model("llama")
    assert m.site("blocks.1.hook_resid_post") == Site("hook_resid_post", 1)
    assert m.site(Site("logits")) == Site("logits")
    with pytest.raises(SiteError) as info:
        m.site("blocks.2.hook_resid_post")
    assert "past the last layer" in str(info.value) and "0..1" in str(info.value)
    with pytest.raises(SiteError, match="past the last layer"):
        m.site(S.pattern(7))
    with pytest.raises(SiteError, match=r"'hook_pos_embed'"):
        m.site("hook_pos_embed")  # llama has rotary, not learned, positions


@pytest.mark.parametrize(
    "family,absent",
    [
        ("gpt_neox", "blocks.0.hook_resid_mid"),  # parallel attention and MLP
        ("olmo2", "blocks.0.ln1.hook_normalized"),  # post-norms only
        ("olmo2", "blocks.1.ln2.hook_normalized"),
        ("gpt2", "blocks.0.mlp.hook_pre_linear"),  # not gated
        ("llama", "hook_pos_embed"),
    ],
)
def test_model_site_rejects_sites_the_family_lacks(family, absent):
    m = model(family)
    with pytest.raises(SiteError) as info:
        m.site(absent)
    assert repr(absent) in str(info.value)
    assert absent not in m.site_names


def test_model_sites_filter():
    m = model("gpt2")
    assert m.sites(kinds="hook_resid_post") == [S.resid_post(0), S.resid_post(1)]
    assert m.sites(kinds=["attn.hook_pattern"], layers=[1]) == [S.pattern(1)]
    assert m.sites(layers=[0])[0] == S.resid_pre(0)
    assert [s.name for s in m.sites()] == m.site_names
    assert m.site_names[:2] == ["hook_embed", "hook_pos_embed"]
    assert m.site_names[-2:] == ["ln_final.hook_normalized", "logits"]
