"""Padding-aware metrics: every verb gives, on a mixed-length padded batch, what it gives on each prompt alone.

Before metrics read each row's last real token, the shorter prompt of a right-padded batch was scored
at a pad token; every right-padded test here fails that way (the pad token's logits are not the
prompt's). Causal tracing takes one prompt per call (``trace_facts`` loops over prompts), so it has no
padded batch; its metric runs through the same engine and scoring block as activation patching.
"""

from __future__ import annotations

import pytest
import torch

from mechscope.locate.attribution import integrated_gradients, logit_attribution, logit_metric
from mechscope.locate.attribution_patching import AtPConfig, attribution_patch
from mechscope.locate.lens import logit_lens
from mechscope.locate.patching import activation_patch
from mechscope.locate.path_patching import path_patch
from mechscope.metrics import kl_div, last_positions, logit_diff, scoring, token_prob
from mechscope.model.hooked import HookedModel
from tiny_models import PAD, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

LENGTHS = (5, 8)
GOOD, BAD = 5, 7


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    return HookedModel(tiny_model(request.param, with_tokenizer=False)[0])


def _prompts() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Clean prompts of two lengths and corrupted copies (position 2 replaced)."""
    gen = torch.Generator().manual_seed(3)
    clean = [torch.randint(4, 100, (n,), generator=gen) for n in LENGTHS]
    corrupt = []
    for seq in clean:
        c = seq.clone()
        c[2] = (c[2] + 17) % 96 + 4
        corrupt.append(c)
    return clean, corrupt


def _pad(seqs: list[torch.Tensor], side: str) -> dict[str, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), PAD)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(n - len(s), n)
        ids[i, sl], mask[i, sl] = s, 1
    return {"input_ids": ids, "attention_mask": mask}


def _alone(seq: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": seq[None], "attention_mask": torch.ones(1, len(seq), dtype=torch.long)}


def metric(logits: torch.Tensor) -> torch.Tensor:
    return logit_diff(logits, GOOD, BAD)  # default position: each row's last real token


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-4)


# The metrics themselves -------------------------------------------------------------------------------------
def test_default_position_is_the_last_real_token_on_either_padding_side():
    logits = torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(0))
    right = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    left = right.flip(-1)
    expected = torch.stack([logits[0, 2, 3] - logits[0, 2, 4], logits[1, 5, 3] - logits[1, 5, 4]])
    _close(logit_diff(logits, 3, 4, attention_mask=right), expected)
    with scoring(right):
        _close(logit_diff(logits, 3, 4), expected)
    expected_left = torch.stack([logits[0, 5, 3] - logits[0, 5, 4], logits[1, 5, 3] - logits[1, 5, 4]])
    with scoring(left):
        _close(logit_diff(logits, 3, 4), expected_left)
    # Outside a scoring block and without a mask, rows are taken as unpadded; a named position wins.
    _close(logit_diff(logits, 3, 4), logits[:, -1, 3] - logits[:, -1, 4])
    with scoring(right):
        _close(token_prob(logits, 3, position=[1, 2]), torch.stack([logits[0, 1], logits[1, 2]]).softmax(-1)[:, 3])
    assert last_positions(left).tolist() == [5, 5]


def test_a_scoring_mask_of_other_rows_is_refused():
    from mechscope.errors import ShapeError

    logits = torch.randn(3, 6, 11)
    with scoring(torch.ones(2, 6)), pytest.raises(ShapeError, match=r"\(2, 6\).*\(3, 6\)"):
        logit_diff(logits, 1, 2)


def test_kl_div_is_float32_and_leaves_pads_out():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 4, 9, generator=gen), torch.randn(2, 4, 9, generator=gen)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    per_token = kl_div(a, b)
    ref = b.double().log_softmax(-1)
    expected = (ref.exp() * (ref - a.double().log_softmax(-1))).sum(-1)
    _close(per_token, expected.float())
    assert kl_div(a.half(), b.half()).dtype == torch.float32
    _close(kl_div(a, b, attention_mask=mask, reduction="mean"), expected[mask.bool()].mean().float())
    rows = kl_div(a, b, attention_mask=mask, reduction="row")
    _close(rows, torch.stack([expected[0, :2].mean(), expected[1].mean()]).float())
    assert float(kl_div(a, a, reduction="mean")) == 0.0


# Every verb: a mixed-length batch equals each prompt alone -------------------------------------------------
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("method", ["batched", "loop"])
def test_activation_patching(model, side, method):
    clean, corrupt = _prompts()
    mixed = activation_patch(model, _pad(clean, side), _pad(corrupt, side), "heads", metric, method=method)
    alone = [
        activation_patch(model, _alone(a), _alone(b), "heads", metric, method=method) for a, b in zip(clean, corrupt)
    ]
    for key in ("metric", "clean", "corrupt"):
        _close(mixed[key], torch.stack([r[key] for r in alone]).mean(0))


def test_activation_patching_by_position_right_padded(model):
    clean, corrupt = _prompts()
    common = list(range(LENGTHS[0]))  # positions both prompts have (right padding keeps them aligned)
    mixed = activation_patch(model, _pad(clean, "right"), _pad(corrupt, "right"), "resid_pre", metric, positions=common)
    alone = [
        activation_patch(model, _alone(a), _alone(b), "resid_pre", metric, positions=common)
        for a, b in zip(clean, corrupt)
    ]
    _close(mixed["metric"], torch.stack([r["metric"] for r in alone]).mean(0))


@pytest.mark.parametrize("side", ["right", "left"])
def test_path_patching(model, side):
    clean, corrupt = _prompts()
    mixed = path_patch(model, _pad(clean, side), _pad(corrupt, side), metric)
    alone = [path_patch(model, _alone(a), _alone(b), metric) for a, b in zip(clean, corrupt)]
    for key in ("metric", "clean", "corrupt"):
        _close(mixed[key], torch.stack([r[key] for r in alone]).mean(0))


@pytest.mark.parametrize("side", ["right", "left"])
def test_attribution_patching(model, side):
    clean, corrupt = _prompts()
    cfg = AtPConfig(nodes=("heads", "neurons"), qk_fix=True)
    mixed = attribution_patch(model, _pad(clean, side), _pad(corrupt, side), metric, cfg)
    alone = [attribution_patch(model, _alone(a), _alone(b), metric, cfg) for a, b in zip(clean, corrupt)]
    for key in ("heads", "neurons", "q", "k", "v", "base", "source"):
        _close(mixed[key], torch.stack([r[key] for r in alone]).mean(0))


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("by", ["head", "neuron", "position"])
def test_direct_logit_attribution(model, side, by):
    clean, _ = _prompts()
    mixed = logit_attribution(model, _pad(clean, side), GOOD, baseline=BAD, by=by)
    for i, seq in enumerate(clean):
        alone = logit_attribution(model, _alone(seq), GOOD, baseline=BAD, by=by)
        _close(mixed["logit"][i], alone["logit"][0])
        if by != "position":  # per-source-position labels differ in length; the sum is checked above
            _close(mixed["attribution"][:, i], alone["attribution"][:, 0])


@pytest.mark.parametrize("baseline", ["mean", "pad"])
def test_integrated_gradients_right_padded(model, baseline):
    from mechscope.locate.attribution import IGConfig

    clean, _ = _prompts()
    cfg = IGConfig(steps=8)
    mixed = integrated_gradients(model, _pad(clean, "right"), logit_metric(GOOD, BAD), baseline=baseline, config=cfg)
    for i, seq in enumerate(clean):
        alone = integrated_gradients(model, _alone(seq), logit_metric(GOOD, BAD), baseline=baseline, config=cfg)
        for key in ("metric", "delta", "baseline_metric"):
            _close(mixed[key][i], alone[key][0])
        _close(mixed["attribution"][i, : len(seq)], alone["attribution"][0])
        assert float(mixed["attribution"][i, len(seq) :].abs().sum()) == 0.0  # pads after the prompt: no effect


@pytest.mark.parametrize("side", ["right", "left"])
def test_logit_lens_last_token_and_means_leave_pads_out(model, side):
    clean, _ = _prompts()
    mixed = logit_lens(model, _pad(clean, side), positions="last")
    full = logit_lens(model, _pad(clean, side))
    alone = [logit_lens(model, _alone(seq)) for seq in clean]
    for i, result in enumerate(alone):
        _close(mixed["kl"][:, i, 0], result["kl"][:, 0, -1])
        assert torch.equal(mixed["top_tokens"][:, i, 0], result["top_tokens"][:, 0, -1])
    tokens = sum(LENGTHS)
    expected = torch.stack([r["kl"][:, 0].sum(-1) for r in alone]).sum(0) / tokens
    _close(full.mean_kl(), expected)


def test_edge_attribution_patching_and_circuit_metric(model):
    from mechscope.locate.circuits import CircuitEvaluator, eap

    clean, corrupt = _prompts()
    mixed = eap(model, _pad(clean, "right"), _pad(corrupt, "right"), metric)
    alone = [eap(model, _alone(a), _alone(b), metric) for a, b in zip(clean, corrupt)]
    _close(mixed["scores"], torch.stack([r["scores"] for r in alone]).mean(0))
    _close(mixed["metric"], torch.stack([r["metric"] for r in alone]).mean(0))
    ev = CircuitEvaluator(model, _pad(clean, "right"), _pad(corrupt, "right"), metric)
    singles = [CircuitEvaluator(model, _alone(a), _alone(b), metric) for a, b in zip(clean, corrupt)]
    assert ev.full_metric == pytest.approx(sum(s.full_metric for s in singles) / 2, abs=1e-4)


def test_cli_patch_path_patch_and_atp_score_each_prompt_at_its_end(tmp_path):
    from typer.testing import CliRunner

    from mechscope.cli.main import app
    from mechscope.results import Result

    hf, tok = tiny_model("llama")
    folder = tmp_path / "model"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    hm = HookedModel(hf, tokenizer=tok)
    pairs = [
        ("the dog sat on the", "the Mary sat on the"),
        ("one two five four five six seven", "one two ten four five six seven"),
    ]
    clean = [p[0] for p in pairs]
    lengths = [len(hm.to_tokens(c)["input_ids"][0]) for c in clean]
    assert len(set(lengths)) == 2, lengths  # a mixed-length batch
    good, bad = hm.to_single_token(" the"), hm.to_single_token(" a")
    expected = []
    for c, x in pairs:
        r = activation_patch(hm, c, x, "heads", lambda lg: logit_diff(lg, good, bad))
        expected.append((float(r["clean"]), float(r["corrupt"])))
    want_clean = sum(e[0] for e in expected) / 2
    want_corrupt = sum(e[1] for e in expected) / 2
    args = [a for c, x in pairs for a in ("-c", c, "-x", x)] + ["-a", " the", "-w", " a"]
    runner = CliRunner()
    for command in ("patch", "path-patch", "atp"):
        extra = ["--kind", "heads"] if command == "patch" else []
        path = tmp_path / f"{command}.safetensors"
        out = runner.invoke(app, ["locate", command, str(folder), *args, *extra, "-o", str(path)])
        assert out.exit_code == 0, out.output
        saved = Result.load(path)
        got = (saved["clean"], saved["corrupt"]) if command != "atp" else (saved["source"], saved["base"])
        assert float(got[0]) == pytest.approx(want_clean, abs=1e-3), command
        assert float(got[1]) == pytest.approx(want_corrupt, abs=1e-3), command


def test_next_token_loss_and_perplexity_leave_pads_out():
    from mechscope.metrics import next_token_loss, perplexity

    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 9, generator=gen)
    ids = torch.randint(0, 9, (2, 5), generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    _close(next_token_loss(logits, ids, reduction="none"), expected)
    kept = torch.cat([expected[0, :2], expected[1]])  # row 0: targets 1, 2 (3 and 4 are pads)
    _close(next_token_loss(logits, ids, attention_mask=mask), kept.mean())
    _close(
        next_token_loss(logits, ids, attention_mask=mask, reduction="row"),
        torch.stack([kept[:2].mean(), kept[2:].mean()]),
    )
    _close(perplexity(logits, ids, attention_mask=mask), kept.mean().exp())
