"""Bad input to the locate verbs (patching, lenses, probes, tracing, attribution, heads, AtP, path patching, tuned
lens): clear errors naming what was expected and what came; the model's parameters unchanged."""

from __future__ import annotations

import math

import pytest
import torch
from bad_cases import case, check, gpt2, llama

from mechscope.errors import ConfigError, ShapeError, SiteError
from mechscope.locate.attribution import logit_attribution
from mechscope.locate.attribution_patching import AtPConfig, attribution_patch
from mechscope.locate.causal_tracing import TracingConfig, causal_trace
from mechscope.locate.heads import attention_patterns
from mechscope.locate.lens import logit_lens
from mechscope.locate.patching import PromptMismatchError, activation_patch
from mechscope.locate.path_patching import path_patch
from mechscope.locate.probes import ProbeConfig, train_probes
from mechscope.locate.tuned_lens import TunedLens, TunedLensConfig, train_tuned_lens, tuned_lens
from mechscope.metrics import MetricError, logit_diff_metric
from mechscope.results import ModelMismatchError

pytestmark = pytest.mark.usefixtures("single_thread")


C, X = "the dog sat on the", "the the sat on the"  # 9 tokens each
TEXTS = ["a cat", "a dog", "the cat", "the dog"] * 2
LABELS = [0, 1] * 4


def metric():
    m = gpt2()
    return logit_diff_metric(m.to_single_token(" dog"), m.to_single_token(" the"))


def patch(*args, **kwargs):
    return activation_patch(gpt2(), *args, **kwargs)


def probes(texts=TEXTS, labels=LABELS, **kwargs):
    return train_probes(gpt2(), texts, labels, **kwargs)


