"""Bad input to the features surface (SAE configs, SAE files in mechscope's and SAELens's formats, SAEs on the
wrong model or site, training options and data, activation collection and stores): clear errors naming what was
expected and what came; the model's parameters unchanged."""

from __future__ import annotations

import functools
import json
import math
import shutil

import pytest
import torch
from bad_cases import case, check, gpt2, llama

from mechscope.errors import ConfigError, ShapeError, SiteError
from mechscope.features.evals import downstream_loss, reconstruction_metrics
from mechscope.features.loading import load_sae
from mechscope.features.sae import SAE_SCHEMA, SAEConfig, SparseAutoencoder
from mechscope.features.saelens import save_saelens
from mechscope.features.store.rows import collect_activations
from mechscope.features.store.writer import collect_store
from mechscope.features.train import SAETrainConfig, train_sae
from mechscope.io import Envelope, ModelInfo, write_envelope
from mechscope.results import ModelMismatchError
from mechscope.steer.clamp import SAESplice, clamp_features

pytestmark = pytest.mark.usefixtures("single_thread")

SITE = "blocks.0.hook_resid_post"
TEXT = ["the cat sat on the mat and the dog sat on the log " * 8]  # > 64 tokens


@functools.cache
def sae() -> SparseAutoencoder:
    out = SparseAutoencoder(SAEConfig(d_in=32, d_sae=64, site=SITE))
    out.model_info = ModelInfo.of(gpt2())
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A good SAE file and a good SAELens folder to damage."""
    root = tmp_path_factory.mktemp("sae")
    return sae().save(root / "sae.safetensors"), save_saelens(sae(), root / "saelens")


def _damaged_file(files, tmp, change):
    path = tmp / "damaged.safetensors"
    shutil.copy(files[0], path)
    change(path)
    return load_sae(path)


def _damaged_folder(files, tmp, change):
    folder = tmp / "damaged"
    shutil.copytree(files[1], folder)
    change(folder)
    return load_sae(folder)


def _cfg(folder, **changes):
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, **changes}))


def _envelope(files, tmp, config_changes=None, drop=None, reshape=None):
    """A mechscope SAE file written with a changed config or tensors (as a buggy or foreign writer would)."""
    tensors = {k: v.detach().clone() for k, v in sae().state_dict().items()}
    if drop:
        tensors.pop(drop)
    if reshape:
        tensors[reshape] = tensors[reshape][:-1]
    config = {**json.loads(json.dumps(sae().config.__dict__)), **(config_changes or {})}
    path = write_envelope(tmp / "crafted.safetensors", Envelope("sae", {"config": config}, tensors, None), SAE_SCHEMA)
    return load_sae(path)


def _legacy_sidecar(files, tmp, text: bytes):
    """A schema-1 SAE: weights without the envelope header and a JSON sidecar beside them."""
    from safetensors.torch import save_file

    path = tmp / "old.safetensors"
    save_file({k: v.contiguous() for k, v in sae().state_dict().items()}, str(path))
    path.with_suffix(".json").write_bytes(text)
    return load_sae(path)


def _trunc(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


FILE_CASES = [
    case("absent-file", lambda f, t: load_sae(t / "absent.safetensors"), ConfigError, "no sparse autoencoder file"),
    case(
        "truncated-weights",
        lambda f, t: _damaged_file(f, t, _trunc),
        ConfigError,
        "damaged.safetensors",
        "not a readable safetensors file (expected a sparse autoencoder)",
    ),
    case("empty-file", lambda f, t: _damaged_file(f, t, lambda p: p.write_bytes(b"")), ConfigError, "header too small"),
    case(
        "text-file",
        lambda f, t: _damaged_file(f, t, lambda p: p.write_text("weights")),
        ConfigError,
        "not a readable safetensors file",
    ),
    case(
        "unknown-config-keys",
        lambda f, t: _envelope(f, t, {"bogus_key": 1}),
        ConfigError,
        "unknown SAE config fields ['bogus_key']",
        "expected some of",
    ),
    case(
        "config-d-sae-mismatch",
        lambda f, t: _envelope(f, t, {"d_sae": 65}),
        ShapeError,
        "has shape (64, 32)",
        "expected (65, 32)",
    ),
    case("missing-tensor", lambda f, t: _envelope(f, t, drop="b_enc"), ConfigError, "missing ['b_enc']"),
    case("short-tensor", lambda f, t: _envelope(f, t, reshape="b_dec"), ShapeError, "b_dec has shape (31,)", "(32,)"),
    case(
        "bad-config-value",
        lambda f, t: _envelope(f, t, {"activation": "gelu"}),
        ConfigError,
        "activation one of",
        "'gelu'",
    ),
    case(
        "legacy-sidecar-malformed-json",
        lambda f, t: _legacy_sidecar(f, t, b'{"d_in": 32,'),
        ConfigError,
        "old.json",
        "malformed JSON",
    ),
    case(
        "legacy-sidecar-not-utf8",
        lambda f, t: _legacy_sidecar(f, t, b'{"d_in": "\xe9"}'),
        ConfigError,
        "old.json",
        "not UTF-8",
    ),
    case(
        "not-an-sae-file",
        lambda f, t: load_sae(
            write_envelope(t / "other.safetensors", Envelope("x", {}, {"a": torch.ones(1)}), SAE_SCHEMA)
        ),
        ConfigError,
        "other.safetensors",
    ),
    case(
        "saelens-malformed-cfg",
        lambda f, t: _damaged_folder(f, t, lambda d: (d / "cfg.json").write_text("{oops")),
        ConfigError,
        "cfg.json', line 1: malformed JSON",
        "expected a SAELens cfg.json",
    ),
    case(
        "saelens-cfg-not-utf8",
        lambda f, t: _damaged_folder(f, t, lambda d: (d / "cfg.json").write_bytes(b'{"d_in": "\xff"}')),
        ConfigError,
        "cfg.json",
        "not UTF-8",
    ),
    case(
        "saelens-cfg-missing-fields",
        lambda f, t: _damaged_folder(f, t, lambda d: (d / "cfg.json").write_text('{"d_in": 32}')),
        ConfigError,
        "expected integer fields ['d_sae']",
        "got ['d_in']",
    ),
    case(
        "saelens-cfg-not-an-object",
        lambda f, t: _damaged_folder(f, t, lambda d: (d / "cfg.json").write_text("[1, 2]")),
        ConfigError,
        "expected a JSON object",
        "got list",
    ),
    case(
        "saelens-shape-mismatch",
        lambda f, t: _damaged_folder(f, t, lambda d: _cfg(d, d_sae=65)),
        ShapeError,
        "W_dec has shape (64, 32)",
        "expected (65, 32)",
    ),
    case(
        "saelens-no-weights",
        lambda f, t: _damaged_folder(f, t, lambda d: (d / "sae_weights.safetensors").unlink()),
        ConfigError,
        "no SAELens SAE weights file",
    ),
    case(
        "saelens-truncated-weights",
        lambda f, t: _damaged_folder(f, t, lambda d: _trunc(d / "sae_weights.safetensors")),
        ConfigError,
        "not a readable safetensors file",
    ),
    case(
        "saelens-empty-folder",
        lambda f, t: _damaged_folder(f, t, lambda d: [p.unlink() for p in d.iterdir()]),
        ConfigError,
        "no SAELens cfg.json file",
    ),
]


@pytest.mark.parametrize("bad", FILE_CASES)
def test_bad_sae_files(bad, files, tmp_path):
    check(bad, files, tmp_path)


def _sae(**config) -> SparseAutoencoder:
    return SparseAutoencoder(SAEConfig(**{"d_in": 32, "d_sae": 8, "site": SITE, **config}))


CASES = [
    # SAE configs
    case("cfg-d-in-zero", lambda: SAEConfig(d_in=0, d_sae=4), ConfigError, "positive d_in and d_sae", "d_in=0"),
    case("cfg-activation", lambda: SAEConfig(d_in=4, d_sae=4, activation="gelu"), ConfigError, "'relu'", "'gelu'"),
    case("cfg-topk-no-k", lambda: SAEConfig(d_in=4, d_sae=4, activation="topk"), ConfigError, "1 <= k <= d_sae=4"),
    case("cfg-topk-k-big", lambda: SAEConfig(d_in=4, d_sae=4, activation="topk", k=10), ConfigError, "k=10"),
    case("cfg-skip-no-out", lambda: SAEConfig(d_in=4, d_sae=4, skip=True), ConfigError, "skip-transcoder"),
    # An SAE on the wrong model or site
    case(
        "sae-of-another-model",
        lambda: clamp_features(llama(), sae(), {0: 1.0}),
        ModelMismatchError,
        "(gpt2)",
        "(llama)",
    ),
    case("splice-another-model", lambda: SAESplice(llama(), sae()), ModelMismatchError, "made on model", "(llama)"),
    case(
        "downstream-another-model",
        lambda: downstream_loss(llama(), sae(), TEXT),
        ModelMismatchError,
        "this SAE was made on model",
    ),
    case(
        "d-in-not-the-site-width",
        lambda: clamp_features(gpt2(), _sae(d_in=31), {0: 1.0}),
        ShapeError,
        "width 31",
        "has width 32",
    ),
    case("no-site", lambda: clamp_features(gpt2(), _sae(site=""), {0: 1.0}), ConfigError, "names no site"),
    case(
        "site-beyond-model",
        lambda: clamp_features(gpt2(), _sae(site="blocks.9.hook_resid_post"), {0: 1.0}),
        SiteError,
        "past the last layer",
    ),
    case("bad-site-name", lambda: SAESplice(gpt2(), _sae(site="blocks.0.resid")), SiteError, "'blocks.0.resid'"),
    case("feature-index", lambda: clamp_features(gpt2(), sae(), {64: 1.0}), ConfigError, "[0, 64)", "[64]"),
    case("clamp-value-nan", lambda: clamp_features(gpt2(), sae(), {0: math.nan}), ConfigError, "finite", "nan"),
    case(
        "clamp-positions-float",
        lambda: clamp_features(gpt2(), sae(), {0: 1.0}, positions=[1.5]),
        ConfigError,
        "list of ints",
        "[1.5]",
    ),
    case("clamp-positions-empty", lambda: clamp_features(gpt2(), sae(), {0: 1.0}, positions=[]), ConfigError, "[]"),
    case("splice-unspliced-negative", lambda: SAESplice(gpt2(), sae(), unspliced=-1), ConfigError, "unspliced", "-1"),
    case("clamp-value-inf", lambda: clamp_features(gpt2(), sae(), {0: math.inf}), ConfigError, "finite", "inf"),
    case(
        "score-other-width",
        lambda: reconstruction_metrics(sae(), torch.randn(5, 31)),
        ShapeError,
        "[5, 32]",
        "(5, 31)",
    ),
    case(
        "score-nan",
        lambda: reconstruction_metrics(sae(), torch.full((5, 32), math.nan)),
        ConfigError,
        "finite",
        "(5, 32)",
    ),
    # Training options and data
    case("train-lr-nan", lambda: SAETrainConfig(lr=math.nan), ConfigError, "finite lr > 0", "lr=nan"),
    case("train-lr-inf", lambda: SAETrainConfig(lr=math.inf), ConfigError, "finite lr > 0", "lr=inf"),
    case("train-lr-negative", lambda: SAETrainConfig(lr=-1.0), ConfigError, "lr > 0", "lr=-1.0"),
    case("train-steps-zero", lambda: SAETrainConfig(steps=0), ConfigError, "steps, batch_size >= 1", "steps=0"),
    case("train-batch-zero", lambda: SAETrainConfig(batch_size=0), ConfigError, "batch_size >= 1", "batch_size=0"),
    case("train-l1-nan", lambda: SAETrainConfig(l1_coefficient=math.nan), ConfigError, "penalty", "l1_coefficient=nan"),
    case("train-bandwidth-zero", lambda: SAETrainConfig(bandwidth=0.0), ConfigError, "bandwidth > 0", "bandwidth=0.0"),
    case(
        "train-data-width",
        lambda: train_sae(torch.randn(10, 31), sae().config, SAETrainConfig(steps=1, batch_size=4)),
        ShapeError,
        "d_in=32",
        "(10, 31)",
    ),
    case(
        "train-data-nan",
        lambda: train_sae(torch.full((10, 32), math.nan), sae().config, SAETrainConfig(steps=1, batch_size=4)),
        ConfigError,
        "NaN or inf",
    ),
    case(
        "train-data-empty",
        lambda: train_sae(torch.randn(0, 32), sae().config, SAETrainConfig(steps=1, batch_size=4)),
        ConfigError,
        "at least one token",
        "(0, 32)",
    ),
    # Collecting activations
    case(
        "collect-zero-token-budget",
        lambda: collect_activations(gpt2(), SITE, TEXT, max_tokens=0),
        ConfigError,
        "max_tokens must be >= 1",
        "got 0",
    ),
    case("collect-seq-len", lambda: collect_activations(gpt2(), SITE, TEXT, seq_len=0), ConfigError, "seq_len >= 2"),
    case("collect-no-texts", lambda: collect_activations(gpt2(), SITE, []), ConfigError, "non-empty list of texts"),
    case("collect-too-little-text", lambda: collect_activations(gpt2(), SITE, ["a b"]), ConfigError, "at least 64"),
    case(
        "collect-bad-site",
        lambda: collect_activations(gpt2(), "blocks.0.hook_nope", TEXT),
        SiteError,
        "'blocks.0.hook_nope'",
    ),
    case(
        "collect-per-head-site",
        lambda: collect_activations(gpt2(), "blocks.0.attn.hook_z", TEXT),
        ShapeError,
        "one vector per token",
        "'n_heads', 'd_head'",
    ),
]


@pytest.mark.parametrize("bad", CASES)
def test_bad_feature_inputs(bad):
    check(bad, model=gpt2())
    assert gpt2()._sessions == [] and llama()._sessions == []


STORE_CASES = [
    case(
        "store-zero-token-budget",
        lambda t: collect_store(gpt2(), SITE, TEXT, t / "s", max_tokens=0),
        ConfigError,
        "got 0",
    ),
    case("store-dtype", lambda t: collect_store(gpt2(), SITE, TEXT, t / "s", dtype="int4"), ConfigError, "'int4'"),
    case(
        "store-rows-zero",
        lambda t: collect_store(gpt2(), SITE, TEXT, t / "s", rows_per_shard=0),
        ConfigError,
        "rows_per_shard >= 1",
    ),
    case(
        "store-into-a-used-folder",
        lambda t: [
            (t / "s").mkdir(),
            (t / "s" / "notes.txt").write_text("x"),
            collect_store(gpt2(), SITE, TEXT, t / "s"),
        ],
        ConfigError,
        "expected an empty folder or an activation store",
    ),
]


@pytest.mark.parametrize("bad", STORE_CASES)
def test_bad_store_inputs(bad, tmp_path):
    check(bad, tmp_path, model=gpt2())
    assert not (tmp_path / "s").exists() or [p.name for p in (tmp_path / "s").iterdir()] in ([], ["notes.txt"])
