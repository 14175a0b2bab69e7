"""Bad input to knowledge editing (requests, ROME and MEMIT options, key statistics, conflicting requests,
reverting): clear errors naming what was expected and what came, raised before any weight changes."""

from __future__ import annotations

import math

import pytest
import torch
from bad_cases import case, check, gpt2

from mechscope.errors import ConfigError
from mechscope.model.hooked import HookedModel
from mechscope.steer.editing.memit import MEMITConfig, memit
from mechscope.steer.editing.requests import EditError, EditRequest
from mechscope.steer.editing.rome import ROMEConfig, rome
from mechscope.steer.editing.stats import StatsConfig, second_moments
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


D_MLP = 128
EYE = torch.eye(D_MLP)
FAST = {"steps": 2, "n_prefixes": 1}


def req(prompt="{} lives in", subject="the cat", target=" Rome", **kwargs) -> EditRequest:
    return EditRequest(prompt=prompt, subject=subject, target=target, **kwargs)


def rank_one() -> torch.Tensor:
    v = torch.randn(D_MLP, 1, generator=torch.Generator().manual_seed(0))
    return v @ v.T


def do_rome(request=None, mom2=EYE, **config):
    return rome(gpt2(), request or req(), ROMEConfig(**{"layer": 0, "rounds": 1, **FAST, **config}), mom2=mom2)


def do_memit(requests=None, mom2=None, **config):
    mom2 = {0: EYE} if mom2 is None else mom2
    return memit(
        gpt2(), [req()] if requests is None else requests, MEMITConfig(**{"layers": (0,), **FAST, **config}), mom2=mom2
    )


def stats(tmp, layers=(0,), texts=("the cat sat on the mat",) * 20, **config):
    cfg = StatsConfig(**{"n_tokens": 64, "seq_len": 16, "stream": "bad-input", **config})
    return second_moments(gpt2(), list(layers), config=cfg, texts=list(texts), progress=False, cache_dir=tmp)


