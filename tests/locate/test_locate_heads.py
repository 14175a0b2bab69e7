"""Head detectors score constructed patterns exactly; patterns are causal distributions; ablation hooks."""

from __future__ import annotations

import copy

import pytest
import torch

from mechscope.errors import ConfigError, ShapeError
from mechscope.locate import heads as heads_module
from mechscope.locate.heads import (
    HeadDetectorConfig,
    HeadScores,
    PatternResult,
    ablate_heads,
    attention_patterns,
    copying_scores,
    detect_heads,
    in_context_gain,
    ordinary_token_ids,
    random_tokens,
    repeated_tokens,
)
from mechscope.locate.results import Result
from mechscope.model.hooked import HookedModel
from mechscope.sites import Site
from tiny_models import BOS, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

HALF = 6


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    hf, tok = tiny_model(request.param)
    return HookedModel(hf, tok)


def distinct_repeated(n: int = 3) -> torch.Tensor:
    """Sequences of HALF distinct tokens, repeated: every behaviour has exactly one target key."""
    gen = torch.Generator().manual_seed(0)
    halves = torch.stack([torch.randperm(90, generator=gen)[:HALF] + 4 for _ in range(n)])
    return torch.cat([halves, halves], dim=1)


def forced_pattern(offset_fn):
    """A hook setting every head's pattern to a one-hot on key offset_fn(q) (or q itself if invalid)."""

    def fn(pattern, _ctx):
        n = pattern.shape[-1]
        out = torch.zeros_like(pattern)
        for q in range(n):
            k = offset_fn(q)
            out[..., q, k if 0 <= k <= q else q] = 1.0
        return out

    return fn


@pytest.mark.parametrize(
    ("kind", "offset"),
    [
        ("previous_token", lambda q: q - 1),
        ("duplicate_token", lambda q: q - HALF),
        ("induction", lambda q: q - HALF + 1),
    ],
)
def test_a_head_with_the_ideal_pattern_scores_one_and_others_do_not(model, kind, offset):
    sites = {Site("attn.hook_pattern", 0): forced_pattern(offset)}
    with model.hooks(sites):
        scores = detect_heads(model, distinct_repeated(), config=HeadDetectorConfig(n_copy_tokens=20))
    torch.testing.assert_close(scores[kind][0], torch.ones(model.dims.n_heads))
    others = [k for k in ("previous_token", "duplicate_token", "induction") if k != kind]
    for other in others:
        assert scores[other][0].max() < 1e-6
    assert scores[kind][1].max() < 0.99  # the untouched layer is not ideal
    # a pattern that ignores content is purely positional: no excess over fresh random tokens
    for excess in ("duplicate_token_excess", "induction_excess"):
        assert scores[excess][0].abs().max() < 1e-6


def test_generated_sequences_start_as_text_does_and_the_control_keeps_the_start(model, monkeypatch):
    # The tiny tokenizer prepends <bos> (as Gemma's and Llama's do): random sequences start with it, and the
    # positional control of detect_heads replaces content tokens only, never the <bos>.
    tokens = repeated_tokens(model, n=3, half_len=5, seed=1)
    assert tokens.shape == (3, 11) and bool((tokens[:, 0] == BOS).all())
    assert torch.equal(tokens[:, 1:6], tokens[:, 6:]) and not bool((tokens[:, 1:] == BOS).any())
    seen = []
    original = heads_module._patterns
    monkeypatch.setattr(
        heads_module, "_patterns", lambda m, batch: seen.append(batch["input_ids"]) or original(m, batch)
    )
    detect_heads(model, tokens, config=HeadDetectorConfig(n_copy_tokens=20))
    real, control = seen
    assert bool((control[:, 0] == BOS).all()) and not torch.equal(control[:, 1:], real[:, 1:])
    without = HookedModel(model.hf_model, None)
    assert repeated_tokens(without, n=3, half_len=5, seed=1).shape == (3, 10)  # no tokenizer, no prefix


