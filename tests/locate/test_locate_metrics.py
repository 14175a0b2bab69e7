"""Metrics: definitions on hand-made logits and shape errors."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import ConfigError, ShapeError
from mechscope.locate import metrics as M


@pytest.fixture
def logits():
    return torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0))


def test_logit_diff_is_the_difference_of_two_logits(logits):
    out = M.logit_diff(logits, [1, 2, 3], 4, position=-2)
    expected = torch.stack([logits[b, 3, [1, 2, 3][b]] - logits[b, 3, 4] for b in range(3)])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(M.logit_diff(logits, 4, [1, 2, 3]), -M.logit_diff(logits, [1, 2, 3], 4))


def test_per_row_positions_follow_the_attention_mask(logits):
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0]])
    last = M.last_positions(mask)
    assert last.tolist() == [2, 4, 3]
    out = M.token_prob(logits, 7, position=last)
    expected = torch.stack([logits[b, p].softmax(-1)[7] for b, p in enumerate([2, 4, 3])])
    torch.testing.assert_close(out, expected)


def test_probabilities_sum_to_one(logits):
    total = sum(M.token_prob(logits, t) for t in range(11))
    torch.testing.assert_close(total, torch.ones(3))


def test_kl_is_zero_to_itself_and_positive_otherwise(logits):
    torch.testing.assert_close(M.kl_to_reference(logits, logits), torch.zeros(3))
    assert (M.kl_to_reference(logits, logits.flip(-1)) > 0).all()


def test_normalised_maps_corrupt_to_zero_and_clean_to_one():
    assert M.normalised(2.0, clean=2.0, corrupt=-1.0).item() == 1.0
    assert M.normalised(-1.0, clean=2.0, corrupt=-1.0).item() == 0.0
    assert M.normalised(0.5, clean=2.0, corrupt=-1.0).item() == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="equal"):
        M.normalised(1.0, 1.0, 1.0)


def test_shape_errors_name_expected_and_got(logits):
    with pytest.raises(ShapeError, match=r"\[batch, pos, d_vocab\]; got \(5, 11\)"):
        M.logit_diff(logits[0], 1, 2)
    with pytest.raises(ShapeError, match=r"\(3,\); got shape \(2,\)"):
        M.logit_diff(logits, [1, 2], 3)
    with pytest.raises(ShapeError, match="out of range"):
        M.token_prob(logits, 1, position=5)
    with pytest.raises(ShapeError, match=r"\[batch\]=\(3,\); got \(2,\)"):
        M.token_prob(logits, 1, position=torch.tensor([0, 1]))
    with pytest.raises(ShapeError, match="reference logits"):
        M.kl_to_reference(logits, logits[:2])