CASES = [
    # Requests
    case("empty-subject", lambda t: req(subject=""), EditError, "non-empty subject", "got ''"),
    case("subject-not-in-prompt", lambda t: req(prompt="a dog is", subject="cat"), EditError, "'cat'", "'a dog is'"),
    case("two-subject-slots", lambda t: req(prompt="{} and {}"), EditError, "exactly one '{}'", "'{} and {}'"),
    case("empty-target", lambda t: req(target=""), EditError, "non-empty target", "got ''"),
    case("blank-target", lambda t: req(target="   "), EditError, "non-empty target", "'   '"),
    case(
        "paraphrase-without-subject",
        lambda t: req(paraphrases=("a dog is",)),
        EditError,
        "'a dog is'",
        "'the cat'",
    ),
    case(
        "request-missing-keys",
        lambda t: EditRequest.from_dict({"prompt": "{} is"}),
        EditError,
        "prompt, subject, target",
        "['subject', 'target']",
    ),
    case("rome-a-list", lambda t: rome(gpt2(), [req()], ROMEConfig(layer=0), mom2=EYE), EditError, "got list"),
    case("memit-no-requests", lambda t: do_memit([]), EditError, "at least one EditRequest", "got none"),
    case("memit-not-requests", lambda t: do_memit(["x"]), EditError, "EditRequest objects", "got str"),
    case(
        "memit-conflicting-targets",
        lambda t: do_memit([req(), req(target=" Paris")]),
        EditError,
        "requests 0 and 1",
        "(' Rome' and ' Paris')",
    ),
    # ROME options
    case("rome-last-layer", lambda t: do_rome(layer=1), ConfigError, "layer=1", "layers 0..1"),
    case("rome-layer-beyond", lambda t: do_rome(layer=5), ConfigError, "layer=5", "layers 0..1"),
    case("rome-layer-negative", lambda t: ROMEConfig(layer=-1), ConfigError, "non-negative", "-1"),
    case("rome-lr-nan", lambda t: ROMEConfig(lr=math.nan), ConfigError, "lr must be a finite number > 0", "nan"),
    case("rome-lr-inf", lambda t: ROMEConfig(lr=math.inf), ConfigError, "lr must be a finite number > 0", "inf"),
    case("rome-lr-zero", lambda t: ROMEConfig(lr=0.0), ConfigError, "> 0", "0.0"),
    case("rome-lr-negative", lambda t: ROMEConfig(lr=-0.5), ConfigError, "> 0", "-0.5"),
    case("rome-steps-zero", lambda t: ROMEConfig(steps=0), ConfigError, "steps must be a positive integer", "0"),
    case("rome-rounds-zero", lambda t: ROMEConfig(rounds=0), ConfigError, "rounds", "0"),
    case("rome-ridge-nan", lambda t: ROMEConfig(ridge=math.nan), ConfigError, "ridge", ">= 0", "nan"),
    case("rome-kl-factor-inf", lambda t: ROMEConfig(kl_factor=math.inf), ConfigError, "kl_factor", "inf"),
    case("rome-stop-prob", lambda t: ROMEConfig(stop_prob=1.5), ConfigError, "(0, 1]", "1.5"),
    case("rome-kl-prompt", lambda t: ROMEConfig(kl_prompts=("no slot",)), ConfigError, "exactly one '{}'", "'no slot'"),
    # Key statistics
    case("stats-all-zero", lambda t: do_rome(mom2=torch.zeros(D_MLP, D_MLP)), EditError, "all zero", "layer 0"),
    case("stats-nan", lambda t: do_rome(mom2=torch.full((D_MLP, D_MLP), math.nan)), EditError, "16384 NaN/inf"),
    case("stats-shape", lambda t: do_rome(mom2=torch.eye(D_MLP - 1)), EditError, "[128, 128]", "(127, 127)"),
    case(
        "stats-singular",
        lambda t: do_rome(mom2=rank_one(), ridge=0.0),
        EditError,
        "singular or not positive definite",
        "ridge=0.0",
    ),
    case(
        "stats-negative-definite",
        lambda t: do_rome(mom2=-EYE, ridge=0.0),
        EditError,
        "not positive definite",
        "column 1 of 128",
    ),
    case("stats-zero-token-budget", lambda t: StatsConfig(n_tokens=0), ConfigError, "n_tokens", "got 0"),
    case("stats-seq-len", lambda t: StatsConfig(seq_len=0), ConfigError, "seq_len", "got 0"),
    case("stats-stream-label", lambda t: StatsConfig(stream="a/b"), ConfigError, "without '/'", "'a/b'"),
    case("stats-layer-beyond", lambda t: stats(t, layers=(5,)), ConfigError, "layer 5", "layers 0..1"),
    case("stats-no-text", lambda t: stats(t, texts=()), ConfigError, "no complete window of tokens"),
    case("stats-too-little-text", lambda t: stats(t, texts=("a",), seq_len=32), ConfigError, "no complete window"),
    # MEMIT options
    case("memit-layer-beyond", lambda t: do_memit(layers=(0, 5)), ConfigError, "(0, 5)", "layers 0..1"),
    case("memit-layers-order", lambda t: MEMITConfig(layers=(1, 0)), ConfigError, "increasing", "(1, 0)"),
    case("memit-layers-empty", lambda t: MEMITConfig(layers=()), ConfigError, "layer indices", "()"),
    case("memit-lr-inf", lambda t: MEMITConfig(lr=math.inf), ConfigError, "lr must be a finite number > 0", "inf"),
    case("memit-lr-nan", lambda t: MEMITConfig(lr=math.nan), ConfigError, "finite number > 0", "nan"),
    case("memit-weight-nan", lambda t: MEMITConfig(mom2_weight=math.nan), ConfigError, "mom2_weight", "nan"),
    case(
        "memit-stats-for-another-layer",
        lambda t: do_memit(mom2={0: EYE, 1: EYE}),
        EditError,
        "layers [1]",
        "edits (0,)",
    ),
    case("memit-stats-zero", lambda t: do_memit(mom2={0: torch.zeros(D_MLP, D_MLP)}), EditError, "all zero"),
]


@pytest.mark.parametrize("bad", CASES)
def test_bad_editing_inputs(bad, tmp_path):
    check(bad, tmp_path, model=gpt2())
    assert gpt2()._sessions == []


def test_revert_refuses_weights_it_did_not_leave():
    model = gpt2()
    from bad_cases import params_hash

    before = params_hash(model)
    record = do_rome()
    other = HookedModel(*tiny_model("gpt2", seed=1))
    other_before = params_hash(other)
    with pytest.raises(EditError, match=r"cannot revert: the model's weights are not those this edit left"):
        record.revert(other)
    assert params_hash(other) == other_before
    record.revert(model)
    assert params_hash(model) == before
    with pytest.raises(EditError, match="cannot revert"):
        record.revert(model)  # twice: the model no longer holds the edit
    assert params_hash(model) == before
