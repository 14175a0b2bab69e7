"""The runtime monitor on tiny models: scores during generate equal scores afterwards (batched, left
padding, KV cache); log never changes outputs; stop ends alerted rows; intervene acts only after the alert."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import ConfigError, ShapeError
from mechscope.improve.detect import DetectorConfig, ProbeDetector, calibrate, train_detector
from mechscope.improve.monitor import generated_mask, monitor, scores_afterwards
from mechscope.model.hooked import HookedModel
from mechscope.results import ModelMismatchError
from mechscope.steer import directional_ablation
from tiny_models import EOS, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["The cat sat on", "When Mary and John went to the store, John", "Hello world"]
SITE = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request) -> HookedModel:
    hf, tok = tiny_model(request.param)
    return HookedModel(hf, tok)


@pytest.fixture(scope="module")
def detector(model):
    pos = ["The cat sat on the mat.", "A cat looked at the dog.", "The quick brown fox jumps."]
    neg = ["One two three four five.", "Hello world! This is a test.", "The capital of Italy is Rome."]
    return train_detector(model, DetectorConfig(kind="probe", sites=(SITE,), pooling="max"), positive=pos, negative=neg)


def _generate(model, prompts, **kw):
    batch = model.to_tokens(prompts, padding_side="left")
    with torch.no_grad():
        out = model.generate(batch, max_new_tokens=6, do_sample=False, **kw)
    return batch, out


def test_scores_during_generate_equal_scores_afterwards(model, detector):
    with monitor(model, detector, threshold=1e9, scope="all") as mon:
        batch, out = _generate(model, PROMPTS)
    trace = mon.trace
    mask = generated_mask(out, batch["attention_mask"])
    after = scores_afterwards(model, detector, out, mask)
    for r, row in enumerate(trace.rows):
        n = len(row.scores)
        assert n == int(mask[r].sum()) - 1  # every real token but the final sampled one
        torch.testing.assert_close(torch.tensor(row.scores), torch.tensor(after[r][:n]), atol=1e-4, rtol=1e-4)
        assert row.token_ids == out[r][mask[r].bool()].tolist()[:n]
        assert sum(row.generated) == out.shape[1] - batch["input_ids"].shape[1] - 1


def test_running_pool_and_alert_follow_the_definition(model, detector):
    with monitor(model, detector, threshold=1e9) as mon:
        _generate(model, PROMPTS)
    row = mon.trace.rows[1]
    gen = [s for s, g in zip(row.scores, row.generated, strict=True) if g]
    running = [r for r, g in zip(row.running, row.generated, strict=True) if g]
    assert running == pytest.approx([max(gen[: i + 1]) for i in range(len(gen))], abs=1e-5)
    # a threshold between two running values alerts at the first token above it
    thr = (running[1] + running[2]) / 2 if running[2] > running[1] else running[0] - 1
    with monitor(model, detector, threshold=thr) as mon2:
        _generate(model, PROMPTS)
    first = next(i for i, v in enumerate(running) if v > thr)
    row2 = mon2.trace.rows[1]
    assert row2.alert is not None and row2.alert - row2.generated.index(True) == first


def test_log_never_changes_outputs(model, detector):
    _, plain = _generate(model, PROMPTS)
    with monitor(model, detector, threshold=-1e9, policy="log") as mon:
        _, logged = _generate(model, PROMPTS)
    assert torch.equal(plain, logged)
    assert all(mon.trace.alerted)


def test_stop_ends_alerted_rows_with_the_stop_token(model, detector):
    with monitor(model, detector, threshold=-1e9, policy="stop", stop_token=EOS) as mon:
        batch, out = _generate(model, PROMPTS, eos_token_id=EOS)
    n_prompt = batch["input_ids"].shape[1]
    for r, row in enumerate(mon.trace.rows):
        assert row.alert is not None
        # alert at the first generated token read; the token it chose is the stop token, then padding
        assert out[r, n_prompt + 1].item() == EOS
        assert (out[r, n_prompt + 2 :] == model.tokenizer.pad_token_id).all()


def _first_alert_threshold(model, detector):
    """(row, threshold, column): a threshold the row's score first crosses at a generated token after its first."""
    with monitor(model, detector, threshold=1e9) as mon:
        _generate(model, PROMPTS)
    for row, r in enumerate(mon.trace.rows):
        gen = [i for i, g in enumerate(r.generated) if g]
        for step in range(1, len(gen)):
            below = max(r.running[i] for i in gen[:step])
            if r.running[gen[step]] > below:
                return row, (r.running[gen[step]] + below) / 2, r.columns[gen[step]]
    raise AssertionError("no row's score rises after its first generated token; pick other prompts")


@pytest.fixture(scope="module")
def last_detector(model):
    pos = ["The cat sat on the mat.", "A cat looked at the dog.", "The quick brown fox jumps."]
    neg = ["One two three four five.", "Hello world! This is a test.", "The capital of Italy is Rome."]
    cfg = DetectorConfig(kind="mean_difference", sites=(SITE,), pooling="last")
    return train_detector(model, cfg, positive=pos, negative=neg)


