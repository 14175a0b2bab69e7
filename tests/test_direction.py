"""Direction is the one hand-off from locate to steer: probes, DAS, DLA and selection give one, steering takes it."""

from __future__ import annotations

import pytest
import torch

from mechscope.direction import Direction
from mechscope.errors import ConfigError
from mechscope.locate import logit_direction, train_probes
from mechscope.model.hooked import HookedModel
from mechscope.results import ModelMismatchError
from mechscope.steer import Steering, from_direction, steer
from mechscope.steer.das import DASResult
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

TEXTS = ["the cat sat on the mat", "a dog ran in the park today", "we read a book", "the sun is warm"] * 3


@pytest.fixture(scope="module")
def model() -> HookedModel:
    hf, tok = tiny_model("llama")
    return HookedModel(hf, tok)


def _last_resid_logits(model: HookedModel, add: torch.Tensor | None) -> torch.Tensor:
    """Logits at the last token with `add` added to the final residual stream there."""
    site = f"blocks.{model.dims.n_layers - 1}.hook_resid_post"

    def bump(act: torch.Tensor, _ctx: object) -> torch.Tensor:
        out = act.clone()
        if add is not None:
            out[:, -1] += add.to(out.dtype)
        return out

    with model.hooks({site: bump}):
        return model.forward(TEXTS[0])[0, -1].float()


def test_a_probe_hands_its_direction_to_steering_where_it_was_found(model):
    labels = [i % 2 for i in range(len(TEXTS))]
    probes = train_probes(model, TEXTS, labels, layers=[0, 1])
    direction = probes.to_direction(model, 1)
    assert isinstance(direction, Direction) and direction.rank == 1
    assert direction.site == "blocks.1.hook_resid_post" and direction.method == "probe"
    torch.testing.assert_close(direction.vector, probes.direction(1) / probes.direction(1).norm())
    vector = from_direction(model, direction)
    assert vector.site == "hook_resid_post" and list(vector.layers) == [1]
    with steer(model, direction, 0.0):  # scale 0 is the identity
        torch.testing.assert_close(model.forward(TEXTS[0]), model.forward(TEXTS[0]), atol=0, rtol=0)
    plain = model.forward(TEXTS[0])
    with steer(model, direction, 3.0):
        steered = model.forward(TEXTS[0])
    with Steering(model, from_direction(model, direction.vector, layers=1, kind="hook_resid_post"), coefficient=3.0):
        by_hand = model.forward(TEXTS[0])
    torch.testing.assert_close(steered, by_hand)
    assert not torch.allclose(steered, plain)


def test_a_probe_direction_refuses_another_model(model):
    labels = [i % 2 for i in range(len(TEXTS))]
    probes = train_probes(model, TEXTS, labels, layers=[1])
    hf, tok = tiny_model("llama", seed=5)
    with pytest.raises(ModelMismatchError):
        probes.to_direction(HookedModel(hf, tok), 1)


def test_an_artifact_made_on_half_precision_weights_applies_to_their_fp32_original(tmp_path):
    import copy

    from mechscope.steer import mean_difference

    hf, tok = tiny_model("llama", seed=7)
    full = HookedModel(hf, tok)
    half = {dtype: HookedModel(copy.deepcopy(hf).to(dtype), tok) for dtype in (torch.bfloat16, torch.float16)}
    for dtype, model in half.items():
        assert full.fingerprint(dtype) == model.fingerprint() != full.fingerprint()
        vector = mean_difference(model, TEXTS[:2], TEXTS[2:4], layers=1)
        loaded = type(vector).load(vector.save(tmp_path / f"{dtype}.safetensors"), full)  # checked: accepted
        assert torch.equal(loaded.directions, vector.directions)
    made_in_fp32 = mean_difference(full, TEXTS[:2], TEXTS[2:4], layers=1)
    with pytest.raises(ModelMismatchError, match="cannot be checked against rounded weights"):
        made_in_fp32.check_model(half[torch.bfloat16])
    other = HookedModel(tiny_model("llama", seed=8)[0], tok)  # other weights stay refused, at any precision
    with pytest.raises(ModelMismatchError):
        mean_difference(half[torch.bfloat16], TEXTS[:2], TEXTS[2:4], layers=1).check_model(other)


def test_the_dla_direction_is_the_readout_that_favours_the_target(model):
    target, baseline = 40, 41
    direction = logit_direction(model, target, baseline)
    assert direction.method == "dla" and direction.site == f"blocks.{model.dims.n_layers - 1}.hook_resid_post"
    base = _last_resid_logits(model, None)
    scale = 50.0 * float(
        model.run_with_cache(TEXTS[0], "blocks.1.hook_resid_post")[1]["blocks.1.hook_resid_post"].norm()
    )
    pushed = _last_resid_logits(model, scale * direction.vector)
    # With RMSNorm, d . y / rms(y) is at most sqrt(D) |d| (Cauchy-Schwarz), reached as y -> d: pushing hard along
    # the direction makes the target beat the baseline by more than before, and by more than a random push does.
    assert pushed[target] - pushed[baseline] > base[target] - base[baseline]
    assert pushed[target] > pushed[baseline]
    random = torch.randn(model.dims.d_model, generator=torch.Generator().manual_seed(0))
    other = _last_resid_logits(model, scale * random / random.norm())
    assert pushed[target] - pushed[baseline] > other[target] - other[baseline]
    with pytest.raises(ConfigError, match="same token"):
        logit_direction(model, 5, 5)
    with pytest.raises(ConfigError, match="out of range"):
        logit_direction(model, model.dims.d_vocab)


def test_a_das_subspace_becomes_a_direction_of_its_rank(model):
    basis = torch.linalg.qr(torch.randn(model.dims.d_model, 3, generator=torch.Generator().manual_seed(1)))[0]
    result = DASResult(
        tensors={"basis": basis, "iia": torch.tensor([[0.9, 0.1], [0.8, 0.2]])},
        axes={"basis": ("d_model", "rank"), "iia": ("split", "subspace")},
        labels={"split": ["train", "test"], "subspace": ["learned", "random"]},
        config={"site": "blocks.1.hook_resid_mid", "variable": "colour"},
    )
    direction = result.to_direction(model)
    assert direction.rank == 3 and direction.site == "blocks.1.hook_resid_mid" and direction.method == "das"
    assert direction.info["test_iia"] == pytest.approx(0.8)
    projector = direction.basis.T @ direction.basis
    torch.testing.assert_close(projector, basis @ basis.T, atol=1e-5, rtol=0)


def test_probe_data_is_checked_where_it_enters(model):
    with pytest.raises(ConfigError, match="empty list of inputs"):
        train_probes(model, [], [])
    with pytest.raises(ConfigError, match="at least 2 examples of each class"):
        train_probes(model, TEXTS[:3], [0, 1, 1])
    with pytest.raises(ConfigError, match="exactly 2 values"):
        train_probes(model, TEXTS[:4], [1, 1, 1, 1])
