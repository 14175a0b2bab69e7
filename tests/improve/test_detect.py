"""Detectors, calibration and evaluation: each method's definition, and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mechscope.errors import ConfigError, ShapeError, SiteError
from mechscope.improve.detect import (
    DetectionReport,
    Detector,
    DetectorConfig,
    MahalanobisDetector,
    TokenActivations,
    auroc,
    bootstrap_interval,
    calibrate,
    controls_needed,
    evaluate_detector,
    expected_calibration_error,
    fit_anomaly,
    fit_supervised,
    ledoit_wolf,
    recall_at_fpr,
    roc_curve,
    train_detector,
)
from mechscope.model.hooked import HookedModel
from mechscope.results import ModelMismatchError
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

SITE = "blocks.1.hook_resid_post"
INFO = {"fingerprint": "synthetic", "model_type": "synthetic", "d_model": 16}
WORDS = ["cat", "dog", "mat", "fox", "park", "book", "store", "world", "Paris", "Rome", "drink", "tower"]


@pytest.fixture(scope="module")
def model() -> HookedModel:
    hf, tok = tiny_model("llama")
    return HookedModel(hf, tok)


def _texts(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(WORDS), (n, 5), generator=g).tolist()
    return ["The " + " ".join(WORDS[i] for i in row) + "." for row in idx]


def _acts(x: torch.Tensor, per_example: int = 1) -> TokenActivations:
    n = len(x) // per_example
    return TokenActivations({"s": x}, torch.arange(n).repeat_interleave(per_example), n)


# Metrics ------------------------------------------------------------------------------------------
def test_auroc_is_the_pairwise_probability_with_ties_halved():
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 6, (40,), generator=g).float()
    neg = torch.randint(0, 5, (30,), generator=g).float()
    brute = ((pos[:, None] > neg[None, :]).float() + 0.5 * (pos[:, None] == neg[None, :]).float()).mean()
    assert auroc(pos, neg) == pytest.approx(float(brute))
    fpr, tpr, _ = roc_curve(pos, neg)
    area = float(torch.trapezoid(tpr, fpr))
    assert area == pytest.approx(float(brute))


def test_recall_at_fpr_never_exceeds_the_rate_on_the_negatives():
    g = torch.Generator().manual_seed(1)
    neg, pos = torch.randn(200, generator=g), torch.randn(100, generator=g) + 2
    from mechscope.improve.detect import threshold_at_fpr

    for rate in (0.01, 0.05, 0.2):
        t = threshold_at_fpr(neg, rate)
        assert float((neg > t).double().mean()) <= rate
        assert float((neg >= t).double().mean()) > rate  # the lowest such threshold
        assert recall_at_fpr(pos, neg, rate) == pytest.approx(float((pos > t).float().mean()))


def test_ece_by_hand_and_bootstrap_interval_contains_the_value():
    p = torch.tensor([0.05, 0.15, 0.95, 0.85, 0.93], dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 1, 0])
    # bins: [0, .1): .05 vs 0; [.1, .2): .15 vs 1; [.8, .9): .85 vs 1; [.9, 1]: mean .94 vs accuracy .5
    expected = (0.05 + 0.85 + 0.15) / 5 + 2 / 5 * abs(0.5 - 0.94)
    assert expected_calibration_error(p, y) == pytest.approx(expected)
    g = torch.Generator().manual_seed(2)
    pos, neg = torch.randn(60, generator=g) + 1, torch.randn(60, generator=g)
    lo, hi = bootstrap_interval(auroc, pos, neg, n_boot=200)
    assert lo <= auroc(pos, neg) <= hi and hi - lo < 0.4


def test_metrics_refuse_nan_scores():
    with pytest.raises(ConfigError, match="NaN"):
        auroc(torch.tensor([1.0, math.nan]), torch.tensor([0.0]))


# Definitions on planted features -----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["probe", "mean_difference"])
def test_supervised_detector_recovers_a_planted_linear_feature(kind):
    g = torch.Generator().manual_seed(3)
    v = torch.randn(16, generator=g)
    v /= v.norm()
    noise = torch.randn(400, 16, generator=g) * torch.linspace(0.2, 2.0, 16)  # anisotropic
    y = torch.arange(400) % 2
    x = noise + 4.0 * y[:, None] * v
    cfg = DetectorConfig(kind=kind, sites=("s",), pooling="last")
    det = fit_supervised(_acts(x[y == 1]), _acts(x[y == 0]), cfg, INFO)
    test_noise = torch.randn(400, 16, generator=g) * torch.linspace(0.2, 2.0, 16)
    xt = test_noise + 4.0 * y[:, None] * v
    s = det.token_scores_from({"s": xt})
    assert auroc(s[y == 1], s[y == 0]) > 0.97
    if kind == "probe":  # the probe's direction in activation space is the optimal (LDA) one, Sigma^-1 v
        w = det.weight / det.std
        optimal = v / torch.linspace(0.2, 2.0, 16) ** 2
        assert float(torch.nn.functional.cosine_similarity(w, optimal, dim=0)) > 0.9
    if kind == "mean_difference":
        assert float(det.direction @ v) > 0.9
        # score = projection minus the midpoint of the class means
        mid = float(((x[y == 1].mean(0) + x[y == 0].mean(0)) / 2) @ det.direction)
        assert float(s[0]) == pytest.approx(float(xt[0] @ det.direction) - mid, abs=1e-4)


def _sklearn_style_ledoit_wolf(x: torch.Tensor) -> torch.Tensor:
    """Independent Ledoit-Wolf (sklearn's algorithm, written from the paper's estimator)."""
    x = x.double() - x.double().mean(0)
    n, p = x.shape
    emp = x.T @ x / n
    mu = torch.trace(emp) / p
    x2 = x**2
    beta_ = float(((x2.T @ x2).sum() / n - (emp**2).sum()) / n)
    delta = float(((emp - mu * torch.eye(p, dtype=torch.float64)) ** 2).sum())
    s = min(beta_, delta) / delta
    return (1 - s) * emp + s * mu * torch.eye(p, dtype=torch.float64)


def test_mahalanobis_score_is_the_distance_under_the_ledoit_wolf_covariance():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(60, 16, generator=g) @ torch.randn(16, 16, generator=g)
    cov, _ = ledoit_wolf(x)
    torch.testing.assert_close(cov, _sklearn_style_ledoit_wolf(x))
    det = fit_anomaly(_acts(x), DetectorConfig(kind="mahalanobis", sites=("s",), pooling="last"), INFO)
    q = torch.randn(10, 16, generator=g) * 3
    z = (q.double() - x.double().mean(0)).T
    expected = (z * torch.linalg.solve(cov, z)).sum(0).sqrt()
    torch.testing.assert_close(det.token_scores_from({"s": q}).double(), expected, atol=1e-3, rtol=1e-4)


def test_anomaly_detector_flags_a_planted_off_distribution_shift():
    g = torch.Generator().manual_seed(5)
    normal = torch.randn(300, 16, generator=g)
    det = fit_anomaly(_acts(normal), DetectorConfig(kind="mahalanobis", sites=("s",), pooling="last"), INFO)
    clean = det.token_scores_from({"s": torch.randn(100, 16, generator=g)})
    shifted = det.token_scores_from({"s": torch.randn(100, 16, generator=g) + 2.0 * torch.eye(16)[0] * 3})
    assert auroc(shifted, clean) > 0.99


def test_multi_site_mahalanobis_combines_standardised_distances():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(100, 16, generator=g), torch.randn(100, 16, generator=g) * 5
    acts = TokenActivations({"a": a, "b": b}, torch.arange(100), 100)
    det = fit_anomaly(acts, DetectorConfig(kind="mahalanobis", sites=("a", "b"), pooling="last"), INFO)
    d = det.site_distances({"a": a, "b": b})
    expected = ((d - d.mean(1, keepdim=True)) / d.std(1, keepdim=True)).mean(0)
    torch.testing.assert_close(det.token_scores_from({"a": a, "b": b}), expected, atol=1e-4, rtol=1e-4)


# On a model -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def probe(model):
    cfg = DetectorConfig(kind="probe", sites=(SITE,), pooling="mean")
    return train_detector(model, cfg, positive=_texts(20, 0), negative=_texts(20, 1), description="random words")


def test_pooling_follows_its_definition(model, probe):
    texts = _texts(4, 7)
    per_token = probe.score_tokens(model, texts)
    for pooling, fn in (("mean", torch.mean), ("max", torch.max), ("last", lambda t: t[-1])):
        probe.pooling = pooling
        try:
            pooled = probe.score(model, texts)
        finally:
            probe.pooling = "mean"
        torch.testing.assert_close(pooled, torch.stack([fn(t) for t in per_token]))


def test_token_scores_are_those_of_each_example_alone_and_pairs_score_the_response(model, probe):
    texts = [*_texts(3, 8), "The cat."]
    together = probe.score_tokens(model, texts)
    for text, scores in zip(texts, together, strict=True):
        torch.testing.assert_close(probe.score_tokens(model, [text])[0], scores, atol=1e-5, rtol=1e-5)
    full = probe.score_tokens(model, ["The cat sat on the mat."])[0]
    response = probe.score_tokens(model, [("The cat sat", " on the mat.")])[0]
    torch.testing.assert_close(response, full[-len(response) :], atol=1e-5, rtol=1e-5)
    assert len(response) < len(full)
    # the special <bos> token is never scored
    ids = model.to_tokens("The cat sat on the mat.")["input_ids"][0]
    assert len(full) == len(ids) - 1
    # a text that writes its own <bos> (a chat template's) is read with one, so it scores as the plain text
    torch.testing.assert_close(probe.score_tokens(model, ["<bos>The cat sat on the mat."])[0], full)


def test_turn_markers_a_tokenizer_adds_as_special_are_never_scored(model):
    # Gemma's tokenizer names 5 special tokens but adds <start_of_turn> / <end_of_turn> (and 6,247 more) as
    # special added tokens: a chat-formatted example scores its text, never its turn markers.
    from tokenizers import AddedToken

    from mechscope.improve.detect.activations import token_activations

    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.add_tokens([AddedToken("<start_of_turn>", special=True), AddedToken("<end_of_turn>", special=True)])
    turn = tokenizer.convert_tokens_to_ids("<start_of_turn>")
    assert turn not in tokenizer.all_special_ids
    chat = HookedModel(model.hf_model, tokenizer)
    text = "<start_of_turn>The cat sat<end_of_turn>"
    ids = chat.to_tokens(text)["input_ids"][0].tolist()
    assert ids.count(turn) == 1
    scored = token_activations(chat, [text, "The cat sat"], [SITE])
    assert int((scored.example == 0).sum()) == len(ids) - 3  # no <bos>, no turn markers
    assert int((scored.example == 0).sum()) == int((scored.example == 1).sum())


def test_detector_saves_loads_and_refuses_another_model(model, probe, tmp_path):
    calibrated = calibrate(probe, model, _texts(50, 9), target_fpr=0.1, description="random words")
    path = calibrated.save(tmp_path / "det.safetensors")
    loaded = Detector.load(path, model)
    assert type(loaded) is type(calibrated) and loaded.threshold == calibrated.threshold
    assert loaded.training["description"] == "random words" and loaded.calibration["n_controls"] == 50
    torch.testing.assert_close(loaded.score(model, _texts(3, 10)), calibrated.score(model, _texts(3, 10)))
    other = HookedModel(*tiny_model("llama", seed=11))
    with pytest.raises(ModelMismatchError):
        Detector.load(path, other)
    with pytest.raises(ModelMismatchError):
        calibrated.score(other, _texts(2, 0))


def test_calibrated_threshold_gives_the_requested_fpr(model, probe):
    controls = _texts(400, 12)
    for rate in (0.05, 0.1):
        det = calibrate(probe, model, controls, target_fpr=rate)
        n = len(controls)
        cal_fpr = det.calibration["calibration_fpr"]
        assert rate - 1 / n - 1e-9 <= cal_fpr <= rate
        fresh = det.score(model, _texts(400, 13))
        fresh_fpr = float((fresh > det.threshold).float().mean())
        se = math.sqrt(rate * (1 - rate) / n) * math.sqrt(2)  # both sets sampled
        assert abs(fresh_fpr - rate) <= 3.5 * se


def test_evaluate_detector_reports_splits_with_intervals(model, probe, tmp_path):
    det = calibrate(probe, model, _texts(20, 14), target_fpr=0.05)
    report = evaluate_detector(
        det, model, _texts(15, 0), _texts(15, 1), shifted=(_texts(10, 15), _texts(10, 16)), n_boot=50
    )
    assert report.splits == ["held_out", "shifted"]
    pos, neg = report.scores("held_out", "positive"), report.scores("held_out", "negative")
    assert report.value("auroc") == pytest.approx(auroc(pos, neg))
    assert report.value("auroc", stat="low") <= report.value("auroc") <= report.value("auroc", stat="high")
    assert report.value("fpr_at_threshold") == pytest.approx(float((neg > det.threshold).double().mean()))
    assert not math.isnan(report.value("ece"))
    assert "| held_out | 15 / 15 |" in report.table()
    loaded = DetectionReport.load(report.save(tmp_path / "r.safetensors"))
    assert loaded.value("auroc", "shifted") == report.value("auroc", "shifted")
    fig = report.plot()
    assert len(fig.data) >= 5


def test_mahalanobis_has_no_probabilities_so_no_ece(model):
    det = train_detector(model, DetectorConfig(kind="mahalanobis", sites=(SITE,), pooling="max"), normal=_texts(30, 0))
    assert isinstance(det, MahalanobisDetector)
    report = evaluate_detector(det, model, _texts(8, 1), _texts(8, 2), n_boot=20)
    assert math.isnan(report.value("ece")) and "n/a" in report.table()


# Bad input ----------------------------------------------------------------------------------------
def test_bad_input_is_refused_clearly(model, probe):
    with pytest.raises(SiteError):
        train_detector(model, DetectorConfig(sites=("blocks.9.hook_resid_post",)), positive=["a b"], negative=["c d"])
    with pytest.raises(ShapeError, match="one vector per token"):
        train_detector(model, DetectorConfig(sites=("blocks.0.attn.hook_pattern",)), positive=["a"], negative=["b"])
    with pytest.raises(ConfigError, match="empty"):
        train_detector(model, DetectorConfig(sites=(SITE,)), positive=[], negative=["The cat."])
    with pytest.raises(ConfigError, match="positive= and negative="):
        train_detector(model, DetectorConfig(sites=(SITE,)), positive=["The cat."])
    with pytest.raises(ConfigError, match="normal= examples only"):
        train_detector(model, DetectorConfig(kind="mahalanobis", sites=(SITE,)), positive=["a"], negative=["b"])
    with pytest.raises(ConfigError, match="pooling"):
        DetectorConfig(sites=(SITE,), pooling="median")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs at least 100 control examples"):
        calibrate(probe, model, _texts(40, 0), target_fpr=0.01)
    assert controls_needed(0.01) == 100 and controls_needed(0.05) == 20
    with pytest.raises(ConfigError, match="must be a text or a"):
        calibrate(probe, model, [1, 2, 3] * 40, target_fpr=0.01)  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="list of texts"):
        calibrate(probe, model, torch.zeros(200), target_fpr=0.01)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="target_fpr"):
        calibrate(probe, model, _texts(10, 0), target_fpr=1.5)
    broken = calibrate(probe, model, _texts(20, 0), target_fpr=0.1)
    threshold_before = broken.threshold
    broken.weight = broken.weight.clone()
    broken.weight[0] = math.nan
    with pytest.raises(ConfigError, match="NaN"):
        broken.score(model, _texts(2, 0))
    with pytest.raises(ConfigError, match="NaN"):
        calibrate(broken, model, _texts(20, 0), target_fpr=0.1)
    assert broken.threshold == threshold_before  # nothing changed
    with pytest.raises(ConfigError, match="no alert threshold"):
        probe.alerts(torch.zeros(2))


def test_one_class_training_data_is_refused():
    x = torch.randn(10, 16)
    cfg = DetectorConfig(kind="probe", sites=("s",), pooling="last")
    with pytest.raises(ConfigError, match="both classes"):
        fit_supervised(
            _acts(x), TokenActivations({"s": torch.zeros(0, 16)}, torch.zeros(0, dtype=torch.long), 0), cfg, INFO
        )
    with pytest.raises(ConfigError, match="at least 2"):
        fit_anomaly(_acts(x[:1]), DetectorConfig(kind="mahalanobis", sites=("s",), pooling="last"), INFO)
