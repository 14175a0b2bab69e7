"""The architecture registry: planted-feature recovery by every architecture, JumpReLU's straight-through
threshold gradient against finite differences, skip-transcoders, the envelope and its migration."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mechscope.errors import ConfigError, ShapeError
from mechscope.features import SAEConfig, SAETrainConfig, SparseAutoencoder, architectures, train_sae
from mechscope.features.architectures import Architecture, register_architecture
from mechscope.features.architectures.jumprelu import jumprelu, step
from mechscope.features.quality import ground_truth_match

pytestmark = pytest.mark.usefixtures("single_thread")


def planted(n: int = 20000, d: int = 16, n_true: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [n, d], true directions [n_true, d])``: each x is 2 random true directions with weights in [1, 2]."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(n_true, d, generator=g)
    true = true / true.norm(dim=-1, keepdim=True)
    idx = torch.stack([torch.randperm(n_true, generator=g)[:2] for _ in range(n)])
    coef = 1 + torch.rand(n, 2, generator=g)
    return (coef[:, :, None] * true[idx]).sum(1), true


CASES = {  # architecture -> (k, training overrides)
    "relu": (None, {"l1_coefficient": 1.0}),
    "topk": (2, {}),
    "batchtopk": (2, {}),
    "jumprelu": (None, {"l0_coefficient": 0.3}),
}


def test_the_registry_holds_the_four_architectures_and_refuses_a_duplicate():
    assert architectures() == ["batchtopk", "jumprelu", "relu", "topk"]

    class Again(Architecture):
        name = "topk"

    with pytest.raises(ConfigError, match="'topk' is already registered"):
        register_architecture(Again)


@pytest.mark.parametrize("activation", sorted(CASES))
def test_each_architecture_recovers_planted_features(activation):
    x, true = planted()
    k, over = CASES[activation]
    config = SAEConfig(d_in=16, d_sae=48, activation=activation, k=k)
    sae, _ = train_sae(x, config, SAETrainConfig(steps=1500, batch_size=256, lr=3e-3, **over))
    match = ground_truth_match(sae, true)
    # measured: relu 0.966, topk 0.996, batchtopk 0.986, jumprelu 0.981
    assert match["mmcs"] >= 0.95, match
    assert match["matched_fraction"] >= 0.8, match
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(48), atol=1e-5)
    f = sae.encode(x[:2000])
    assert 1.0 <= float((f > 0).sum(-1).float().mean()) <= 16.0  # sparse at inference (measured: relu 11.6)


@pytest.mark.parametrize("theta", [0.3, 1.0])
def test_jumprelus_threshold_gradient_matches_finite_differences(theta):
    """The straight-through gradients are kernel estimates of d/dtheta E[z H(z - theta)] and
    d/dtheta E[H(z - theta)]; with many samples they match central finite differences of those means."""
    z = torch.randn(4_000_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bandwidth, h = 0.02, 0.02
    for fn in (jumprelu, step):
        t = torch.tensor([theta], dtype=torch.float64, requires_grad=True)
        fn(z, t, bandwidth).mean().backward()
        with torch.no_grad():
            fd = (fn(z, t + h, bandwidth).mean() - fn(z, t - h, bandwidth).mean()) / (2 * h)
        assert t.grad is not None
        assert abs(float(t.grad) - float(fd)) < 0.03 * abs(float(fd)), (fn.__name__, float(t.grad), float(fd))
    z.requires_grad_(True)  # the input's gradient is the ordinary one where the unit is on
    t = torch.tensor([theta], dtype=torch.float64)
    jumprelu(z[:100], t, bandwidth).sum().backward()
    assert z.grad is not None and torch.equal(z.grad[:100], (z[:100] > theta).to(z.dtype))


def test_a_skip_transcoder_learns_a_dense_linear_map_plus_sparse_corrections():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8000, 12, generator=g)
    linear = torch.randn(12, 10, generator=g) / 12**0.5
    dirs = torch.randn(6, 10, generator=g)
    # targets: a linear part, plus a sparse nonlinearity (direction j when input coordinate j > 1.2)
    y = x @ linear + (torch.relu(x[:, :6] - 1.2)[:, :, None] * dirs).sum(1)
    config = SAEConfig(d_in=12, d_sae=24, activation="topk", k=3, d_out=10, out_site="b", site="a", skip=True)
    sae, _ = train_sae(x, config, SAETrainConfig(steps=1500, batch_size=256, lr=3e-3), targets=y)
    plain = SAEConfig(d_in=12, d_sae=24, activation="topk", k=3, d_out=10, out_site="b", site="a")
    base, _ = train_sae(x, plain, SAETrainConfig(steps=1500, batch_size=256, lr=3e-3), targets=y)

    def fvu(model: SparseAutoencoder) -> float:
        recon = model(x)[0].detach()
        return float((recon - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())

    assert fvu(sae) < 0.05 and fvu(sae) < 0.5 * fvu(base)  # the skip path carries the linear part
    torch.testing.assert_close(sae.W_skip.detach(), linear, atol=0.15, rtol=0)
    with pytest.raises(ShapeError, match="needs its input x"):
        sae.decode(torch.zeros(2, 24))


def test_saves_in_the_envelope_and_loads_the_old_sidecar_layout(tmp_path):
    sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=20, activation="jumprelu", site="blocks.0.hook_resid_post"))
    with torch.no_grad():
        sae.threshold.uniform_(0.1, 0.5)
    path = sae.save(tmp_path / "sae.safetensors")
    back = SparseAutoencoder.load(path)
    x = torch.randn(5, 8)
    assert back.config == sae.config and torch.equal(back.encode(x), sae.encode(x))
    old = SparseAutoencoder(SAEConfig(d_in=8, d_sae=20, activation="topk", k=3, site="blocks.0.hook_resid_post"))
    legacy = tmp_path / "legacy.safetensors"  # what mechscope wrote before the envelope
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(legacy))
    legacy.with_suffix(".json").write_text(
        json.dumps(
            {
                "kind": "sae",
                "config": {
                    "d_in": 8,
                    "d_sae": 20,
                    "activation": "topk",
                    "k": 3,
                    "site": "blocks.0.hook_resid_post",
                    "d_out": None,
                    "out_site": "",
                },
            }
        )
    )
    migrated = SparseAutoencoder.load(legacy)
    assert migrated.config == old.config and torch.equal(migrated.encode(x), old.encode(x))
    legacy.with_suffix(".json").unlink()
    with pytest.raises(ConfigError, match="no envelope header and no sidecar"):
        SparseAutoencoder.load(legacy)


def test_bad_configs_are_clear_errors():
    with pytest.raises(ConfigError, match="needs 1 <= k <= d_sae=8, got k=None"):
        SAEConfig(d_in=4, d_sae=8, activation="batchtopk")
    with pytest.raises(ConfigError, match="k is only used by top-k"):
        SAEConfig(d_in=4, d_sae=8, activation="jumprelu", k=2)
    with pytest.raises(ConfigError, match="skip=True makes a skip-transcoder"):
        SAEConfig(d_in=4, d_sae=8, skip=True)
