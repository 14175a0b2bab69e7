"""What a metric reads: declared and found read plans, and sweeps that compute only those logits.

A sweep projects only the logits its metric reads (one row per prompt, the declared or found vocabulary
columns). These tests check the plans themselves, that a wrong declaration is refused, and that the
batched sweep still equals the one-forward-per-cell loop for declared, undeclared, scalar, row-coupled
and per-row-token metrics, with right and left padding, and through Gemma 2's soft-capped unembedding.
"""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import ConfigError
from mechscope.locate._reads import read_plan
from mechscope.locate.patching import activation_patch
from mechscope.locate.path_patching import path_patch
from mechscope.metrics import (
    DeclaredMetric,
    Metric,
    MetricError,
    Reads,
    kl_div,
    logit_diff,
    logit_diff_metric,
    logit_metric,
    logits_at,
    metric_reads,
    reads,
    token_prob,
    token_prob_metric,
)
from mechscope.model.hooked import HookedModel
from tiny_models import PAD, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def test_constructors_declare_what_they_read_and_stay_plain_metrics():
    logits = torch.randn(2, 5, 11)
    metric = logit_diff_metric(3, 4)
    assert isinstance(metric, DeclaredMetric) and metric_reads(metric) == Reads(position=None, tokens=(3, 4))
    torch.testing.assert_close(metric(logits), logit_diff(logits, 3, 4))
    assert metric_reads(logit_metric([1, 9])) == Reads(tokens=(1, 9))
    assert metric_reads(logit_metric(1, 2, position=0)) == Reads(position=0, tokens=(1, 2))
    assert metric_reads(token_prob_metric(2)) == Reads()  # the softmax reads every column
    assert metric_reads(lambda x: logit_diff(x, 1, 2)) is None
    with pytest.raises(ConfigError, match="tokens"):
        Reads(tokens=(-1,))


def test_read_plan_from_the_gradient():
    logits = torch.randn(2, 5, 11)
    plan = read_plan(lambda x: logit_diff(x, 1, 2), logits)
    assert plan.rows is not None and plan.columns is not None
    assert plan.rows.tolist() == [4, 4] and plan.positions == [4] and plan.columns.tolist() == [1, 2]
    plan = read_plan(lambda x: token_prob(x, 3), logits)
    assert plan.rows is not None
    assert plan.rows.tolist() == [4, 4] and plan.columns is None
    plan = read_plan(lambda x: x[:, 1, 0] + x[:, 3].sum(-1), logits)
    assert plan.rows is None and plan.positions == [1, 3] and plan.columns is None
    plan = read_plan(lambda x: x.argmax(-1).float().mean(), logits)  # no gradient: everything
    assert plan.rows is None and plan.positions == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("side", ["right", "left"])
def test_read_plan_follows_each_rows_last_real_token(side):
    logits = torch.randn(2, 5, 11)
    mask = (
        torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
        if side == "right"
        else torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    )
    want = [2, 4] if side == "right" else [4, 4]
    for metric in (logit_diff_metric(1, 2), lambda x: logit_diff(x, 1, 2)):
        plan = read_plan(metric, logits, mask)
        assert plan.rows is not None and plan.columns is not None
        assert plan.rows.tolist() == want and plan.columns.tolist() == [1, 2]


def test_a_wrong_declaration_is_refused():
    logits = torch.randn(2, 5, 11)
    liar = reads(tokens=[1])(lambda x: logit_diff(x, 1, 2))
    with pytest.raises(MetricError, match="declares it reads"):
        read_plan(liar, logits)
    elsewhere = reads(position=0, tokens=[1, 2])(lambda x: logit_diff(x, 1, 2))
    with pytest.raises(MetricError, match="declares it reads"):
        read_plan(elsewhere, logits)


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma2"])
def model(request):
    return HookedModel(tiny_model(request.param, with_tokenizer=False)[0])


def _pair() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    clean = torch.randint(4, 100, (3, 7), generator=gen)
    corrupt = clean.clone()
    corrupt[:, 1] = torch.randint(4, 100, (3,), generator=gen)
    return clean, corrupt


def _metrics() -> dict[str, Metric]:
    def coupled(x: torch.Tensor) -> torch.Tensor:  # one value per row, but not row by row
        d = logit_diff(x, 5, 7)
        return d * d.mean()

    return {
        "declared": logit_diff_metric(5, 7),
        "declared prob": token_prob_metric(9),
        "undeclared": lambda x: logit_diff(x, 5, 7),
        "per-row tokens": lambda x: logit_diff(x, [5, 6, 9], [7, 8, 10]),
        "scalar": lambda x: logit_diff(x, 5, 7).mean(),
        "row-coupled": coupled,
        "kl": lambda x: kl_div(logits_at(x), logits_at(x).roll(1, -1)),
    }


