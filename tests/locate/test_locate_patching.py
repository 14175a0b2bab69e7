"""Activation patching: self-patching is a no-op, batched == loop, last-layer denoising recovers clean."""

from __future__ import annotations

import pytest
import torch
from patch_pairs import metric, prompts

from mechscope.errors import ConfigError, SiteError
from mechscope.locate.metrics import logit_diff
from mechscope.locate.patching import MetricError, PatchResult, PromptMismatchError, activation_patch
from mechscope.model.hooked import HookedModel
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

KINDS = ["resid_pre", "resid_post", "attn_out", "mlp_out", "heads"]


@pytest.fixture(scope="module", params=["gpt2", "llama", "gpt_neox"])
def model(request):
    return HookedModel(tiny_model(request.param, with_tokenizer=False)[0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["loop", "batched"])
def test_patching_a_run_with_itself_is_a_no_op(model, kind, method):
    clean, _ = prompts()
    result = activation_patch(model, clean, clean, kind, metric, method=method, chunk_size=5)
    torch.testing.assert_close(result["metric"], result["clean"].expand_as(result["metric"]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_batched_equals_loop(model, kind, direction):
    clean, corrupt = prompts()
    loop = activation_patch(model, clean, corrupt, kind, metric, direction=direction, method="loop")
    batched = activation_patch(model, clean, corrupt, kind, metric, direction=direction, chunk_size=5)
    torch.testing.assert_close(batched["metric"], loop["metric"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(loop["metric"], loop["corrupt"] if direction == "denoising" else loop["clean"])


def test_per_head_false_sweeps_positions_and_matches_loop(model):
    clean, corrupt = prompts()
    loop = activation_patch(model, clean, corrupt, "heads", metric, per_head=False, method="loop")
    batched = activation_patch(model, clean, corrupt, "heads", metric, per_head=False)
    assert loop["metric"].shape == (model.dims.n_layers, 6)
    torch.testing.assert_close(batched["metric"], loop["metric"], rtol=1e-5, atol=1e-5)


def test_denoising_the_last_residual_recovers_clean_exactly_and_earlier_positions_do_nothing(model):
    clean, corrupt = prompts()
    result = activation_patch(model, clean, corrupt, "resid_post", metric)
    last = result["metric"][-1]
    torch.testing.assert_close(last[-1], result["clean"], rtol=0, atol=1e-5)  # partial runs: fp32 rounding
    torch.testing.assert_close(last[:-1], result["corrupt"].expand(5), rtol=0, atol=0)
    torch.testing.assert_close(result.normalised()[-1, -1], torch.tensor(1.0))


def test_noising_everything_at_the_last_residual_gives_the_corrupt_metric(model):
    clean, corrupt = prompts()
    result = activation_patch(model, clean, corrupt, "resid_post", metric, direction="noising", positions=[-1])
    assert result["metric"].shape == (model.dims.n_layers, 1)
    torch.testing.assert_close(result["metric"][-1, 0], result["corrupt"], rtol=0, atol=1e-5)  # fp32 rounding
    assert result.labels["pos"] == ["5"]


def test_positions_subset_matches_full_sweep(model):
    clean, corrupt = prompts()
    full = activation_patch(model, clean, corrupt, "attn_out", metric)
    some = activation_patch(model, clean, corrupt, "attn_out", metric, positions=[2, -1])
    torch.testing.assert_close(some["metric"], full["metric"][:, [2, 5]])


def test_result_round_trips(model, tmp_path):
    clean, corrupt = prompts()
    result = activation_patch(model, clean, corrupt, "heads", metric)
    back = PatchResult.load(result.save(tmp_path / "patch.safetensors"))
    torch.testing.assert_close(back["metric"], result["metric"])
    assert back.config["kind"] == "attn.hook_z" and back.labels["head"][0] == "H0"


def test_bad_input_fails_clearly(model):
    clean, corrupt = prompts()
    with pytest.raises(PromptMismatchError, match=r"clean \(2, 6\) and corrupt \(2, 5\)"):
        activation_patch(model, clean, corrupt[:, :5], "resid_pre", metric)
    with pytest.raises(MetricError, match=r"scalar or \[batch\]=\(2,\); got shape \(2, 6\)"):
        activation_patch(model, clean, corrupt, "resid_pre", lambda logits: logits[..., 0])
    with pytest.raises(MetricError, match="must return a tensor"):
        activation_patch(model, clean, corrupt, "resid_pre", lambda logits: 1.0)  # type: ignore[arg-type,return-value]
    with pytest.raises(SiteError, match="resid_pre"):
        activation_patch(model, clean, corrupt, "resid_pr", metric)
    with pytest.raises(ConfigError, match="direction"):
        activation_patch(model, clean, corrupt, "resid_pre", metric, direction="sideways")
    with pytest.raises(ConfigError, match="positions"):
        activation_patch(model, clean, corrupt, "resid_pre", metric, positions=[6])
    if model.dims.parallel:
        with pytest.raises(SiteError, match="no site"):
            activation_patch(model, clean, corrupt, "resid_mid", metric)


# Partial runs and the batched engine on every family ------------------------------------------------
from mechscope.locate._engine import metric_positions  # noqa: E402
from mechscope.model.partial import base_run, run_from  # noqa: E402
from tiny_models import FAMILIES, attention_bases  # noqa: E402

FAMILY_BASES = [(f, b) for f in FAMILIES for b in attention_bases(f)]


@pytest.fixture(scope="module")
def family_models():
    return {}


def _family_model(cache, family, base="sdpa"):
    key = (family, base)
    if key not in cache:
        cache[key] = HookedModel(tiny_model(family, attn_implementation=base, with_tokenizer=False)[0])
    return cache[key]


@pytest.mark.parametrize(("family", "base"), FAMILY_BASES)
def test_run_from_any_layer_and_position_equals_the_full_forward(family_models, family, base):
    model = _family_model(family_models, family, base)
    ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    full = model(ids)
    run = base_run(model, ids)
    torch.testing.assert_close(run.logits, full, rtol=0, atol=1e-5)
    for layer in range(model.dims.n_layers):
        for start in (0, 3, 8):  # 8 > the sliding windows (4) of mistral/gemma
            resid = run.resid_pre[layer][:, start:].repeat(3, 1, 1)
            out = run_from(model, run, resid, layer=layer, start_pos=start)
            torch.testing.assert_close(out, full[:, start:].repeat(3, 1, 1), rtol=0, atol=1e-5)
            last = run_from(model, run, resid[:2], layer=layer, start_pos=start, logit_positions=[8])
            torch.testing.assert_close(last, full[:, [8]], rtol=0, atol=1e-5)
            if layer + 1 < model.dims.n_layers:  # one layer on a few positions: the next layer's input
                window = run.resid_pre[layer][:, start : start + 1].repeat(2, 1, 1)
                hidden = run_from(model, run, window, layer=layer, start_pos=start, stop_layer=layer + 1)
                expected = run.resid_pre[layer + 1][:, start : start + 1].repeat(2, 1, 1)
                torch.testing.assert_close(hidden, expected, rtol=0, atol=1e-5)


UNIT_SWEEPS = [("heads", True), ("q", False), ("k", False), ("v", True), ("pattern", False), ("neurons", False)]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_loop_on_every_family(family_models, family):
    model = _family_model(family_models, family)
    clean, corrupt = prompts()
    for kind, per_position in UNIT_SWEEPS:
        units = [0, 3] if kind == "neurons" else None
        kw = dict(per_position=per_position, units=units, positions=[1, 2, 4] if per_position else None)
        loop = activation_patch(model, clean, corrupt, kind, metric, method="loop", **kw)
        batched = activation_patch(model, clean, corrupt, kind, metric, chunk_size=4, **kw)
        torch.testing.assert_close(batched["metric"], loop["metric"], rtol=1e-5, atol=1e-5, msg=kind)
    loop = activation_patch(model, clean, corrupt, "resid_pre", metric, direction="noising", method="loop")
    batched = activation_patch(model, clean, corrupt, "resid_pre", metric, direction="noising")
    torch.testing.assert_close(batched["metric"], loop["metric"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["q", "k", "v", "pattern", "neurons"])
def test_self_patching_is_a_no_op_for_unit_kinds(model, kind):
    clean, _ = prompts()
    for method in ("loop", "batched"):
        result = activation_patch(model, clean, clean, kind, metric, method=method, units=[0, 1])
        torch.testing.assert_close(result["metric"], result["clean"].expand_as(result["metric"]), rtol=0, atol=1e-6)


def test_head_by_position_sweep_has_three_labelled_axes(model):
    clean, corrupt = prompts()
    result = activation_patch(model, clean, corrupt, "heads", metric, per_position=True)
    assert result.axes["metric"] == ("layer", "head", "pos")
    assert result["metric"].shape == (model.dims.n_layers, model.dims.n_heads, 6)
    # patching a head at every position at once is not the sum of per-position patches, but before
    # the first differing token (position 2) the prompts agree: those cells are the corrupt metric
    torch.testing.assert_close(
        result["metric"][:, :, :2], result["corrupt"].expand(model.dims.n_layers, model.dims.n_heads, 2)
    )
    figure = result.plot()
    assert len(figure.data[0].y) == model.dims.n_layers * model.dims.n_heads and len(figure.data[0].x) == 6


def test_metric_positions_finds_what_the_metric_reads():
    logits = torch.randn(2, 5, 11)
    assert metric_positions(lambda x: logit_diff(x, 1, 2), logits) == [4]
    assert metric_positions(lambda x: x[:, 1, 0] + x[:, 3].sum(-1), logits) == [1, 3]
    assert metric_positions(lambda x: x.argmax(-1).float().mean(), logits) == [0, 1, 2, 3, 4]  # no gradient


def test_units_are_checked(model):
    clean, corrupt = prompts()
    with pytest.raises(ConfigError, match="units"):
        activation_patch(model, clean, corrupt, "heads", metric, units=[99])
    with pytest.raises(ConfigError, match="units= applies"):
        activation_patch(model, clean, corrupt, "resid_pre", metric, units=[0])


def test_sweeps_built_in_blocks_of_cells_give_the_same_result(model, monkeypatch):
    import mechscope.locate.patching as patching

    clean, corrupt = prompts()
    whole = activation_patch(model, clean, corrupt, "heads", metric, per_position=True)
    monkeypatch.setattr(patching, "_MASK_BUDGET", 1)  # one chunk of cells per block
    blocks = activation_patch(model, clean, corrupt, "heads", metric, per_position=True, chunk_size=5)
    torch.testing.assert_close(blocks["metric"], whole["metric"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_equals_loop_on_padded_batches(family_models, side):
    from mechscope.locate.metrics import last_positions

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 100, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    padded = slice(-3, None) if side == "right" else slice(0, 3)
    mask[1, padded], ids[1, padded] = 0, 0
    corrupt_ids = ids.clone()
    corrupt_ids[:, 4] = torch.randint(4, 100, (2,), generator=gen)
    clean, corrupt = {"input_ids": ids, "attention_mask": mask}, {"input_ids": corrupt_ids, "attention_mask": mask}
    last = last_positions(mask)

    def row_metric(logits: torch.Tensor) -> torch.Tensor:
        return logit_diff(logits, 5, 6, position=last)

    for family in ("gpt2", "mistral"):
        model = _family_model(family_models, family)
        for kind in ("resid_pre", "heads"):
            loop = activation_patch(model, clean, corrupt, kind, row_metric, method="loop", per_position=True)
            batched = activation_patch(model, clean, corrupt, kind, row_metric, per_position=True)
            torch.testing.assert_close(batched["metric"], loop["metric"], rtol=1e-5, atol=1e-5)


def test_cli_patch_path_patch_atp_and_trace(tmp_path):
    from typer.testing import CliRunner

    from mechscope.cli.main import app
    from mechscope.locate.causal_tracing import TracingResult
    from mechscope.locate.path_patching import PathPatchResult

    hf, tok = tiny_model("gpt2")
    folder = tmp_path / "model"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    pair = ["-c", "the dog sat on the", "-x", "the the sat on the", "-a", " dog", "-w", " the"]
    runner = CliRunner()
    out = runner.invoke(app, ["locate", "patch", str(folder), *pair, "--kind", "heads", "-o", str(tmp_path / "p.st")])
    assert out.exit_code == 0, out.output
    assert PatchResult.load(tmp_path / "p.st")["metric"].shape == (2, 4) and "clean" in out.output
    out = runner.invoke(
        app, ["locate", "path-patch", str(folder), *pair, "--receiver", "1.0.q", "-o", str(tmp_path / "pp.st")]
    )
    assert out.exit_code == 0, out.output
    assert PathPatchResult.load(tmp_path / "pp.st").config["receivers"] == [[1, 0, "q"]]
    out = runner.invoke(app, ["locate", "path-patch", str(folder), *pair, "--sender", "0.1,0.2", "--sender", "1.0"])
    assert out.exit_code == 0 and "L0H1+L0H2" in out.output, out.output
    out = runner.invoke(app, ["locate", "atp", str(folder), *pair, "--qk-fix", "--compare", "-o", str(tmp_path / "a")])
    assert out.exit_code == 0, out.output
    assert "spearman" in out.output
    args = ["locate", "trace", str(folder), "-p", "the dog sat on the", "-s", "dog", "--samples", "2"]
    out = runner.invoke(app, [*args, "-o", str(tmp_path / "t.st")])
    assert out.exit_code == 0, out.output
    assert TracingResult.load(tmp_path / "t.st").config["subject_positions"] and "mlp" in out.output
    assert out.output.count("at the subject's last token: layer") == 3  # resid, mlp, attn
    out = runner.invoke(app, ["locate", "path-patch", str(folder), *pair, "--receiver", "1.q"])
    assert out.exit_code == 2 and "layer.head.q|k|v" in out.output
    out = runner.invoke(
        app, ["locate", "patch", str(folder), "-c", "the dog", "-x", "the dog sat", "-a", " dog", "-w", " the"]
    )
    assert out.exit_code == 2 and "same [batch, pos] token shape" in out.output


def test_merged_chunks_cover_every_variant_once_within_size_and_waste_bounds():
    from mechscope.locate._engine import merge_groups

    n_pos = 40
    groups = {
        (layer, start): [layer * 100 + start * 3 + k for k in range(3)] for layer in (0, 2) for start in range(n_pos)
    }
    start_of = {i: start for (_, start), idx in groups.items() for i in idx}
    layer_of = {i: layer for (layer, _), idx in groups.items() for i in idx}
    chunks = merge_groups(groups, chunk_size=8, n_pos=n_pos)
    members = [i for _, idx in chunks for i in idx]
    assert sorted(members) == sorted(start_of)
    for (layer, first), idx in chunks:
        assert len(idx) <= 8 and all(layer_of[i] == layer for i in idx)
        assert all(0 <= start_of[i] - first <= max(4, (n_pos - start_of[i]) // 4) for i in idx)
    assert len(chunks) < len(groups)  # neighbouring starts share forwards
