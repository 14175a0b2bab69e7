"""Patching, tracing and attribution patching on the bundled organisms (planted facts).

Measured behaviour (see docs/locate-patching.md): AtP agrees with exact patching on organism-gpt2's
heads and neurons; causal tracing destroys and recovers planted facts as defined. On the 4-layer
organisms tracing peaks at the last token (reported in the docs); organism-facts, built for it, shows
ROME's two sites: MLPs at the subject's last token in early layers, attention at the last token later.
"""

from __future__ import annotations

import pytest
import torch

import mechscope
from mechscope.data.tasks.facts import generate
from mechscope.data.tasks.world import make_world
from mechscope.locate.attribution_patching import atp_vs_exact
from mechscope.locate.causal_tracing import TracingConfig, trace_facts
from mechscope.locate.metrics import logit_diff

LOCAL_LAYERS = 3  # organism-facts' layers 0-2 attend to the current and previous token only

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


def test_causal_tracing_localises_facts_to_mlps_at_the_subjects_last_token():
    """organism-facts on queries about people known only from profiles (docs/locate-patching.md): ROME's
    early site (the subject's last token, early MLPs) and late site (attention at the last token)."""
    from mechscope.data.tasks import generate_all
    from mechscope.data.tasks.profiles import people

    model = mechscope.load_model("organism-facts")
    names = people(0).entities
    facts = []
    for example in generate_all(0, ("extraction",))["extraction"].eval["heldout"]:
        target = model.to_single_token(example.target)
        if int(model(model.to_tokens(example.prompt)["input_ids"])[0, -1].argmax()) == target:
            facts.append((example.prompt, next(e for e in names if e in example.prompt), target))
        if len(facts) == 16:
            break
    summary = trace_facts(
        model, [f[0] for f in facts], [f[1] for f in facts], [f[2] for f in facts], TracingConfig(samples=3)
    )
    assert summary.config["mean_clean_minus_corrupt"] > 0.5
    classes = summary.labels["position_class"]
    first, subject_last, last = (classes.index(c) for c in ("first_subject", "last_subject", "last"))
    early = slice(0, LOCAL_LAYERS)  # the layers whose attention is local
    mlp, attn, resid = summary["mlp"], summary["attn"], summary["resid"]
    # early site: MLPs at the subject's last token recover the fact, more than at its first token...
    site = float(mlp[early, subject_last].max())
    assert site > 0.05 and site > float(mlp[early, first].max()), mlp[early]
    assert float(mlp[early, last].abs().max()) < 0.02  # ...and the query end's early MLPs do not
    # the subject's last token holds the fact through the local layers
    assert float(resid[early, subject_last].min()) > max(0.15, float(resid[early, first].max())), resid[early]
    # late site: attention at the last token, in a global layer, carries it to the end
    late = float(attn[LOCAL_LAYERS:, last].max())
    assert late > 0.1 and float(attn[LOCAL_LAYERS:, subject_last].abs().max()) < 0.05, attn