def test_intervene_changes_nothing_before_the_alert_and_applies_after(model, last_detector):
    detector = last_detector
    k, thr, alert_col = _first_alert_threshold(model, detector)
    g = torch.Generator().manual_seed(3)
    direction = torch.randn(model.dims.d_model, generator=g)
    batch, plain = _generate(model, PROMPTS)
    ablation = directional_ablation(model, direction)
    with monitor(model, detector, threshold=thr, policy="intervene", intervention=ablation) as mon:
        _, guarded = _generate(model, PROMPTS)
    row = mon.trace.rows[k]
    assert row.columns[row.alert] == alert_col
    # tokens up to the alerted one are those of plain generation
    assert torch.equal(guarded[k, : alert_col + 1], plain[k, : alert_col + 1])
    # reference: one full forward, ablation at columns > alert (every site) and at the alert column for
    # sites after the detector's site; its greedy choices must be the guarded continuation
    detector_order = model.site(SITE).order
    mask = generated_mask(guarded, batch["attention_mask"])
    plan = ablation.hook_plan()

    def gate(site):
        after_detector = site.order >= detector_order  # the detector site itself: after it is read

        def fn(act, ctx):
            new = plan[site][0](act.clone(), ctx)
            cols = torch.arange(act.shape[1])
            on = (cols > alert_col) | ((cols == alert_col) & after_detector)
            keep = torch.zeros(act.shape[0], dtype=torch.bool)
            keep[k] = True
            m = (keep[:, None] & on[None, :]).reshape(act.shape[0], act.shape[1], 1)
            return torch.where(m, new, act)

        return fn

    with torch.no_grad(), model.hooks({s: gate(s) for s in plan}):
        logits = model.forward({"input_ids": guarded, "attention_mask": mask})
    choices = logits[k].argmax(-1)
    n = guarded.shape[1]
    assert torch.equal(choices[alert_col : n - 1], guarded[k, alert_col + 1 : n])
    # and the intervention did act: the guarded continuation differs from an unguarded reference forward
    # at least in its logits
    with torch.no_grad():
        plain_logits = model.forward({"input_ids": guarded, "attention_mask": mask})
    assert not torch.allclose(plain_logits[k, alert_col + 1 :], logits[k, alert_col + 1 :])
    # rows without an alert are untouched
    for r, row_r in enumerate(mon.trace.rows):
        if row_r.alert is None:
            assert torch.equal(guarded[r], plain[r])


def test_monitor_bad_input(model, detector):
    with pytest.raises(ConfigError, match="threshold"):
        monitor(model, detector)
    with pytest.raises(ConfigError, match="policy must be one of"):
        monitor(model, detector, threshold=0.0, policy="block")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs intervention"):
        monitor(model, detector, threshold=0.0, policy="intervene")
    with pytest.raises(ConfigError, match="only to policy 'intervene'"):
        ablation = directional_ablation(model, torch.ones(model.dims.d_model))
        monitor(model, detector, threshold=0.0, intervention=ablation)
    other = HookedModel(*tiny_model("gpt2", seed=5))
    with pytest.raises((ModelMismatchError, ShapeError)):
        monitor(other, detector, threshold=0.0)


def test_calibrated_detector_monitors_without_threshold(model, detector):
    controls = [f"The cat number {i} sat on the mat." for i in range(20)]
    calibrated = calibrate(detector, model, controls, target_fpr=0.1)
    assert isinstance(calibrated, ProbeDetector)
    with monitor(model, calibrated) as mon:
        _generate(model, PROMPTS[:1])
    assert mon.trace.threshold == calibrated.threshold


def test_prompt_scope_with_last_pooling_screens_the_prompts_final_token(model, last_detector):
    with monitor(model, last_detector, threshold=1e9, scope="prompt") as mon:
        batch, _ = _generate(model, PROMPTS)
    last_scores = last_detector.score(model, PROMPTS)
    for r, row in enumerate(mon.trace.rows):
        eligible = [i for i, v in enumerate(row.running) if v == v]  # not NaN
        assert len(eligible) == 1 and not row.generated[eligible[0]]
        assert row.columns[eligible[0]] == batch["input_ids"].shape[1] - 1
        assert row.running[eligible[0]] == pytest.approx(float(last_scores[r]), abs=1e-4)
    threshold = float(last_scores.median())
    with monitor(model, last_detector, threshold=threshold, scope="prompt", policy="stop", stop_token=EOS) as mon:
        _, out = _generate(model, PROMPTS, eos_token_id=EOS)
    n_prompt = batch["input_ids"].shape[1]
    for r, row in enumerate(mon.trace.rows):
        flagged = float(last_scores[r]) > threshold
        assert (row.alert is not None) == flagged
        if flagged:  # a flagged prompt gets no reply: its first token ends the row (HF pads after it)
            assert out[r, n_prompt].item() == EOS
