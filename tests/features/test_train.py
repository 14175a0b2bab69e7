"""Training from a store and from streams, checkpoints, kill -9 resumption to the same weights, the
learning-rate schedule and dead-feature revival."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from store_cases import collect_args, train_args
from test_architectures import planted

from mechscope.errors import ConfigError
from mechscope.features import SAEConfig, SAETrainConfig, SparseAutoencoder, collect_store, train_sae
from mechscope.features.evals import reconstruction_metrics
from mechscope.features.store import ActivationStore
from mechscope.features.train import checkpoint_info

pytestmark = pytest.mark.usefixtures("single_thread")
CHILD = Path(__file__).with_name("_kill_child.py")


def _same(a, b) -> None:
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), name


def test_training_killed_with_sigkill_resumes_to_the_same_weights(tmp_path):
    x, _ = planted(4000)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    config, cfg = train_args()
    reference, ref_log = train_sae(x, config, cfg)
    ckpt = tmp_path / "run.ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    child = subprocess.Popen([sys.executable, str(CHILD), "train", str(ckpt)], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpt.is_file() and checkpoint_info(ckpt)["step"] >= 60):
        if child.poll() is not None:
            pytest.fail("the child finished or died before it could be killed")
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed_at = checkpoint_info(ckpt)["step"]
    assert 60 <= killed_at < cfg.steps
    resumed, log = train_sae(x, config, cfg, checkpoint=ckpt)
    _same(resumed, reference)
    assert log == ref_log
    assert checkpoint_info(ckpt)["step"] == cfg.steps
    other = SAETrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr / 2)
    with pytest.raises(ConfigError, match="checkpoint of another training run"):
        train_sae(x, config, other, checkpoint=ckpt)


def test_training_from_a_store_streams_and_resumes_after_an_interruption(tmp_path, monkeypatch):
    model, texts, _kwargs = collect_args()
    store = collect_store(model, "blocks.0.hook_resid_post", texts, tmp_path / "s", seq_len=16, rows_per_shard=4)
    config = SAEConfig(d_in=model.dims.d_model, d_sae=64, activation="topk", k=4, site="blocks.0.hook_resid_post")
    cfg = SAETrainConfig(steps=120, batch_size=64, lr=3e-3, checkpoint_every=25, log_every=20)
    reference, _ = train_sae(store, config, cfg)
    x = store.activations(config.site)
    assert reconstruction_metrics(reference, x)["explained_variance"] > 0.6

    original = ActivationStore.batches
    calls = {"n": 0}

    def dying(self, *args, **kw):  # the first run dies at batch 60
        calls["n"] += 1
        for i, batch in enumerate(original(self, *args, **kw)):
            if calls["n"] == 1 and i == 60:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(ActivationStore, "batches", dying)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        train_sae(store, config, cfg, checkpoint=ckpt)
    assert checkpoint_info(ckpt)["step"] == 50
    resumed, _ = train_sae(ActivationStore(tmp_path / "s"), config, cfg, checkpoint=ckpt)
    _same(resumed, reference)


def test_transcoders_train_from_a_two_site_store(tmp_path):
    model, texts, _kwargs = collect_args()
    sites = ["blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out"]
    store = collect_store(model, sites, texts, tmp_path / "s", seq_len=16, rows_per_shard=8, dtype="fp32")
    d = model.dims.d_model
    config = SAEConfig(d_in=d, d_sae=64, activation="topk", k=8, site=sites[0], d_out=d, out_site=sites[1])
    sae, log = train_sae(store, config, SAETrainConfig(steps=150, batch_size=64, lr=3e-3))
    metrics = reconstruction_metrics(sae, store.activations(sites[0]), store.activations(sites[1]))
    assert metrics["fvu"] < 0.5 and log[-1]["mse"] < log[0]["mse"]


def test_the_learning_rate_warms_up_and_decays_to_zero():
    cfg = SAETrainConfig(steps=100, lr=1.0, warmup=10, decay_fraction=0.2)
    rates = [cfg.lr_at(s) for s in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0) and rates[79] == pytest.approx(1.0)
    assert rates[90] == pytest.approx(0.5) and rates[99] == pytest.approx(0.05)
    assert all(a <= b for a, b in itertools.pairwise(rates[:11]))
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))


def test_the_auxiliary_loss_trains_only_dead_features_towards_the_error():
    from mechscope.features.train import _aux_loss

    sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=16, activation="topk", k=2), seed=0)
    x = torch.randn(64, 8)
    pre = sae.pre_activations(x)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[3, 7]] = True
    error = torch.randn(64, 8)
    loss = _aux_loss(sae, pre, dead, error)
    loss.backward()
    assert sae.W_dec.grad is not None
    touched = sae.W_dec.grad.abs().sum(-1) > 0
    assert touched[[3, 7]].all() and not touched[~dead].any()  # gradient reaches the dead rows only
    with torch.no_grad():  # when the dead features' top-k reconstruction is the error, the loss is 0
        f = torch.relu(pre.detach()[:, [3, 7]])
        exact = f[:, 0:1] * sae.W_dec[3] + f[:, 1:2] * sae.W_dec[7]
    assert float(_aux_loss(sae, pre.detach(), dead, exact).detach()) < 1e-10


def test_a_stream_of_batches_trains_and_bad_streams_are_clear_errors():
    x, _ = planted(4000)
    config = SAEConfig(d_in=16, d_sae=48, activation="topk", k=2)
    _sae, log = train_sae(iter(x.split(128) * 10), config, SAETrainConfig(steps=200, batch_size=128, lr=3e-3))
    assert log[-1]["mse"] < log[0]["mse"]
    with pytest.raises(ConfigError, match="stream ended after 32 of 200 steps"):
        train_sae(iter(x.split(128)), config, SAETrainConfig(steps=200, batch_size=128))
    with pytest.raises(ConfigError, match="empty stream"):
        train_sae(iter([]), config)
    with pytest.raises(ConfigError, match="expected a tensor, an ActivationStore or an iterable"):
        train_sae(3, config)
