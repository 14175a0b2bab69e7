"""DAS on a trained organism recovers the planted "favourite colour of the person asked about" variable."""

from __future__ import annotations

import pytest

from mechscope.steer.das import DASConfig, das, with_positions, world_pairs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


def test_das_finds_the_recalled_colour_subspace():
    from mechscope import load_model

    model = load_model("organism-gpt2")
    pairs = with_positions(world_pairs(model, 500, relation="favourite_colour"), model, "last")
    # After the last attention layer, at the final token: the recalled answer must be there, and DAS
    # finds the 16-dimensional subspace that carries it (12 colours).
    config = DASConfig(site="blocks.3.hook_resid_mid", rank=16, steps=150, lr=5e-2, batch_size=32, variable="colour")
    result = das(model, pairs, config)
    assert result.iia("test") >= 0.9
    assert result.iia("test", "random") <= 0.1  # a random subspace of the same rank does not carry it
