"""Bad input to the hook helpers (patch / scale / zero / add, indices by head, position, batch row, neuron) and to
hook sessions: clear errors naming the valid range and what came, no hook left attached, parameters unchanged."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from bad_cases import case, check

from mechscope.errors import ConfigError, ShapeError
from mechscope.model import hook_fns as hf
from mechscope.model.hooked import HookedModel
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

IDS = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])  # batch 2, pos 4; 4 heads, d_model 32, d_mlp 128


@functools.cache
def model() -> HookedModel:
    return HookedModel(*tiny_model("gpt2"))


def _run(site: str, fn) -> None:
    m = model()
    with m.hooks({site: fn}):
        m(IDS)


Z = "blocks.0.attn.hook_z"
RESID = "blocks.1.hook_resid_post"
PATTERN = "blocks.1.attn.hook_pattern"
POST = "blocks.0.mlp.hook_post"

CASES = [
    # Heads
    case("zero-head-4-of-4", lambda: _run(Z, hf.zero(heads=4)), ShapeError, "heads [4]", "4 entries", "-4..3"),
    case("zero-head-negative", lambda: _run(Z, hf.zero(heads=-5)), ShapeError, "heads [-5]", "-4..3"),
    case("zero-heads-list", lambda: _run(Z, hf.zero(heads=[0, 9])), ShapeError, "heads [9]", "4 entries"),
    case("scale-head-pattern", lambda: _run(PATTERN, hf.scale(0.5, heads=7)), ShapeError, "heads [7]", "-4..3"),
    case(
        "patch-head",
        lambda: _run(Z, hf.patch(torch.zeros(2, 4, 4, 8), heads=[6])),
        ShapeError,
        "heads [6]",
        "blocks.0.attn.hook_z",
    ),
    case("heads-on-resid", lambda: _run(RESID, hf.zero(heads=0)), ConfigError, "blocks.1.hook_resid_post"),
    # Positions
    case("zero-position-4", lambda: _run(RESID, hf.zero(positions=4)), ShapeError, "positions [4]", "-4..3"),
    case("zero-position-neg", lambda: _run(RESID, hf.zero(positions=[-9])), ShapeError, "positions [-9]", "4 entries"),
    case("add-position", lambda: _run(RESID, hf.add(torch.ones(32), positions=[2, 10])), ShapeError, "positions [10]"),
    case(
        "pattern-query-position",
        lambda: _run(PATTERN, hf.zero(positions=5)),
        ShapeError,
        "positions [5]",
        "query_pos",
    ),
    # Batch rows
    case("batch-row", lambda: _run(RESID, hf.zero(batch=2)), ShapeError, "batch rows [2]", "-2..1"),
    case(
        "two-lists",
        lambda: _run(Z, hf.zero(heads=[0, 1], positions=[0, 1])),
        ConfigError,
        "at most one of heads/positions/batch",
    ),
    # Neurons (the last axis of the MLP's hidden site, via the ablation helpers)
    case("neuron-128-of-128", lambda: _ablate(neurons=[128]), ConfigError, "neurons [128]", "has 128 entries"),
    case("neuron-negative", lambda: _ablate(neurons=[-129]), ConfigError, "neurons [-129]", "has 128 entries"),
    case("head-via-ablation", lambda: _ablate_heads(heads=[4]), ConfigError, "heads [4]", "has 4 entries"),
    # Values
    case("scale-nan", lambda: hf.scale(math.nan), ConfigError, "factor must be a finite number", "nan"),
    case("scale-inf", lambda: hf.scale(math.inf), ConfigError, "finite", "inf"),
    case(
        "add-coefficient-nan", lambda: hf.add(torch.ones(32), coefficient=math.nan), ConfigError, "coefficient", "nan"
    ),
    case(
        "add-coefficient-inf",
        lambda: hf.add(torch.ones(32), coefficient=-math.inf),
        ConfigError,
        "coefficient",
        "-inf",
    ),
    case(
        "add-vector-nan",
        lambda: hf.add(torch.tensor([1.0, math.nan] * 16)),
        ConfigError,
        "vector contains NaN or infinite values",
    ),
    case("add-vector-list", lambda: hf.add([1.0] * 32), ConfigError, "vector must be a tensor", "got list"),
    case("add-vector-width", lambda: _run(RESID, hf.add(torch.ones(31))), ShapeError, "width 31", "expected 32"),
    case(
        "patch-source-shape",
        lambda: _run(RESID, hf.patch(torch.zeros(1, 4, 32))),
        ShapeError,
        "(1, 4, 32)",
        "expected (2, 4, 32)",
    ),
    # What a hook returns
    case(
        "hook-returns-wrong-shape", lambda: _run(RESID, lambda a, c: a[:, :-1]), ShapeError, "(2, 3, 32)", "(2, 4, 32)"
    ),
    case("hook-returns-a-number", lambda: _run(RESID, lambda a, c: 3), ShapeError, "(2, 4, 32)", "got int"),
]


def _ablate(**kwargs) -> None:
    from mechscope.steer.ablation import zero_ablation

    m = model()
    with zero_ablation(m, POST, **kwargs):
        m(IDS)


def _ablate_heads(**kwargs) -> None:
    from mechscope.steer.ablation import zero_ablation

    m = model()
    with zero_ablation(m, Z, **kwargs):
        m(IDS)


@pytest.mark.parametrize("bad", CASES)
def test_bad_hook_inputs(bad):
    m = model()
    check(bad, model=m)
    for name, module in m.hf_model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, name
    assert m._sessions == []
