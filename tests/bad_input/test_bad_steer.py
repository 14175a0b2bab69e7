"""Bad input to steering (vectors, coefficients, ablation directions, fine-tuning options, saved vectors): clear
errors naming what was expected and what came; the model's parameters unchanged."""

from __future__ import annotations

import math

import pytest
import torch
from bad_cases import case, check, gpt2, llama

from mechscope.errors import ConfigError, ShapeError
from mechscope.results import Artifact, ModelMismatchError
from mechscope.steer.das import DASConfig
from mechscope.steer.directional import directional_ablation, orthogonalize
from mechscope.steer.finetune import FinetuneConfig, finetune
from mechscope.steer.vectors import SteeringVector, from_direction, mean_difference, pca_direction, steer

pytestmark = pytest.mark.usefixtures("single_thread")


def vector(directions=None, layers=(0, 1)) -> SteeringVector:
    d = torch.randn(len(layers), 32, generator=torch.Generator().manual_seed(0)) if directions is None else directions
    return SteeringVector(d, list(layers), **Artifact.model_info(gpt2()))


def _enter(intervention) -> None:
    with intervention:
        gpt2()("the cat")


def _ft(**changes) -> FinetuneConfig:
    return FinetuneConfig(**{"components": ("blocks.1.mlp",), "steps": 1, **changes})


