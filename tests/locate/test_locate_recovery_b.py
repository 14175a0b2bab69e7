"""Patching, tracing and attribution patching on the bundled organisms (planted facts).

Measured behaviour (see docs/locate-patching.md): AtP agrees with exact patching on organism-gpt2's
heads and neurons; causal tracing destroys and recovers planted facts as defined. Where tracing
peaks is reported in the docs rather than asserted: on the current organisms it is the last token,
not the subject's last token that ROME finds in large models.
"""

from __future__ import annotations

import pytest
import torch

import mechscope
from mechscope.locate.attribution_patching import atp_vs_exact
from mechscope.locate.causal_tracing import TracingConfig, trace_facts
from mechscope.locate.metrics import logit_diff
from mechscope.zoo.tasks.facts import generate
from mechscope.zoo.tasks.world import make_world

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


@pytest.fixture(scope="module")
def world():
    return make_world(0), generate(0)


def entity(world, prompt: str) -> str:
    return next(e for e in world[0].entities if e in prompt)


def colour_pairs(model, world, n: int = 8):
    """Clean/corrupt fact prompts of one template and equal token length, with different answers."""
    w, data = world
    examples = [e for e in data.eval["trained"] if e.prompt.startswith("The favourite colour of")][:40]
    by_len: dict[int, list] = {}
    for e in examples:
        by_len.setdefault(model.to_tokens(e.prompt)["input_ids"].shape[1], []).append(e)
    group = max(by_len.values(), key=len)
    pairs = []
    for e, f in zip(group, group[1:] + group[:1]):
        a, b = w.facts[entity(world, e.prompt)], w.facts[entity(world, f.prompt)]
        if a["favourite_colour"] != b["favourite_colour"]:
            pairs.append((e.prompt, f.prompt, model.to_single_token(e.target), model.to_single_token(f.target)))
    return pairs[:n]


def test_atp_correlates_with_exact_patching_on_organism_gpt2(world):
    model = mechscope.load_model("organism-gpt2")
    pairs = colour_pairs(model, world)
    assert len(pairs) >= 4
    clean, corrupt = [p[0] for p in pairs], [p[1] for p in pairs]

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logit_diff(logits, [p[2] for p in pairs], [p[3] for p in pairs])

    heads = atp_vs_exact(model, clean, corrupt, metric, node="heads")
    assert heads.config["spearman"] > 0.75 and heads.config["pearson"] > 0.9, heads.config  # measured 0.81, 0.95
    neurons = atp_vs_exact(model, clean, corrupt, metric, node="neurons", units=range(0, model.dims.d_mlp, 32))
    assert neurons.config["spearman"] > 0.9 and neurons.config["pearson"] > 0.9, neurons.config


@pytest.mark.parametrize("name", ["organism-gpt2", "organism-llama"])
def test_causal_tracing_destroys_and_restores_planted_facts(world, name):
    model = mechscope.load_model(name)
    _, data = world
    facts = []
    for e in data.eval["trained"][:60]:
        ids = model.to_tokens(e.prompt)["input_ids"]
        target = model.to_single_token(e.target)
        if int(model(ids)[0, -1].argmax()) == target:
            facts.append((e.prompt, entity(world, e.prompt), target))
        if len(facts) == 6:
            break
    assert len(facts) == 6
    cfg = TracingConfig(samples=3)
    summary = trace_facts(model, [f[0] for f in facts], [f[1] for f in facts], [f[2] for f in facts], cfg)
    assert summary.config["mean_clean_minus_corrupt"] > 0.3  # noising the subject destroys the recall
    last = summary.labels["position_class"].index("last")
    # Restoring the last layer's residual at the last token restores everything (the clean run).
    assert summary["resid"][-1, last] == pytest.approx(summary.config["mean_clean_minus_corrupt"], abs=1e-4)
    assert (summary["count"][[0, 2, 5]] == 6).all()
