"""Key statistics: E[k k^T] by definition, the disk cache, resuming from a checkpoint, bad input."""

from __future__ import annotations

import pytest
import torch
from edit_helpers import TEXTS, TINY_STATS, tiny

from mechscope.errors import ConfigError
from mechscope.io import Envelope, write_envelope
from mechscope.model.tokens import special_prefix
from mechscope.steer.editing import EditError, StatsConfig, second_moments
from mechscope.steer.editing.stats import STATS_SCHEMA, _batches, stats_key

pytestmark = pytest.mark.usefixtures("single_thread")


def test_second_moment_is_mean_outer_product_of_mlp_keys(tmp_path):
    model = tiny("llama")  # gated: the key is act(gate) * up, the input of down_proj
    stats = second_moments(model, [0, 1], config=TINY_STATS, texts=TEXTS, cache_dir=tmp_path, progress=False)
    keys = {0: [], 1: []}
    down = {layer: model.layer_module(layer, model.adapter.mlp_down) for layer in (0, 1)}
    handles = [
        down[layer].register_forward_pre_hook(lambda _m, args, layer=layer: keys[layer].append(args[0].detach()))
        for layer in (0, 1)
    ]
    try:
        for batch in _batches(model.tokenizer, TEXTS, TINY_STATS):
            model.forward(batch)
    finally:
        for h in handles:
            h.remove()
    # Every window starts with the tokenizer's <bos> (as Gemma's does); no key is edited there, so it is left out.
    start = len(special_prefix(model.tokenizer))
    assert start == 1
    for layer in (0, 1):
        k = torch.cat([x[:, start:].reshape(-1, model.dims.d_mlp) for x in keys[layer]])[: TINY_STATS.n_tokens].double()
        torch.testing.assert_close(stats[layer], (k.T @ k / len(k)).float(), rtol=1e-5, atol=1e-6)


def test_cached_statistics_are_read_without_running_the_model(tmp_path, monkeypatch):
    model = tiny("gpt2")
    first = second_moments(model, [1], config=TINY_STATS, texts=TEXTS, cache_dir=tmp_path, progress=False)
    assert (tmp_path / f"{stats_key(model.fingerprint(), 1, TINY_STATS, start=1)}.safetensors").is_file()

    def boom(*_a, **_k):
        raise AssertionError("the model ran although the statistics were cached")

    monkeypatch.setattr(model, "run_with_cache", boom)
    again = second_moments(model, [1], config=TINY_STATS, texts=TEXTS, cache_dir=tmp_path, progress=False)
    assert torch.equal(first[1], again[1])


def test_interrupted_computation_resumes_to_the_same_result(tmp_path):
    model = tiny("gpt2")
    config = StatsConfig(n_tokens=400, seq_len=16, batch_size=4, checkpoint_every=1, stream="tiny")
    whole = second_moments(model, [0], config=config, texts=TEXTS, cache_dir=tmp_path / "a", progress=False)
    part = second_moments(model, [0], config=config, texts=TEXTS, cache_dir=tmp_path / "b", max_batches=2)
    assert part == {}  # stopped early: nothing final yet, a checkpoint on disk
    assert len(list((tmp_path / "b").glob("*.partial.safetensors"))) == 1
    resumed = second_moments(model, [0], config=config, texts=TEXTS, cache_dir=tmp_path / "b", progress=False)
    assert torch.equal(whole[0], resumed[0])
    assert not list((tmp_path / "b").glob("*.partial.safetensors"))


def test_bad_statistics_and_options_raise(tmp_path):
    model = tiny("gpt2")
    bad = torch.full((model.dims.d_mlp, model.dims.d_mlp), float("nan"))
    path = tmp_path / f"{stats_key(model.fingerprint(), 0, TINY_STATS, start=1)}.safetensors"
    write_envelope(path, Envelope("mom2", {"layer": 0}, {"mom2": bad}), STATS_SCHEMA)
    with pytest.raises(EditError, match="NaN"):
        second_moments(model, [0], config=TINY_STATS, texts=TEXTS, cache_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="ran out"):
        second_moments(model, [1], config=StatsConfig(n_tokens=10**6, seq_len=16), texts=TEXTS, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="layer 7 does not exist"):
        second_moments(model, [7], config=TINY_STATS, texts=TEXTS, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="n_tokens"):
        StatsConfig(n_tokens=0)