CASES = [
    # Vectors
    case("vector-nan", lambda: vector(torch.full((2, 32), math.nan)), ConfigError, "NaN or infinite"),
    case("vector-inf", lambda: vector(torch.full((2, 32), math.inf)), ConfigError, "NaN or infinite"),
    case("vector-shape", lambda: vector(torch.zeros(3, 32)), ShapeError, "(2, 32)", "got (3, 32)"),
    case("vector-zero", lambda: steer(gpt2(), vector(torch.zeros(2, 32)), 4.0), ConfigError, "zero vector", "[0, 1]"),
    case(
        "vector-zero-one-layer",
        lambda: steer(gpt2(), vector(torch.cat([torch.ones(1, 32), torch.zeros(1, 32)])), 1.0),
        ConfigError,
        "zero vector at layers [1]",
    ),
    case(
        "identical-contrast-sets",
        lambda: steer(gpt2(), mean_difference(gpt2(), ["a cat"], ["a cat"]), 1.0),
        ConfigError,
        "zero vector",
        "positive and negative texts the same",
    ),
    case("from-direction-zero", lambda: steer(gpt2(), from_direction(gpt2(), torch.zeros(32))), ConfigError, "zero"),
    case(
        "from-direction-zero-normalised",
        lambda: from_direction(gpt2(), torch.zeros(32), normalize=True),
        ConfigError,
        "zero direction",
    ),
    case("from-direction-nan", lambda: from_direction(gpt2(), torch.full((32,), math.nan)), ConfigError, "NaN"),
    case("from-direction-width", lambda: from_direction(gpt2(), torch.ones(31)), ShapeError, "(32,)", "got (31,)"),
    # Coefficients
    case("coefficient-nan", lambda: steer(gpt2(), vector(), math.nan), ConfigError, "coefficient", "nan"),
    case("coefficient-inf", lambda: steer(gpt2(), vector(), math.inf), ConfigError, "coefficient", "inf"),
    case("coefficient-neg-inf", lambda: steer(gpt2(), vector(), -math.inf), ConfigError, "coefficient", "-inf"),
    case("coefficient-text", lambda: steer(gpt2(), vector(), "big"), ConfigError, "finite number", "'big'"),
    # Where to steer
    case("layer-beyond-model", lambda: steer(gpt2(), vector(), 1.0, layers=[5]), ConfigError, "[5]", "layers 0..1"),
    case(
        "layer-without-direction",
        lambda: steer(gpt2(), vector(layers=(0,)), 1.0, layers=[1]),
        ConfigError,
        "no direction for layers [1]",
        "it has [0]",
    ),
    case("positions-mode", lambda: steer(gpt2(), vector(), 1.0, positions="first"), ConfigError, "'all'", "'first'"),
    case("not-a-vector", lambda: steer(gpt2(), torch.ones(32), 1.0), ConfigError, "SteeringVector", "Tensor"),
    # Another model
    case(
        "vector-of-another-model",
        lambda: steer(llama(), vector(), 1.0),
        ModelMismatchError,
        "made on model",
        "(gpt2)",
        "(llama)",
    ),
    # Contrast sets
    case("contrast-empty", lambda: mean_difference(gpt2(), [], ["a"]), ConfigError, "non-empty list", "got []"),
    case("contrast-layer", lambda: mean_difference(gpt2(), ["a"], ["b"], layers=[7]), ConfigError, "[7]", "0..1"),
    case(
        "contrast-site",
        lambda: mean_difference(gpt2(), ["a"], ["b"], kind="hook_nope"),
        ConfigError,
        "hook_resid_pre",
        "'hook_nope'",
    ),
    case(
        "contrast-read", lambda: mean_difference(gpt2(), ["a"], ["b"], read="first"), ConfigError, "'last'", "'first'"
    ),
    case("pca-one-pair", lambda: pca_direction(gpt2(), ["a"], ["b"]), ConfigError, "at least 2 pairs"),
    case("pca-unpaired", lambda: pca_direction(gpt2(), ["a", "c"], ["b"]), ConfigError, "got 2 and 1"),
    # Directional ablation / orthogonalisation
    case("ablate-zero", lambda: _enter(directional_ablation(gpt2(), torch.zeros(32))), ConfigError, "zero vector"),
    case("ablate-nan", lambda: directional_ablation(gpt2(), torch.full((32,), math.nan)), ConfigError, "NaN"),
    case("ablate-width", lambda: directional_ablation(gpt2(), torch.ones(30)), ShapeError, "(32,)", "(30,)"),
    case(
        "ablate-dependent-set",
        lambda: directional_ablation(gpt2(), torch.ones(2, 32)),
        ConfigError,
        "linearly dependent",
    ),
    case("orthogonalize-zero", lambda: orthogonalize(gpt2(), torch.zeros(32)), ConfigError, "zero vector"),
    case(
        "orthogonalize-inplace-nan",
        lambda: orthogonalize(gpt2(), torch.full((32,), math.inf), inplace=True),
        ConfigError,
        "NaN or infinite",
    ),
    # Fine-tuning and DAS options
    case("finetune-lr-nan", lambda: _ft(lr=math.nan), ConfigError, "finite lr > 0", "nan"),
    case("finetune-lr-inf", lambda: _ft(lr=math.inf), ConfigError, "finite lr > 0", "inf"),
    case("finetune-lr-zero", lambda: _ft(lr=0.0), ConfigError, "lr > 0", "got 0.0"),
    case("finetune-lr-negative", lambda: _ft(lr=-1e-3), ConfigError, "lr > 0", "-0.001"),
    case("finetune-weight-decay-nan", lambda: _ft(weight_decay=math.nan), ConfigError, "weight_decay >= 0", "nan"),
    case("finetune-steps-zero", lambda: _ft(steps=0), ConfigError, "steps must be a positive integer", "got 0"),
    case("finetune-batch-zero", lambda: _ft(batch_size=0), ConfigError, "batch_size", "got 0"),
    case("finetune-component", lambda: _ft(components=("mlp.1",)), ConfigError, "'mlp.1'", "'blocks.L.mlp'"),
    case("finetune-no-component", lambda: _ft(components=()), ConfigError, "at least one component"),
    case(
        "finetune-layer-beyond",
        lambda: finetune(gpt2(), [("a", " b")], _ft(components=("blocks.9.mlp",))),
        ConfigError,
        "layer 9 does not exist",
        "0..1",
    ),
    case("finetune-no-examples", lambda: finetune(gpt2(), [], _ft()), ConfigError, "at least one (prompt, completion)"),
    case(
        "finetune-empty-completion",
        lambda: finetune(gpt2(), [("a", "")], _ft()),
        ConfigError,
        "completion ''",
        "tokenises to nothing",
    ),
    case("das-lr-nan", lambda: DASConfig(site="blocks.0.hook_resid_post", lr=math.nan), ConfigError, "lr", "nan"),
    case("das-lr-inf", lambda: DASConfig(site="blocks.0.hook_resid_post", lr=math.inf), ConfigError, "finite", "inf"),
    case("das-rank-zero", lambda: DASConfig(site="blocks.0.hook_resid_post", rank=0), ConfigError, "rank", "got 0"),
]


@pytest.mark.parametrize("bad", CASES)
def test_bad_steering_inputs(bad):
    check(bad, model=gpt2())
    assert gpt2()._sessions == []


def test_a_saved_vector_is_refused_on_another_model_and_when_damaged(tmp_path):
    path = vector().save(tmp_path / "v.safetensors")
    with pytest.raises(ModelMismatchError, match=r"made on model .* \(gpt2\); the given model is .* \(llama\)"):
        SteeringVector.load(path, llama())
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ConfigError, match=r"cut\.safetensors.*not a readable safetensors file"):
        SteeringVector.load(truncated)
    with pytest.raises(ConfigError, match=r"no artifact file at .*absent\.safetensors"):
        SteeringVector.load(tmp_path / "absent.safetensors")