@pytest.mark.parametrize("name", list(_metrics()))
def test_batched_equals_loop_for_every_kind_of_metric(model, name):
    metric = _metrics()[name]
    clean, corrupt = _pair()
    loop = activation_patch(model, clean, corrupt, "heads", metric, per_position=True, method="loop")
    batched = activation_patch(model, clean, corrupt, "heads", metric, per_position=True, chunk_size=4)
    torch.testing.assert_close(batched["metric"], loop["metric"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(loop["metric"], loop["corrupt"].expand_as(loop["metric"]))


@pytest.mark.parametrize("side", ["right", "left"])
def test_declared_metric_is_right_on_padded_batches(model, side):
    gen = torch.Generator().manual_seed(7)
    lengths = (4, 7)
    ids = torch.full((2, 7), PAD)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for i, n in enumerate(lengths):
        where = slice(0, n) if side == "right" else slice(7 - n, 7)
        ids[i, where] = torch.randint(4, 100, (n,), generator=gen)
        mask[i, where] = 1
    corrupt = ids.clone()
    first = (mask.argmax(-1) + 1)[:, None]
    corrupt.scatter_(1, first, (corrupt.gather(1, first) + 17) % 96 + 4)
    clean_in, corrupt_in = {"input_ids": ids, "attention_mask": mask}, {"input_ids": corrupt, "attention_mask": mask}
    metric = logit_diff_metric(5, 7)
    loop = activation_patch(model, clean_in, corrupt_in, "resid_pre", metric, method="loop")
    batched = activation_patch(model, clean_in, corrupt_in, "resid_pre", metric, chunk_size=3)
    torch.testing.assert_close(batched["metric"], loop["metric"], rtol=1e-5, atol=1e-5)
    # each prompt's last real token: the mean of the prompts scored alone
    alone = []
    for i in range(2):
        keep = mask[i].bool()
        one = {"input_ids": ids[i, keep][None], "attention_mask": mask[i, keep][None]}
        alone.append(activation_patch(model, one, one, "resid_pre", metric)["clean"])
    torch.testing.assert_close(loop["clean"], torch.stack(alone).mean(), rtol=1e-5, atol=1e-5)


def test_path_patching_with_a_declared_metric_equals_the_undeclared_one(model):
    clean, corrupt = _pair()
    declared = path_patch(model, clean, corrupt, logit_diff_metric(5, 7))
    plain = path_patch(model, clean, corrupt, lambda x: logit_diff(x, 5, 7))
    soft = path_patch(model, clean, corrupt, lambda x: logit_diff(x, 5, 7).mean())
    torch.testing.assert_close(declared["metric"], plain["metric"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(soft["metric"], plain["metric"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_atp_with_a_declared_metric_equals_the_undeclared_one(model, side):
    from mechscope.locate.attribution_patching import AtPConfig, attribution_patch

    clean, corrupt = _pair()
    mask = torch.ones_like(clean)
    if side == "right":
        mask[0, 5:] = 0
    else:
        mask[0, :2] = 0
    clean_in, corrupt_in = {"input_ids": clean, "attention_mask": mask}, {"input_ids": corrupt, "attention_mask": mask}
    config = AtPConfig(nodes=("heads", "neurons", "resid"), qk_fix=True)
    declared = attribution_patch(model, clean_in, corrupt_in, logit_diff_metric(5, 7), config)
    plain = attribution_patch(model, clean_in, corrupt_in, lambda x: logit_diff(x, 5, 7), config)
    for name in plain.tensors:
        torch.testing.assert_close(declared[name], plain[name], rtol=1e-5, atol=1e-6)


def test_eap_unembedding_only_the_read_positions_changes_nothing(model):
    from mechscope.locate.circuits import eap

    clean, corrupt = _pair()
    reads_last = eap(model, clean, corrupt, lambda x: logit_diff(x, 5, 7))
    reads_all = eap(model, clean, corrupt, lambda x: logit_diff(x, 5, 7) + 0 * x.sum((1, 2)))  # NaN check: all
    torch.testing.assert_close(reads_last["scores"], reads_all["scores"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reads_last["metric"], reads_all["metric"])