CASES = [
    # Activation patching
    case("patch-kind", lambda: patch(C, X, "nope", metric()), SiteError, "'nope'", "expected one of"),
    case("patch-direction", lambda: patch(C, X, "heads", metric(), direction="up"), ConfigError, "'noising'", "'up'"),
    case("patch-method", lambda: patch(C, X, "heads", metric(), method="fast"), ConfigError, "'batched'", "'fast'"),
    case("patch-chunk-zero", lambda: patch(C, X, "heads", metric(), chunk_size=0), ConfigError, ">= 1", "got 0"),
    case("patch-position", lambda: patch(C, X, "resid_pre", metric(), positions=[20]), ConfigError, "[-9, 9)", "[20]"),
    case("patch-head-4-of-4", lambda: patch(C, X, "heads", metric(), units=[4]), ConfigError, "[0, 4)", "got [4]"),
    case("patch-head-negative", lambda: patch(C, X, "heads", metric(), units=[-1]), ConfigError, "[0, 4)", "[-1]"),
    case(
        "patch-neuron-128",
        lambda: patch(C, X, "neurons", metric(), units=[128]),
        ConfigError,
        "[0, 128)",
        "mlp.hook_post",
        "[128]",
    ),
    case(
        "patch-lengths-differ",
        lambda: patch(C, "the", "heads", metric()),
        PromptMismatchError,
        "same [batch, pos] token shape",
        "clean (1, 9) and corrupt (1, 3)",
    ),
    case("patch-empty", lambda: patch([], [], "heads", metric()), ConfigError, "non-empty list of strings", "got list"),
    case(
        "patch-metric-shape",
        lambda: patch(C, X, "heads", lambda lg: lg),
        MetricError,
        "scalar or [batch]=(1,)",
        "(1, 9, 128)",
    ),
    case(
        "patch-metric-nan",
        lambda: patch(C, X, "heads", lambda lg: lg[:, -1, 0] * math.nan),
        MetricError,
        "finite on the unpatched runs",
        "nan",
    ),
    case(
        "patch-too-long",
        lambda: patch("the " * 80, "the " * 80, "heads", metric()),
        ConfigError,
        "context of 64 positions",
    ),
    # Lenses
    case("lens-k-zero", lambda: logit_lens(gpt2(), "a b", k=0), ConfigError, "1..128", "got 0"),
    case("lens-k-big", lambda: logit_lens(gpt2(), "a b", k=1000), ConfigError, "1..128", "1000"),
    case("lens-positions-mode", lambda: logit_lens(gpt2(), "a b", positions="first"), ConfigError, "'last'", "'first'"),
    case("lens-position-range", lambda: logit_lens(gpt2(), "a b", positions=[50]), ConfigError, "[-4, 4)", "[50]"),
    case("lens-batch-zero", lambda: logit_lens(gpt2(), "a b", batch_size=0), ConfigError, "positive", "got 0"),
    case("lens-no-prompts", lambda: logit_lens(gpt2(), []), ConfigError, "non-empty list of strings"),
    case(
        "lens-empty-prompt-ids", lambda: logit_lens(gpt2(), {"input_ids": [[]]}), ConfigError, "as a tensor", "got list"
    ),
    case(
        "lens-empty-ids",
        lambda: logit_lens(gpt2(), torch.zeros(1, 0, dtype=torch.long)),
        ConfigError,
        "at least one token",
        "(1, 0)",
    ),
    # Probes
    case("probe-one-class", lambda: probes(labels=[1] * 8), ConfigError, "exactly 2 values", "got [1]"),
    case("probe-three-classes", lambda: probes(labels=[0, 1, 2, 0, 1, 2, 0, 1]), ConfigError, "got [0, 1, 2]"),
    case("probe-empty", lambda: probes([], []), ConfigError, "probes need examples", "empty list"),
    case("probe-label-count", lambda: probes(labels=[0, 1]), ShapeError, "8 examples but 2 labels"),
    case(
        "probe-too-few-per-class",
        lambda: probes(["a", "b", "c"], [0, 1, 1]),
        ConfigError,
        "at least 2 examples of each class",
        "1 of class 0",
    ),
    case("probe-kind", lambda: ProbeConfig(kind="svm"), ConfigError, "'logistic'", "'svm'"),
    case("probe-folds-one", lambda: ProbeConfig(folds=1), ConfigError, ">= 2", "got 1"),
    case("probe-l2-nan", lambda: ProbeConfig(l2=math.nan), ConfigError, "l2 must be >= 0", "nan"),
    case("probe-l2-negative", lambda: ProbeConfig(l2=-1.0), ConfigError, "l2 must be >= 0", "-1.0"),
    case("probe-test-fraction", lambda: ProbeConfig(test_fraction=1.5), ConfigError, "(0, 1)", "1.5"),
    case("probe-max-iter", lambda: ProbeConfig(max_iter=0), ConfigError, "max_iter", "got 0"),
    case("probe-positive-label", lambda: probes(positive_label=5), ConfigError, "positive label 5", "[0, 1]"),
    case("probe-layer-beyond", lambda: probes(layers=[5]), SiteError, "past the last layer", "0..1"),
    case("probe-site-kind", lambda: probes(kind="attn.hook_z"), ConfigError, "[batch, pos, features]", "attn.hook_z"),
    case("probe-position", lambda: probes(position=40), ShapeError, "positions [40", "real tokens"),
    case("probe-test-without-labels", lambda: probes(test_inputs=TEXTS), ConfigError, "test_inputs and test_labels"),
    case("probe-batch-zero", lambda: probes(batch_size=0), ConfigError, "batch_size", "got 0"),
    # Causal tracing
    case("trace-subject-missing", lambda: causal_trace(gpt2(), C, "cat"), ConfigError, "'cat'", "not found in"),
    case("trace-target-words", lambda: causal_trace(gpt2(), C, "dog", target="the cat"), ConfigError, "single token"),
    case(
        "trace-target-id",
        lambda: causal_trace(gpt2(), C, "dog", target=10**6),
        ConfigError,
        "[0, 128)",
        "1000000",
    ),
    case("trace-subject-positions", lambda: causal_trace(gpt2(), C, [40]), ConfigError, "[-9, 9)", "[40]"),
    case("trace-noise-nan", lambda: TracingConfig(noise=math.nan), ConfigError, "noise must be > 0", "nan"),
    case("trace-noise-zero", lambda: TracingConfig(noise=0.0), ConfigError, "noise must be > 0", "0.0"),
    case("trace-samples-zero", lambda: TracingConfig(samples=0), ConfigError, "samples must be >= 1", "got 0"),
    # Attribution
    case("dla-by", lambda: logit_attribution(gpt2(), C, " dog", by="block"), ConfigError, "'head'", "'block'"),
    case("dla-target-words", lambda: logit_attribution(gpt2(), C, "the cat"), ConfigError, "single token", "4 tokens"),
    case("dla-target-id", lambda: logit_attribution(gpt2(), C, 10**6), ConfigError, "[0, 128)", "[1000000]"),
    case("dla-position", lambda: logit_attribution(gpt2(), C, " dog", position=40), ShapeError, "[40]", "9 positions"),
    case(
        "dla-targets-per-row",
        lambda: logit_attribution(gpt2(), [C, X], [" dog", " the", " a"]),
        ConfigError,
        "one token or 2 tokens",
        "got 3",
    ),
    # Heads, AtP, path patching
    case("patterns-layer", lambda: attention_patterns(gpt2(), C, layers=[5]), SiteError, "past the last layer"),
    case("atp-node", lambda: AtPConfig(nodes=("bogus",)), ConfigError, "['heads', 'neurons', 'resid']", "['bogus']"),
    case("atp-lengths-differ", lambda: attribution_patch(gpt2(), C, "the", metric()), PromptMismatchError, "(1, 3)"),
    case(
        "path-receiver-layer",
        lambda: path_patch(gpt2(), C, X, metric(), receivers=[(5, 0, "q")]),
        SiteError,
        "past the last layer",
    ),
    case(
        "path-sender-head",
        lambda: path_patch(gpt2(), C, X, metric(), senders=[[(0, 9)]]),
        ConfigError,
        "head in 0..3",
        "[(0, 9)]",
    ),
    # Tuned lens
    case("tuned-lens-lr-nan", lambda: TunedLensConfig(lr=math.nan), ConfigError, "finite number > 0", "nan"),
    case("tuned-lens-lr-inf", lambda: TunedLensConfig(lr=math.inf), ConfigError, "finite number > 0", "inf"),
    case("tuned-lens-lr-negative", lambda: TunedLensConfig(lr=-0.1), ConfigError, "> 0", "-0.1"),
    case("tuned-lens-steps-zero", lambda: TunedLensConfig(steps=0), ConfigError, "steps must be >= 1", "got 0"),
    case(
        "tuned-lens-zero-token-budget",
        lambda: TunedLensConfig(batch_tokens=0),
        ConfigError,
        "batch_tokens must be >= 1",
        "got 0",
    ),
    case(
        "tuned-lens-of-another-architecture",
        lambda: tuned_lens(llama(), "a b", TunedLens(32, 2, model_fingerprint="0" * 16, model_type="gpt2")),
        ModelMismatchError,
        "trained on a gpt2 model",
        "is a llama",
    ),
    case(
        "tuned-lens-of-another-size",
        lambda: tuned_lens(gpt2(), "a b", TunedLens(16, 2, model_type="gpt2")),
        ShapeError,
        "d_model=16",
        "d_model=32",
    ),
    case(
        "tuned-lens-no-text",
        lambda: train_tuned_lens(gpt2(), [], config=TunedLensConfig(steps=1)),
        ConfigError,
        "0 tokens",
        "seq_len=64",
    ),
    case(
        "tuned-lens-short-text",
        lambda: train_tuned_lens(gpt2(), ["a"], config=TunedLensConfig(steps=1)),
        ConfigError,
        "2 tokens",
        "seq_len=64",
    ),
]


@pytest.mark.parametrize("bad", CASES)
def test_bad_locate_inputs(bad):
    check(bad, model=gpt2())
    assert gpt2()._sessions == []
