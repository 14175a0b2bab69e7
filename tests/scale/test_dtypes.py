"""Half precision conformance: the main verbs on tiny models loaded from a folder in bf16 and fp16, checked
against the same model in fp32 with a tolerance stated per check (docs/scale.md explains each one).

Every tolerance is ``k * u`` with ``u`` the unit roundoff of the dtype (bf16 ``2**-8``, fp16 ``2**-11``): a
correct half-precision computation is off by a few roundings, so its error scales with ``u`` (bf16 errors
are ~8x fp16's below), while a bug -- a reduction accumulated in half precision, a cast in the wrong
place, a mask value that overflows -- grows with the number of terms or is not small at all. Errors are
norm-relative, ``|half - fp32| / |fp32|`` over the whole output, so single near-zero entries do not
dominate. Run with ``-s`` to print the measured error of each check in units of ``u``.
"""

from __future__ import annotations

import os

import pytest
import torch

from mechscope.features import collect_activations, reconstruction_metrics, train_sae
from mechscope.features.sae import SAEConfig
from mechscope.features.train import SAETrainConfig
from mechscope.locate import (
    activation_patch,
    attribution_patch,
    causal_trace,
    eap,
    integrated_gradients,
    logit_lens,
    path_patch,
    train_probes,
    train_tuned_lens,
    tuned_lens,
)
from mechscope.locate.metrics import logit_diff
from mechscope.locate.tuned_lens import TunedLensConfig
from mechscope.model.loading import load_model
from mechscope.steer import (
    directional_ablation,
    mean_ablation,
    mean_difference,
    select_direction,
    steer,
    token_logodds,
)
from mechscope.steer.das import DASConfig, Pairs, das, interchange_logits
from mechscope.steer.editing.stats import StatsConfig, second_moments
from mechscope.steer.selection import DirectionSelectionConfig
from tiny_models import SENTENCES, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: the dtype as results record it (config["dtype"])
NAMES = {"bf16": "bfloat16", "fp16": "float16"}
#: unit roundoff (half the distance from 1 to the next number) of each dtype
UNIT = {"bf16": 2.0**-8, "fp16": 2.0**-11}

#: check -> k: the tolerance is k * u. The largest error measured over bf16 and fp16 (tiny llama, gpt2,
#: gemma2; seed 0; CPU) is in the comment; docs/scale.md says why each k is what it is.
K = {
    "activations": 5,  # measured <= 2.7 u: a forward pass, a few roundings per layer
    "pattern": 4,  # <= 0.7 u: the softmax runs in fp32, its inputs are one product deep
    "patching": 6,  # <= 3.4 u of the logit scale: differences of two nearly equal runs (also path patching)
    "gradients": 10,  # <= 5.8 u of the logit scale: AtP/EAP/IG, half backward passes times differences
    "lens": 4,  # <= 1.9 u (logit lens, tuned lens trained in half precision)
    "readout": 5,  # <= 2.8 u: steered / ablated / interchanged forwards (a forward's error)
    "fp32_reduction": 4,  # <= 2.6 u: means, covariances, probes over half activations, summed in fp32
    "selection": 6,  # <= 2.7 u: direction selection's directions, scores and KLs
    "sae": 2,  # <= 0.2 u: SAE training and metrics in fp32 over activations rounded once
}