def test_random_text_never_draws_special_tokens_or_ids_past_the_tokenizer():
    # Gemma 3 adds 6,249 special tokens (<unused...>, turn and image markers) above its ordinary vocabulary;
    # here two added special tokens and one added ordinary token play them, and the model's vocabulary (128)
    # is padded past the tokenizer's length, as many checkpoints' are.
    hf, tok = tiny_model("gemma3_text")
    tok = copy.deepcopy(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<unused0>", "<start_of_turn>"]})
    tok.add_tokens(["<b>"])
    model = HookedModel(hf, tok)
    unused, turn, bold = tok.convert_tokens_to_ids(["<unused0>", "<start_of_turn>", "<b>"])
    assert len(tok) < model.dims.d_vocab
    ids = set(ordinary_token_ids(model).tolist())
    assert unused not in ids and turn not in ids and not ids & set(tok.all_special_ids)
    assert bold in ids and max(ids) == len(tok) - 1
    drawn = random_tokens(model, (64, 64), torch.Generator().manual_seed(0))
    assert set(drawn.unique().tolist()) <= ids and len(drawn.unique()) > 0.9 * len(ids)
    assert set(repeated_tokens(model, n=8, half_len=16)[:, 1:].unique().tolist()) <= ids
    drawn_all = copying_scores(model, n=len(ids) + 10, top_k=3)  # candidates: every ordinary token, no other
    for got, want in zip(drawn_all, copying_scores(model, tokens=sorted(ids), top_k=3), strict=True):
        torch.testing.assert_close(got, want)
    without = HookedModel(hf, None)
    assert torch.equal(ordinary_token_ids(without), torch.arange(model.dims.d_vocab))


def test_scores_are_bounded_and_results_save_load_plot(model, tmp_path):
    scores = detect_heads(model, config=HeadDetectorConfig(n_sequences=4, half_len=5, n_copy_tokens=30))
    d = model.dims
    for name in ("previous_token", "duplicate_token", "induction", "copying"):
        assert scores[name].shape == (d.n_layers, d.n_heads)
        assert (scores[name] >= 0).all() and (scores[name] <= 1 + 1e-6).all()
    for name in ("copying_eigen", "induction_excess", "duplicate_token_excess"):
        assert (scores[name].abs() <= 1 + 1e-6).all()
    loaded = Result.load(scores.save(tmp_path / "heads.safetensors"))
    assert isinstance(loaded, HeadScores) and loaded.top("previous_token", 2) == scores.top("previous_token", 2)
    assert loaded.plot() is not None


def test_copying_scores_are_bounded_and_need_enough_candidates(model):
    d = model.dims
    rate, eigen = copying_scores(model, n=40, top_k=1)
    assert rate.shape == (d.n_layers, d.n_heads)
    assert ((rate >= 0) & (rate <= 1)).all() and ((eigen >= -1) & (eigen <= 1)).all()
    with pytest.raises(ConfigError):
        copying_scores(model, tokens=[5, 6], top_k=5)


def test_patterns_are_causal_distributions_and_the_view_has_one_trace_per_head(model):
    result = attention_patterns(model, "The cat sat on the mat.")
    pattern = result["pattern"]
    d = model.dims
    n = pattern.shape[-1]
    assert pattern.shape == (d.n_layers, d.n_heads, n, n)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(d.n_layers, d.n_heads, n))
    assert pattern.triu(1).abs().max() == 0
    fig = result.plot()
    assert len(fig.data) == d.n_layers * d.n_heads and len(fig.layout.updatemenus[0].buttons) == len(fig.data)
    assert isinstance(result, PatternResult) and result.labels["query_pos"][0].startswith("0:")


def test_zero_and_mean_ablation_set_the_heads_z(model):
    x = distinct_repeated()
    before = model(x)
    with ablate_heads(model, [(1, 0), (1, 2)]):
        _, cache = model.run_with_cache(x, ["blocks.1.attn.hook_z"])
    z = cache["blocks.1.attn.hook_z"]
    assert z[:, :, [0, 2]].abs().max() == 0 and z[:, :, 1].abs().max() > 0
    ref = repeated_tokens(model, n=2, half_len=4, seed=3)
    _, ref_cache = model.run_with_cache(ref, ["blocks.0.attn.hook_z"])
    with ablate_heads(model, [(0, 1)], mode="mean", reference=ref):
        _, cache = model.run_with_cache(x, ["blocks.0.attn.hook_z"])
    assert bool((ref[:, 0] == model.tokenizer.bos_token_id).all())  # the mean leaves the BOS out
    expected = ref_cache["blocks.0.attn.hook_z"][:, 1:, 1].mean((0, 1))
    torch.testing.assert_close(cache["blocks.0.attn.hook_z"][:, :, 1], expected.expand(3, 2 * HALF, -1))
    # hooks are gone after the block
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_in_context_gain_reads_targets_from_the_previous_position(model):
    x = distinct_repeated()
    first = torch.zeros_like(x, dtype=torch.bool)
    repeat = torch.zeros_like(x, dtype=torch.bool)
    first[:, 1:HALF] = True
    repeat[:, HALF + 1 :] = True
    out = in_context_gain(model, x, first, repeat)
    with torch.no_grad():
        logits = model(x)[:, :-1]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
    assert out["loss_first"] == pytest.approx(float(losses[:, : HALF - 1].mean()), rel=1e-5)
    assert out["gain"] == pytest.approx(out["loss_first"] - out["loss_repeat"])
    with pytest.raises(ShapeError):
        in_context_gain(model, x, first[:, :-1], repeat)


