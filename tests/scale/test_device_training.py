"""SAE training on the device under test (``MECHSCOPE_TEST_DEVICE``: the CPU here, CUDA in
scripts/gpu_check.sh) against the same training on the CPU.

The initialisation is drawn on the CPU, batches are moved to the training device as they are read, and
checkpoints hold CPU tensors, so a run on a GPU starts from the same SAE, sees the same batches and
resumes from a checkpoint written anywhere. Tolerance off the CPU: the kernels differ in summation
order, and Adam's first steps are sign-like, so tiny gradient entries may step either way (a few lr of
difference in a handful of weights); reconstruction quality agrees to 1 %.
"""

from __future__ import annotations

import os

import pytest
import torch

from mechscope.errors import ConfigError
from mechscope.features import reconstruction_metrics, train_sae
from mechscope.features.sae import SAEConfig
from mechscope.features.store import ActivationStore, collect_store
from mechscope.features.train import SAETrainConfig
from mechscope.model.loading import load_model

DEVICE = torch.device(os.environ.get("MECHSCOPE_TEST_DEVICE", "cpu"))
SITE = "blocks.0.hook_resid_post"
TRAIN = SAETrainConfig(steps=30, batch_size=64, lr=3e-3, warmup=3, dead_steps=5, log_every=10, checkpoint_every=10)

pytestmark = pytest.mark.usefixtures("single_thread")


def _data() -> torch.Tensor:
    """Activations with planted sparse structure: features fire and die as in real ones."""
    gen = torch.Generator().manual_seed(0)
    atoms = torch.randn(24, 16, generator=gen)
    codes = torch.rand(800, 24, generator=gen) * (torch.rand(800, 24, generator=gen) < 0.15)
    return codes @ atoms + 0.05 * torch.randn(800, 16, generator=gen)


def _same_training(got, want) -> None:
    for name, value in want.state_dict().items():
        other = got.state_dict()[name]
        assert other.device.type == DEVICE.type, f"{name} left the training device"
        if DEVICE.type == "cpu":
            assert torch.equal(other, value), name
        else:
            close = (other.cpu() - value).abs() <= 1e-4 + 1e-3 * value.abs()
            assert float(close.float().mean()) >= 0.99, f"{name}: {float(close.float().mean()):.3f} of entries close"


@pytest.mark.parametrize(
    "config",
    [
        SAEConfig(d_in=16, d_sae=48, activation="relu"),
        SAEConfig(d_in=16, d_sae=48, activation="topk", k=4),
        SAEConfig(d_in=16, d_sae=256, activation="topk", k=2),  # wide: features die, AuxK runs
        SAEConfig(d_in=16, d_sae=48, activation="batchtopk", k=4),
        SAEConfig(d_in=16, d_sae=48, activation="jumprelu"),
    ],
    ids=["relu", "topk", "topk-aux", "batchtopk", "jumprelu"],
)
def test_training_on_the_device_equals_cpu_training(config):
    x = _data()
    want, want_log = train_sae(x, config, TRAIN)
    got, got_log = train_sae(x.to(DEVICE), config, TRAIN)  # the tensor's device is the default
    _same_training(got, want)
    cpu_metrics, dev_metrics = reconstruction_metrics(want, x), reconstruction_metrics(got, x.to(DEVICE))
    assert dev_metrics["fvu"] == pytest.approx(cpu_metrics["fvu"], rel=1e-2, abs=1e-4)
    assert [entry["step"] for entry in got_log] == [entry["step"] for entry in want_log]


def test_a_checkpoint_resumes_on_the_device_it_names(tmp_path, monkeypatch):
    """Interrupted on the CPU after the checkpoint of step 10 (CPU tensors), resumed on the device under test."""
    from mechscope.features import train as train_module

    x, config = _data(), SAEConfig(d_in=16, d_sae=48, activation="topk", k=4)
    want, _ = train_sae(x, config, TRAIN)
    original = train_module._tensor_batches

    def dying(*args, **kwargs):
        for i, batch in enumerate(original(*args, **kwargs)):
            if i == 15:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(train_module, "_tensor_batches", dying)
    with pytest.raises(KeyboardInterrupt):
        train_sae(x, config, TRAIN, checkpoint=tmp_path / "ckpt")
    monkeypatch.setattr(train_module, "_tensor_batches", original)
    resumed, _ = train_sae(x, config, TRAIN, checkpoint=tmp_path / "ckpt", device=DEVICE)
    _same_training(resumed, want)


def test_store_batches_move_to_the_device(tmp_path, model_folder):
    model = load_model(model_folder)
    texts = [f"Sentence {i} is about the cat and the mat, then the dog." for i in range(16)]
    store = collect_store(model, SITE, texts, tmp_path / "store", dtype="fp32", seq_len=8, rows_per_shard=4)
    config = SAEConfig(d_in=model.dims.d_model, d_sae=64, activation="topk", k=4, site=SITE)
    cfg = SAETrainConfig(steps=12, batch_size=16, warmup=2, log_every=4)
    want, _ = train_sae(ActivationStore(store.folder), config, cfg)
    got, _ = train_sae(ActivationStore(store.folder), config, cfg, device=DEVICE)
    _same_training(got, want)


def test_a_device_that_is_not_one_is_refused():
    with pytest.raises(ConfigError, match=r"torch device.*'gpu0'"):
        train_sae(_data(), SAEConfig(d_in=16, d_sae=32), TRAIN, device="gpu0")