FAMILIES = ["llama", "gpt2", "gemma2"]
#: where the models run (scripts/gpu_check.sh sets ``cuda``); fp32 references run on the same device
DEVICE = os.environ.get("MECHSCOPE_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for family in FAMILIES:
        hf, tok = tiny_model(family, attn_implementation="eager")
        folder = tmp_path_factory.mktemp(family)
        hf.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[family] = folder
    return out


@pytest.fixture(scope="module")
def models(folders):
    """(family, dtype) -> model loaded from the folder as a user would."""
    cache = {}

    def get(family, dtype):
        if (family, dtype) not in cache:
            cache[family, dtype] = load_model(folders[family], dtype=dtype, device=DEVICE)
        return cache[family, dtype]

    return get


def _rel(half, full, scale: float | None = None) -> float:
    half, full = half.detach().float().cpu(), full.detach().float().cpu()
    floor = 0.0 if scale is None else scale * full.numel() ** 0.5
    return float((half - full).norm() / max(float(full.norm()), floor, 1e-12))


def logit_scale(model) -> float:
    """RMS of the fp32 model's logits: the magnitude a logit difference is a difference *of*. A metric
    that subtracts two logits carries their absolute rounding error, so its error is measured against
    this scale, not against its own (possibly near-zero) value."""
    with torch.no_grad():
        return float(model(CLEAN).float().pow(2).mean().sqrt())


def check(what: str, dtype: str, half, full, kind: str, scale: float | None = None) -> None:
    """Assert every float tensor of `half` is within K[kind] * u of `full`: norm-relative, or relative to
    `scale` per entry when that is larger (metrics that are differences of quantities of that scale)."""
    halves = half if isinstance(half, dict) else {"": half}
    fulls = full if isinstance(full, dict) else {"": full}
    for name, tensor in halves.items():
        if not (torch.is_tensor(tensor) and tensor.is_floating_point()):
            continue
        err = _rel(tensor, fulls[name], scale)
        print(
            f"{what}{'.' + name if name else ''} [{dtype}]: {err / UNIT[dtype]:.2f} u (tolerance {K[kind]} u, {kind})"
        )
        assert torch.isfinite(tensor).all(), f"{what}.{name} in {dtype} has non-finite values"
        assert err <= K[kind] * UNIT[dtype], (
            f"{what}.{name} in {dtype}: relative error {err:.2e} = {err / UNIT[dtype]:.1f} u > {K[kind]} u"
        )


GEN = torch.Generator().manual_seed(0)
CLEAN = torch.randint(4, 100, (4, 8), generator=GEN)
CORRUPT = CLEAN.clone()
CORRUPT[:, 3] = torch.randint(4, 100, (4,), generator=GEN)
POS = ["the cat sat on the mat", "the dog sat on the rug", "a cat ran to the mat", "the cat ate the fish"]
NEG = ["we read a book today", "they walk in the park", "a sun is hot today", "one two three four"]


def metric(logits):
    return logit_diff(logits, [5, 6, 7, 8], [9, 10, 11, 12])


# Activations keep the model's dtype ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_caching_keeps_the_model_dtype_and_matches_fp32(models, family, dtype):
    sites = ["blocks.1.hook_resid_post", "blocks.0.mlp.hook_post", "blocks.1.attn.hook_z"]
    half_logits, half = models(family, dtype).run_with_cache(CLEAN, sites)
    full_logits, full = models(family, "fp32").run_with_cache(CLEAN, sites)
    for site in sites:
        assert half[site].dtype == DTYPES[dtype], "cached activations keep the model's dtype"
        check(f"{family} cache {site}", dtype, half[site], full[site], "activations")
    check(f"{family} logits", dtype, half_logits, full_logits, "activations")
    _, half_p = models(family, dtype).run_with_cache(CLEAN, ["blocks.1.attn.hook_pattern"])
    _, full_p = models(family, "fp32").run_with_cache(CLEAN, ["blocks.1.attn.hook_pattern"])
    check(
        f"{family} pattern",
        dtype,
        half_p["blocks.1.attn.hook_pattern"],
        full_p["blocks.1.attn.hook_pattern"],
        "pattern",
    )


# Locate ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_head_patching(models, family, dtype):
    half = activation_patch(models(family, dtype), CLEAN, CORRUPT, "heads", metric)
    full = activation_patch(models(family, "fp32"), CLEAN, CORRUPT, "heads", metric)
    assert half.config["dtype"] == NAMES[dtype] and full.config["dtype"] == "float32"
    scale = logit_scale(models(family, "fp32"))
    check(f"{family} patching", dtype, half.tensors, full.tensors, "patching", scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_attribution_patching_accumulates_in_fp32(models, family, dtype):
    half = attribution_patch(models(family, dtype), CLEAN, CORRUPT, metric)
    full = attribution_patch(models(family, "fp32"), CLEAN, CORRUPT, metric)
    assert all(t.dtype == torch.float32 for t in half.tensors.values()), "scores are fp32 sums"
    assert half.config["dtype"] != full.config["dtype"]
    check(f"{family} AtP", dtype, half.tensors, full.tensors, "gradients", logit_scale(models(family, "fp32")))


@pytest.mark.parametrize("dtype", DTYPES)
def test_eap_edge_scores(models, dtype):
    half = eap(models("llama", dtype), CLEAN, CORRUPT, metric)
    full = eap(models("llama", "fp32"), CLEAN, CORRUPT, metric)
    assert half.config["dtype"] == NAMES[dtype]
    check("EAP", dtype, half.tensors, full.tensors, "gradients", logit_scale(models("llama", "fp32")))


@pytest.mark.parametrize("dtype", DTYPES)
def test_path_patching_and_integrated_gradients(models, dtype):
    scale = logit_scale(models("llama", "fp32"))
    half = path_patch(models("llama", dtype), CLEAN, CORRUPT, metric)
    full = path_patch(models("llama", "fp32"), CLEAN, CORRUPT, metric)
    check("path patching", dtype, half.tensors, full.tensors, "patching", scale)

    def one_pair(logits):  # IG runs its interpolation steps as extra rows: a per-prompt-free metric
        return logit_diff(logits, 5, 9)

    half_ig = integrated_gradients(models("llama", dtype), CLEAN, one_pair)
    full_ig = integrated_gradients(models("llama", "fp32"), CLEAN, one_pair)
    assert half_ig.config["dtype"] == NAMES[dtype]
    check("integrated gradients", dtype, half_ig.tensors, full_ig.tensors, "gradients", scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tuned_lens_training(models, dtype):
    cfg = TunedLensConfig(steps=20, batch_tokens=64, seq_len=16)
    half_m, full_m = models("llama", dtype), models("llama", "fp32")
    half = tuned_lens(half_m, CLEAN, train_tuned_lens(half_m, SENTENCES * 8, config=cfg))
    full = tuned_lens(full_m, CLEAN, train_tuned_lens(full_m, SENTENCES * 8, config=cfg))
    check("tuned lens", dtype, half.tensors, full.tensors, "lens")


@pytest.mark.parametrize("dtype", DTYPES)
def test_logit_lens_and_causal_trace(models, dtype):
    half = logit_lens(models("llama", dtype), CLEAN, keep_logits=True)
    full = logit_lens(models("llama", "fp32"), CLEAN, keep_logits=True)
    assert half.config["dtype"] == NAMES[dtype]
    check("logit lens", dtype, half.tensors, full.tensors, "lens")
    half_t = causal_trace(models("llama", dtype), "The capital of France is", " France")
    full_t = causal_trace(models("llama", "fp32"), "The capital of France is", " France")
    assert half_t.config["dtype"] != full_t.config["dtype"]
    check("causal trace", dtype, half_t.tensors, full_t.tensors, "patching")


@pytest.mark.parametrize("dtype", DTYPES)
def test_probes_fit_in_fp32(models, dtype):
    half = train_probes(models("llama", dtype), POS + NEG, [1] * 4 + [0] * 4)
    full = train_probes(models("llama", "fp32"), POS + NEG, [1] * 4 + [0] * 4)
    assert half["weights"].dtype == torch.float32, "probes are fitted in fp32 on half activations"
    torch.testing.assert_close(half["train_accuracy"], full["train_accuracy"])
    assert half.config["dtype"] == NAMES[dtype]
    check("probes", dtype, half.tensors, full.tensors, "fp32_reduction")


# Steer -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_steering_vectors_and_directional_ablation(models, dtype):
    half_m, full_m = models("llama", dtype), models("llama", "fp32")
    half_v, full_v = mean_difference(half_m, POS, NEG, layers=[1]), mean_difference(full_m, POS, NEG, layers=[1])
    assert half_v.directions.dtype == torch.float32, "means accumulate in fp32"
    check("mean difference", dtype, half_v.directions, full_v.directions, "fp32_reduction")
    with steer(half_m, half_v, 4.0):
        half = half_m(CLEAN)
    with steer(full_m, full_v, 4.0):
        full = full_m(CLEAN)
    assert half.dtype == DTYPES[dtype]
    check("steered logits", dtype, half, full, "readout")
    direction = full_v.directions[0] / full_v.directions[0].norm()
    with directional_ablation(half_m, direction):
        half = half_m(CLEAN)
    with directional_ablation(full_m, direction):
        full = full_m(CLEAN)
    check("directionally ablated logits", dtype, half, full, "readout")
    with mean_ablation(half_m, "blocks.0.attn.hook_z", CLEAN, heads=[1]) as ablation:
        half = half_m(CORRUPT)
    assert all(v.dtype == torch.float32 for v in ablation.values.values()), "reference means are fp32"
    with mean_ablation(full_m, "blocks.0.attn.hook_z", CLEAN, heads=[1]):
        full = full_m(CORRUPT)
    check("mean-ablated logits", dtype, half, full, "readout")


@pytest.mark.parametrize("dtype", DTYPES)
def test_direction_selection(models, dtype):
    cfg = DirectionSelectionConfig(positions=(-1, -2), max_kl=10.0, require_induction=False)

    def run(model):
        target = model.to_tokens(" mat", add_special_tokens=False)["input_ids"][0, 0].item()
        return select_direction(model, POS, NEG, token_logodds(int(target)), cfg)

    half, full = run(models("llama", dtype)), run(models("llama", "fp32"))
    assert half.config["dtype"] == NAMES[dtype]
    check("direction selection", dtype, half.tensors, full.tensors, "selection")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rome_key_statistics_accumulate_in_fp32(models, dtype, tmp_path):
    config = StatsConfig(n_tokens=200, seq_len=16, batch_size=8, stream="tiny")

    def run(model, cache):
        return second_moments(model, [0], config=config, texts=SENTENCES * 8, cache_dir=cache, progress=False)

    half, full = run(models("llama", dtype), tmp_path / "half"), run(models("llama", "fp32"), tmp_path / "full")
    assert half[0].dtype == torch.float32
    check("ROME second moments", dtype, half[0], full[0], "fp32_reduction")


@pytest.mark.parametrize("dtype", DTYPES)
def test_das(models, dtype):
    base = ["The capital of France is", "A cat sat on the mat", "One two three four"] * 2
    source = ["The capital of Italy is", "The quick brown fox", "Hello world! This is"] * 2

    def pairs(model):
        label = model.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
        return Pairs(base, source, [1] * 6, [1] * 6, [label] * 6)

    half_m, full_m = models("llama", dtype), models("llama", "fp32")
    basis = torch.linalg.qr(torch.randn(32, 3, generator=torch.Generator().manual_seed(0)))[0]
    with torch.no_grad():  # the definition: one interchange with a fixed subspace
        half = interchange_logits(half_m, basis, "blocks.0.hook_resid_post", pairs(half_m))
        full = interchange_logits(full_m, basis, "blocks.0.hook_resid_post", pairs(full_m))
    check("DAS interchange", dtype, half, full, "readout")
    cfg = DASConfig(site="blocks.0.hook_resid_post", rank=3, steps=5, batch_size=4)
    learned = das(half_m, pairs(half_m), cfg)
    reference = das(full_m, pairs(full_m), cfg)
    q = learned.basis
    assert q.dtype == torch.float32, "the rotation is trained in fp32"
    assert learned.config["dtype"] == NAMES[dtype]
    torch.testing.assert_close(q.T @ q, torch.eye(3), atol=1e-5, rtol=0)
    # Adam's first steps are sign-like, so the bases take different paths; the losses agree.
    check("DAS losses", dtype, learned["losses"], reference["losses"], "readout")


# Features ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_sae_training_and_evaluation(models, dtype):
    site = "blocks.0.hook_resid_post"

    def run(model):
        x = collect_activations(model, site, SENTENCES * 8, seq_len=16)
        assert x.dtype == torch.float32
        sae, _ = train_sae(
            x, SAEConfig(d_in=32, d_sae=64, site=site), SAETrainConfig(steps=50, batch_size=64, warmup=5)
        )
        metrics = reconstruction_metrics(sae, x)
        if model.dtype != torch.float32:  # the half activations themselves (as a bf16/fp16 store holds them)
            same = x.to(model.dtype)
            assert torch.equal(same.float(), x), "collected activations are exactly the model's half values"
            from_half, _ = train_sae(
                same, SAEConfig(d_in=32, d_sae=64, site=site), SAETrainConfig(steps=50, batch_size=64, warmup=5)
            )
            assert from_half.W_dec.dtype == torch.float32, "SAE parameters stay fp32 on half inputs"
            torch.testing.assert_close(from_half.W_dec, sae.W_dec, rtol=0, atol=0)
            assert reconstruction_metrics(sae, same) == metrics
        return x, sae, {k: torch.tensor(float(v)) for k, v in metrics.items() if k != "dead_fraction"}

    half_x, half_sae, half = run(models("llama", dtype))
    full_x, full_sae, full = run(models("llama", "fp32"))
    check("collected activations", dtype, half_x, full_x, "activations")
    check("SAE decoder", dtype, half_sae.W_dec, full_sae.W_dec, "sae")
    check("SAE metrics", dtype, half, full, "sae")