def test_bad_input_is_rejected(model):
    with pytest.raises(ConfigError, match="does not exist"), ablate_heads(model, [(5, 0)]):
        pass
    with pytest.raises(ConfigError, match="reference"), ablate_heads(model, [(0, 0)], mode="mean"):
        pass
    with pytest.raises(ConfigError, match="mode"), ablate_heads(model, [(0, 0)], mode="resample"):  # type: ignore[arg-type]
        pass
    no_repeats = torch.arange(4, 14)[None]
    with pytest.raises(ConfigError, match="no query"):
        detect_heads(model, no_repeats)
    with pytest.raises(ConfigError):
        HeadDetectorConfig(half_len=1)
    with pytest.raises(ConfigError, match="row"):
        attention_patterns(model, "a b", row=3)


def test_cli_heads_and_patterns(tmp_path):
    from typer.testing import CliRunner

    from mechscope.cli.main import app

    hf, tok = tiny_model("llama")
    folder = tmp_path / "llama"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    runner = CliRunner()
    out = runner.invoke(
        app, ["locate", "heads", str(folder), "--n-sequences", "2", "--half-len", "4", "-o", str(tmp_path / "h.st")]
    )
    assert out.exit_code == 0, out.output
    assert "induction" in out.output and isinstance(Result.load(tmp_path / "h.st"), HeadScores)
    html = tmp_path / "view.html"
    out = runner.invoke(
        app, ["locate", "patterns", str(folder), "-p", "The cat sat", "-o", str(tmp_path / "p.st"), "--html", str(html)]
    )
    assert out.exit_code == 0, out.output
    assert html.stat().st_size > 1000 and isinstance(Result.load(tmp_path / "p.st"), PatternResult)


def _copying_reference(model, cand: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, computed the direct way: every head's OV output through the full unembedding,
    then the candidates' columns kept (what copying_scores computed before it projected only those)."""
    d, a = model.dims, model.adapter
    rate, eigen = torch.zeros(d.n_layers, d.n_heads), torch.zeros(d.n_layers, d.n_heads)
    unembed, final_norm = model.module(a.unembed), model.module(a.final_norm)
    with torch.no_grad():
        for layer in range(d.n_layers):
            x = model.layer_module(layer, a.ln1)(model.weights.W_E[cand])
            w_v, w_o = model.weights.W_V_layer(layer), model.weights.W_O_layer(layer)
            b_v = model.weights._expand(model.weights.qkv(layer)[5])
            for h in range(d.n_heads):
                out = (x @ w_v[h] + b_v[h]) @ w_o[h]
                if a.post_attn_norm is not None:
                    out = model.layer_module(layer, a.post_attn_norm)(out)
                logits = unembed(final_norm(out))[:, cand].float()
                rank = (logits > logits.diagonal()[:, None]).sum(-1)
                rate[layer, h] = (rank < top_k).float().mean()
                lam = torch.linalg.eigvals(logits.double())
                eigen[layer, h] = float(lam.real.sum() / lam.abs().sum())
    return rate, eigen


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_copying_scores_project_only_the_candidates_and_match_the_full_unembedding(family):
    model = HookedModel(tiny_model(family, with_tokenizer=False)[0])
    cand = torch.randperm(100, generator=torch.Generator().manual_seed(4))[:30] + 4
    rate, eigen = copying_scores(model, tokens=cand, top_k=3)
    ref_rate, ref_eigen = _copying_reference(model, cand, 3)
    torch.testing.assert_close(rate, ref_rate, rtol=0, atol=1 / 30 + 1e-6)  # a rank tie may flip at most one token
    assert float((rate - ref_rate).abs().mean()) < 0.01
    torch.testing.assert_close(eigen, ref_eigen, rtol=1e-4, atol=1e-5)


def test_low_rank_eigenvalues_equal_the_full_matrix_and_fall_back_when_rank_is_higher():
    from mechscope.locate.heads import _low_rank_eigvals

    gen = torch.Generator().manual_seed(5)
    w_u, b_u = torch.randn(12, 20, generator=gen), torch.randn(20, generator=gen)
    low = torch.randn(3, 20, 4, generator=gen) @ torch.randn(3, 4, 12, generator=gen)  # rank 4 (+1 bias)
    full = torch.randn(3, 20, 12, generator=gen)  # rank 12 + 1 > 8
    for normed in (low, full):
        lam = _low_rank_eigvals(normed, w_u, b_u, rank=8)
        ref = torch.linalg.eigvals((normed @ w_u + b_u).double())
        torch.testing.assert_close(lam.abs().sum(-1), ref.abs().sum(-1), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lam.real.sum(-1), ref.real.sum(-1), rtol=1e-6, atol=1e-6)
